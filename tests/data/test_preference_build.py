"""peftlab.data.preference_build through build_data: a preference recipe's files become pairs (or KTO
completions), with over-length counts reported, held-out prompts for exact match, and their own cache entry."""
from __future__ import annotations

import json
import logging

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
PAIRS = {"mode": "pairs", "max_prompt_len": None}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pair(i: int, words: int = 1) -> dict:
    return {"prompt": [U(" ".join([f"question {i}"] * words))], "chosen": [AS(f"right {i}")],
            "rejected": [AS(f"wrong {i} " * 3)]}


def test_pairs_build_cache_and_report_over_length_counts(tmp_path, tok, caplog):
    write(tmp_path / "p.jsonl", [pair(i, words=1 + 12 * (i % 2)) for i in range(6)])
    cfg = DataConfig(train=["p.jsonl"], eval_split=0.34, max_seq_len=96, shuffle=False, preference=PAIRS)
    with caplog.at_level(logging.INFO, logger="peftlab.data.preference_build"):
        b = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert len(b.train) == 4 and len(b.eval) == 2 and b.task == "causal_lm"
    for ex in [*b.train, *b.eval]:
        assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 96
        assert ex["prompt_ids"][0] == tok.bos_token_id  # a prompt cut from the left keeps its BOS
    cut = sum(d.truncated for d in b.stats.datasets)
    assert cut == 3  # the three long prompts (train and eval)
    assert ("preference data: 3 over-length pairs cut to data.max_seq_len=96 (3 of them with the prompt cut "
            "from the left to 48 tokens, the answers after), 0 dropped") in caplog.text
    # held-out prompts for generation: the prompt ids and the chosen answer's text
    assert [p["reference"] for p in b.eval_prompts] == [f"right {e['sample_id']}" for e in b.eval]
    assert [p["prompt_ids"] for p in b.eval_prompts] == [e["prompt_ids"] for e in b.eval]
    again = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert again.from_cache and list(again.train) == list(b.train)
    kto = build_data(cfg.model_copy(update={"preference": {"mode": "unpaired", "max_prompt_len": None}}), tok,
                     seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not kto.from_cache and len(kto.train) == 8  # its own cache entry; each pair -> 2 completions
    assert sorted(e["desirable"] for e in kto.train) == [False] * 4 + [True] * 4


def test_sft_rows_under_a_preference_recipe_are_refused_with_the_row(tmp_path, tok):
    write(tmp_path / "s.jsonl", [pair(0), {"messages": [U("hi"), AS("hello")]}])
    with pytest.raises(PeftlabError) as e:
        build_data(DataConfig(train=["s.jsonl"], preference=PAIRS), tok, seed=0, base_dir=tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 's.jsonl'}:2: bad row in dataset 's' (data.train[0], preference "
                                   "data): field '<row>' is not preference data (keys ['messages'])")
    b = build_data(DataConfig(train=["s.jsonl"], preference=PAIRS, on_bad_rows="skip"), tok, seed=0,
                   base_dir=tmp_path)
    assert len(b.train) == 1 and b.stats.bad_rows == 1


@pytest.mark.parametrize("prompt", [[1, 5, 6], []])  # [] : a prompt of no tokens (a tokenizer without BOS)
def test_answer_tokens_are_what_the_run_counts_as_tokens_seen(prompt):
    """The data statistics' trained tokens of a pair / KTO completion equal the run's count over the rows the
    objective builds (preference_rows -> collate -> labels after the shift), also with an empty prompt."""
    from peftlab.data.collate import collate
    from peftlab.data.preference_batch import preference_rows
    from peftlab.data.preference_build import answer_tokens
    from peftlab.objectives.causal_lm import count_targets
    from peftlab.objectives.reference import rows as batch_rows

    pair_ex = {"prompt_ids": prompt, "chosen_ids": [7, 8, 2], "chosen_labels": [7, 8, 2], "rejected_ids": [9, 2],
               "rejected_labels": [9, 2], "sample_id": 0}
    kto_ex = {"prompt_ids": prompt, "completion_ids": [7, 8, 2], "completion_labels": [7, 8, 2], "desirable": True,
              "sample_id": 1}
    # with a prompt: every answer token; without: each answer's first token is the row's first, never predicted
    expected = {"pair": 5 if prompt else 3, "kto": 3 if prompt else 2}
    for name, ex, scored in (("pair", pair_ex, 2), ("kto", kto_ex, 1)):  # KTO: the matched rows (KL rows: no grad)
        rows, _ = preference_rows([ex])
        batch = batch_rows(collate(rows, pad_token_id=0), 0, scored)
        assert answer_tokens(ex) == count_targets(batch) == expected[name], name
