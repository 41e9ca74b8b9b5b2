"""Training-time augmentation: each method does what it says on a fixed input; draws are a function of
(seed, epoch, row) only; chat rows change in their user turns alone (assistant tokens and their loss masks
identical), classification labels never change; eval batches are the tokenized rows; a resume mid-epoch
builds the same augmented batches; plain-text data is refused."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.data.augment import (
    KEYBOARD_NEIGHBOURS,
    Augmenter,
    augment_record,
    augment_text,
    build_augmenter,
    rng_for,
    typo,
)
from peftlab.data.collate import collate
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.tokenize import IGNORE_INDEX, Encoder
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer
from peftlab.recipe.augmentation import AugmentConfig
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer
from peftlab.trainer.state import BatchBuilder, EpochSampler, EpochSlice, TrainState

TEXT = "The quick brown fox\njumps over, the lazy dog."
WORDS = TEXT.split()
LEXICON = {"quick": ("fast",), "dog": ("hound", "cur"), "lazy": ("idle",)}


def _cfg(**p: float) -> AugmentConfig:
    return AugmentConfig(**p)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_word_deletion_keeps_a_subsequence_and_never_empties_the_text():
    out = augment_text(TEXT, _cfg(word_deletion=0.5), random.Random(0))
    kept = out.split()
    assert 0 < len(kept) < len(WORDS)
    it = iter(WORDS)
    assert all(w in it for w in kept)  # the kept words, in their original order
    assert len(augment_text(TEXT, _cfg(word_deletion=1.0), random.Random(0)).split()) == 1


def test_word_swap_permutes_the_words():
    out = augment_text(TEXT, _cfg(word_swap=0.5), random.Random(0))
    assert out != TEXT and sorted(out.split()) == sorted(WORDS)
    assert "\n" in out  # the line break stays where it was (words move, whitespace does not)


def test_word_insertion_adds_copies_of_words_of_the_same_text():
    out = augment_text(TEXT, _cfg(word_insertion=1.0), random.Random(0)).split()
    assert len(out) == 2 * len(WORDS)
    assert out[0::2] == WORDS and set(out[1::2]) <= set(WORDS)  # each original word, then an inserted copy


def test_char_noise_is_one_keyboard_neighbour_typo_per_word():
    out = augment_text(TEXT, _cfg(char_noise=1.0), random.Random(0)).split()
    for old, new in zip(WORDS, out):
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(new) == len(old) and len(diff) == 1, (old, new)
        a, b = diff[0]
        assert b.lower() in KEYBOARD_NEIGHBOURS[a.lower()] and a.isupper() == b.isupper()
    assert typo("42!", random.Random(0)) == "42!"  # nothing to mistype
    assert set(KEYBOARD_NEIGHBOURS["g"]) == set("tyfhvb") and set(KEYBOARD_NEIGHBOURS["q"]) == set("wa")


def test_synonyms_come_from_the_lexicon_with_case_and_punctuation_kept():
    out = augment_text("Quick, the lazy dog! Unknown.", _cfg(synonym=1.0), random.Random(0),
                       lambda w: LEXICON.get(w, ()))
    words = out.split()
    assert words[0] == "Fast," and words[2] == "idle" and words[3] in ("hound!", "cur!") and words[4] == "Unknown."


def test_draws_depend_on_seed_epoch_and_row_only():
    cfg = _cfg(word_deletion=0.2, word_swap=0.2, char_noise=0.3)
    rec = {"kind": "classification", "text": "we saw a very big storm today over the old town", "label": "weather"}
    a = augment_record(rec, cfg, rng_for(7, 1, 3))
    assert a == augment_record(rec, cfg, rng_for(7, 1, 3))  # reproducible
    per_epoch = {augment_record(rec, cfg, rng_for(7, e, 3))["text"] for e in range(6)}
    assert len(per_epoch) == 6  # different at every epoch
    assert a != augment_record(rec, cfg, rng_for(8, 1, 3)) and a != augment_record(rec, cfg, rng_for(7, 1, 4))
    assert a["label"] == "weather" and rec["text"].startswith("we saw")  # the label stays, the input is a copy


CHAT = {"kind": "chat", "messages": [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What colour is the clear daytime sky above us?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And the colour of fresh grass in the spring?"},
    {"role": "assistant", "content": "Green, mostly."},
]}


def _trained(ids, labels):
    return [(i, lab) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_chat_rows_change_in_user_turns_only_and_keep_their_loss_masks_exactly(tok):
    enc = Encoder(tok)
    original = enc.encode_batch([CHAT])[0]
    ex = {"input_ids": original.input_ids, "labels": original.labels, "sample_id": 5, "dataset": 0,
          "loss_weight": 0.5}
    aug = Augmenter(_cfg(word_deletion=0.3, char_noise=0.3, word_swap=0.2), seed=1, records={5: CHAT}, encoder=enc,
                    max_seq_len=512)
    for epoch in range(3):
        rec = augment_record(CHAT, aug.cfg, rng_for(1, epoch, 0))
        assert [m["content"] for m in rec["messages"] if m["role"] != "user"] == \
               [m["content"] for m in CHAT["messages"] if m["role"] != "user"]
        assert [m["content"] for m in rec["messages"] if m["role"] == "user"] != \
               [m["content"] for m in CHAT["messages"] if m["role"] == "user"]
        out = aug.augment([ex], [0], epoch)[0]
        assert out["input_ids"] != ex["input_ids"]
        # the assistant tokens and their labels, in order, are exactly the original ones
        assert _trained(out["input_ids"], out["labels"]) == _trained(ex["input_ids"], ex["labels"])
        assert out["sample_id"] == 5 and out["loss_weight"] == 0.5
    assert aug.kept_original == 0 and ex["input_ids"] == original.input_ids  # the cached row is not modified


def test_a_row_whose_trained_tokens_would_change_is_served_unaugmented(tok, caplog):
    """Truncation that cuts an augmented row elsewhere would change its targets: the original is used."""
    enc = Encoder(tok)
    original = enc.encode_batch([CHAT])[0]
    n = len(original.input_ids) - 3  # the original, truncated, loses 3 trained tokens
    ex = {"input_ids": original.input_ids[:n], "labels": original.labels[:n], "sample_id": 0, "dataset": 0}
    aug = Augmenter(_cfg(word_insertion=0.5), seed=0, records={0: CHAT}, encoder=enc, max_seq_len=n)
    with caplog.at_level(logging.WARNING, logger="peftlab.data.augment"):
        assert aug.augment([ex], [0], 0)[0] is ex and aug.kept_original == 1
    assert "augment: no row of the first batch could be augmented" in caplog.text


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _classification_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    words = ["we", "saw", "a", "very", "big", "storm", "cake", "today", "then", "goal", "it", "was"]
    return [{"text": " ".join(rng.choice(words) for _ in range(8)), "label": ["a", "b", "c"][k % 3]}
            for k in range(n)]


def test_batches_train_rows_augmented_per_epoch_eval_untouched_resume_exact(tmp_path, tok):
    _write(tmp_path / "train.jsonl", _classification_rows(14))
    cfg = DataConfig(train=[{"path": "train.jsonl", "format": "classification"}], eval_split=0.25, max_seq_len=64)
    bundle = build_data(cfg, tok, seed=3, base_dir=tmp_path)
    augmenter = build_augmenter(_cfg(word_swap=0.3, char_noise=0.3), cfg, tok, seed=3, base_dir=tmp_path)
    builder = BatchBuilder(bundle, "cpu", augmenter=augmenter)
    # eval rows are never augmented, whatever the indices carry
    ev = list(range(len(bundle.eval)))
    plain_eval = collate([bundle.eval[i] for i in ev], pad_token_id=bundle.pad_token_id)
    for got in (builder(ev, split="eval"), builder(EpochSlice(ev, 2), split="eval")):
        assert all(torch.equal(got[k], plain_eval[k]) for k in plain_eval)
    # held-out rows are not training rows of the augmenter's either
    assert {e["sample_id"] for e in bundle.eval}.isdisjoint(e["sample_id"] for e in bundle.train)

    sampler = EpochSampler(len(bundle.train), 4, seed=3)
    state = TrainState()
    run = []
    for k in range(7):  # 3 micro-batches per epoch: epochs 0, 1 and 2
        if k == 2:
            saved = json.loads(json.dumps(state.to_json()))  # a checkpoint mid-epoch
        run.append([builder(ix) for ix in sampler.next_step(state, grad_accum=1)])
    first = run[0][0]
    plain = collate([bundle.train[i] for i in sampler.epoch_order(0)[0]], pad_token_id=bundle.pad_token_id)
    assert not torch.equal(first["input_ids"], plain["input_ids"]) and torch.equal(first["labels"], plain["labels"])
    assert torch.equal(builder(sampler.epoch_order(0)[0])["input_ids"], plain["input_ids"])  # no epoch: as cached
    # the same rows at another epoch are augmented differently, their labels are the same
    again = builder(EpochSlice(sampler.epoch_order(0)[0], 1))
    assert not torch.equal(again["input_ids"], first["input_ids"]) and torch.equal(again["labels"], first["labels"])
    # resume mid-epoch: a fresh builder and sampler from the saved position give exactly the same batches
    resumed_builder = BatchBuilder(bundle, "cpu", augmenter=build_augmenter(
        _cfg(word_swap=0.3, char_noise=0.3), cfg, tok, seed=3, base_dir=tmp_path))
    resumed_state = TrainState.from_json(saved)
    resumed_sampler = EpochSampler(len(bundle.train), 4, seed=3)
    for step in run[2:]:
        got = [resumed_builder(ix) for ix in resumed_sampler.next_step(resumed_state, grad_accum=1)]
        assert all(torch.equal(g[k], w[k]) for g, w in zip(got, step) for k in w)


def test_plain_text_data_is_refused(tmp_path, tok):
    _write(tmp_path / "corpus.jsonl", [{"text": "some raw text to continue"}])
    cfg = DataConfig(train=[{"path": "corpus.jsonl", "format": "text"}])
    with pytest.raises(PeftlabError, match=r"corpus.jsonl.*augment applies to inputs.*'corpus' \(data.train\[0\]\) "
                                           r"is plain text"):
        build_augmenter(_cfg(word_swap=0.1), cfg, tok, seed=0, base_dir=tmp_path)
    assert build_augmenter(None, cfg, tok, seed=0, base_dir=tmp_path) is None


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_an_augmented_chat_run_resumed_mid_epoch_ends_exactly_like_an_uninterrupted_one(tmp_path):
    """4 steps in one go == 2 steps, a checkpoint, 2 more after a resume (the augmented batches of steps 3-4 are
    rebuilt from (seed, epoch, row) alone); every row was augmented, none served as it was."""
    data = make_quickstart_data(tmp_path / "data", n_train=16, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "run", train={"max_steps": 4, "eval_at_start": False, "save_every": 2,
                                                          "micro_batch_size": 4, "grad_accum": 1},
                           eval={"metric": "loss"})
    raw["augment"] = {"word_swap": 0.2, "char_noise": 0.2}
    whole = Trainer(recipe_from_dict(raw), quiet=True)
    losses = whole.train().losses
    assert whole.batch.augmenter.served == 16 and whole.batch.augmenter.kept_original == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    resumed = Trainer(recipe_from_dict({**raw, "output": {**raw["output"], "dir": str(tmp_path / "resumed")},
                                        "resume": str(ckpt)}), quiet=True).train()
    assert resumed.losses == losses[2:]
