"""``peftlab data`` previews (peftlab/data/preview.py): the trained tokens are marked exactly where the labels
say — the assistant replies and their end-of-turn token, nothing of the prompts — in samples, packs, streamed
data and classification rows."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.preview import GREEN, RESET, mark_trained, render_preview
from peftlab.model.builtin import build_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _chat_file(path: Path, n: int) -> list[str]:
    replies = [f"answer {k} " + "x" * (k % 5) for k in range(n)]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {k}"},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for k, r in enumerate(replies)))
    return replies


def _marked(text: str) -> list[str]:
    """The marked runs of a preview (its first line is the legend, which shows the marks)."""
    return re.findall(r"\[\[(.*?)\]\]", text.split("\n", 1)[1], flags=re.DOTALL)


def test_mark_trained_marks_runs_of_labels(tok):
    pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in ("one", " two", " three", " four")]
    ids = [i for piece in pieces for i in piece]
    labels = [IGNORE] * len(pieces[0]) + pieces[1] + pieces[2] + [IGNORE] * len(pieces[3])
    assert mark_trained(ids, labels, tok) == "one[[ two three]] four"
    assert mark_trained(ids, labels, tok, color=True) == f"one{GREEN} two three{RESET} four"
    assert mark_trained(ids, list(ids), tok) == "[[one two three four]]"
    assert mark_trained(ids, [IGNORE] * len(ids), tok) == "one two three four"
    assert mark_trained([], [], tok) == ""


def test_the_marked_text_is_what_the_model_learns_to_say(tmp_path, tok):
    replies = _chat_file(tmp_path / "c.jsonl", 6)
    bundle = build_data(DataConfig(train=["c.jsonl"], shuffle=False), tok, seed=0, base_dir=tmp_path)
    text = render_preview(bundle, tok, n=6)
    assert text.startswith("(trained tokens are inside [[...]])\n--- sample 0 (c, ")
    assert _marked(text) == [f"{r}<|eot_id|>" for r in replies]
    for k, ex in enumerate(bundle.train):
        trained = sum(1 for x in ex["labels"] if x != IGNORE)
        assert f"--- sample {k} (c, {len(ex['input_ids'])} tokens, {trained} trained)" in text
    assert render_preview(bundle, tok, n=2).count("--- sample") == 2
    colored = render_preview(bundle, tok, n=1, color=True)
    assert colored.startswith("(trained tokens are green)") and f"{GREEN}{replies[0]}<|eot_id|>{RESET}" in colored


def test_packs_and_streams(tmp_path, tok):
    replies = _chat_file(tmp_path / "c.jsonl", 12)
    packed = build_data(DataConfig(train=["c.jsonl"], packing=True, max_seq_len=128, shuffle=False), tok, seed=0,
                        base_dir=tmp_path)
    text = render_preview(packed, tok, n=1)
    pack = packed.train[0]
    assert text.splitlines()[1] == (f"--- pack 0: {len(pack['seq_lens'])} samples {pack['seq_lens']}, "
                                    f"{len(pack['input_ids'])} tokens, {sum(x != IGNORE for x in pack['labels'])} "
                                    "trained")
    samples = text.split("\n", 2)[2].split("\n~~~ next sample ~~~\n")
    assert len(samples) == len(pack["seq_lens"]) > 1
    marked = [m for s in samples for m in re.findall(r"\[\[(.*?)\]\]", s, flags=re.DOTALL)]
    assert set(marked) <= {f"{r}<|eot_id|>" for r in replies} and len(marked) == len(samples)
    streamed = build_data(DataConfig(train=["c.jsonl"], streaming=True, shuffle=False), tok, seed=0,
                          base_dir=tmp_path)
    assert not hasattr(streamed.train, "__getitem__")
    text = render_preview(streamed, tok, n=3)
    assert _marked(text) == [f"{r}<|eot_id|>" for r in replies[:3]]


def test_classification_rows_show_their_label(tmp_path, tok):
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                                              for t, lab in (("good film", "pos"), ("bad film", "neg"))))
    bundle = build_data(DataConfig(train=["l.jsonl"], shuffle=False), tok, seed=0, base_dir=tmp_path)
    text = render_preview(bundle, tok, n=2)
    n = [len(ex["input_ids"]) for ex in bundle.train]
    assert text.splitlines()[1:] == [f"--- sample 0 (label 1, {n[0]} tokens)", "<|begin_of_text|>good film",
                                     f"--- sample 1 (label 0, {n[1]} tokens)", "<|begin_of_text|>bad film"]


def test_a_preference_pair_shows_its_prompt_once_and_both_answers_marked(tmp_path, tok):
    user, good, bad = {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}, \
        {"role": "assistant", "content": "5"}
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [user], "chosen": [good], "rejected": [bad]}) + "\n")
    cfg = DataConfig(train=["p.jsonl"], shuffle=False, preference={"mode": "pairs"})
    ex = build_data(cfg, tok, seed=0, base_dir=tmp_path).train[0]
    text = render_preview(build_data(cfg, tok, seed=0, base_dir=tmp_path), tok)
    h, a = "<|start_header_id|>", "<|end_header_id|>\n\n"
    prompt = f"<|begin_of_text|>{h}user{a}2 + 2?<|eot_id|>{h}assistant{a}"
    assert text.split("\n", 1)[1] == (f"--- pair 0 (p, prompt {len(ex['prompt_ids'])} tokens)\n{prompt}\n"
                                      ">>> chosen (2 tokens): [[4<|eot_id|>]]\n"
                                      ">>> rejected (2 tokens): [[5<|eot_id|>]]")
    kto = build_data(cfg.model_copy(update={"preference": {"mode": "unpaired"}}), tok, seed=0, base_dir=tmp_path)
    assert render_preview(kto, tok, n=2).count(">>> ") == 2 and ">>> undesirable (2 tokens): [[5<|eot_id|>]]" in \
        render_preview(kto, tok, n=2)
