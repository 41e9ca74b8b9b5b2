"""Packing: best-fit decreasing, and a packed sample computes exactly what it computes alone.

The model check runs the built-in tiny Llama in fp32 through the collator's own model inputs, for
the attention implementations whose masks the collator builds (sdpa, eager).
"""
from __future__ import annotations

import random

import pytest
import torch

from peftlab.data.collate import collate
from peftlab.data.packing import best_fit_decreasing, make_pack, pack

IGNORE = -100


def example(n: int, sid: int, *, prompt: int = 3, ds: int = 0, lw: float = 1.0, seed: int = 0) -> dict:
    g = random.Random(seed * 1000 + sid)
    ids = [g.randrange(5, 250) for _ in range(n)]
    prompt = min(prompt, n - 1)
    labels = [IGNORE] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels, "sample_id": sid, "dataset": ds, "loss_weight": lw}


def test_bfd_fits_and_is_best_fit():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # 7 -> A(3 left); 5 -> B(5); 4 -> B(1); 3 -> A(0); 3 -> C(7); 2 -> C(5); 1 -> B(0): best fit, 3 bins
    assert bins == [[0, 3], [1, 2, 6], [4, 5]]


def test_bfd_efficiency_on_skewed_lengths():
    g = random.Random(0)
    lengths = [min(2048, int(g.lognormvariate(5.5, 0.8)) + 8) for _ in range(3000)]
    bins = best_fit_decreasing(lengths, 2048)
    assert sum(lengths) / (len(bins) * 2048) > 0.99
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def test_make_pack_masks_first_label_and_restarts_positions():
    a, b = example(5, 1, prompt=0), example(4, 2, prompt=1, ds=1, lw=2.0)
    p = make_pack([a, b])
    assert p["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert p["seq_lens"] == [5, 4] and p["sample_ids"] == [1, 2] and p["datasets"] == [0, 1]
    assert p["labels"][0] == IGNORE and p["labels"][5] == IGNORE  # first token of each sample
    assert p["labels"][1:5] == a["labels"][1:] and p["labels"][6:] == b["labels"][1:]
    assert p["loss_weight"] == [1.0] * 5 + [2.0] * 4 and p["dataset"] == -1
    assert make_pack([a, example(3, 3)])["loss_weight"] == 1.0


def test_collate_packs_block_diagonal_mask_and_padding():
    p1 = make_pack([example(3, 1), example(2, 2)])
    p2 = make_pack([example(2, 3)])
    batch = collate([p1, p2], pad_token_id=0, pad_to_multiple_of=8, attn_implementation="sdpa")
    m = batch["attention_mask"]
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[:3, :3] = torch.ones(3, 3).tril().bool()
    expect[3:5, 3:5] = torch.ones(2, 2).tril().bool()
    expect[5:, 5:] = torch.ones(3, 3).tril().bool()  # padding: its own block, never seen by real tokens
    assert torch.equal(m[0, 0], expect)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch["sample_ids"].tolist() == [[1, 2], [3, -1]]
    assert (batch["labels"][1, 2:] == IGNORE).all() and (batch["loss_weights"][1, 2:] == 0).all()
    assert int(batch["num_tokens"]) == 7  # real tokens, not the 16 positions of the padded 4D-masked batch
    eager = collate([p1, p2], pad_token_id=0, attn_implementation="eager")["attention_mask"]
    assert eager.dtype == torch.float32 and torch.equal(eager[0, 0] == 0, m[0, 0, :5, :5])
    fa = collate([p1], pad_token_id=0, attn_implementation="flash_attention_2")
    assert "attention_mask" not in fa and fa["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_collate_refuses_leaky_attention():
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="flex_attention.*leak"):
        collate([make_pack([example(3, 1)])], pad_token_id=0, attn_implementation="flex_attention")


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    from peftlab.model.builtin import resolve_builtin

    model = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-llama"), dtype=torch.float32)
    return model.eval()


def _shifted_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(tiny_model, attn):
    tiny_model.config._attn_implementation = attn  # our own instance; selects the attention function
    samples = [example(n, k, prompt=2) for k, n in enumerate([37, 20, 11, 29, 5])]
    packs = pack(samples, 64)
    assert len(packs) == 2  # 37+20+5 / 29+11 (BFD)
    batch = collate(packs, pad_token_id=0, attn_implementation=attn)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
        assert torch.isfinite(logits).all()  # padded rows included
        total, n_total = torch.zeros(()), 0
        for b, p in enumerate(packs):
            pos = 0
            for sid, n in zip(p["sample_ids"], p["seq_lens"]):
                alone = samples[sid]
                ref = tiny_model(input_ids=torch.tensor([alone["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[b, pos:pos + n], ref, rtol=1e-5, atol=1e-5)
                ref_sum = _shifted_loss_sum(ref, torch.tensor(alone["labels"]))
                total += ref_sum
                n_total += sum(1 for x in alone["labels"][1:] if x != IGNORE)
                pos += n
        # the pack's loss (trainer's shift over the whole row) = token-weighted sum of the samples' losses
        pack_sum = sum(_shifted_loss_sum(logits[b], batch["labels"][b]) for b in range(len(packs)))
        n_pack = int((batch["labels"][:, 1:] != IGNORE).sum())
        assert n_pack == n_total
        torch.testing.assert_close(pack_sum / n_pack, total / n_total, rtol=1e-5, atol=1e-6)


def test_without_block_mask_packed_logits_differ(tiny_model):
    """Guard: the equality above is not vacuous; a plain causal mask leaks across samples."""
    tiny_model.config._attn_implementation = "sdpa"
    samples = [example(n, k) for k, n in enumerate([20, 12])]
    p = make_pack(samples)
    with torch.no_grad():
        leaky = tiny_model(input_ids=torch.tensor([p["input_ids"]]),
                           attention_mask=torch.ones(1, 32, dtype=torch.long)).logits[0, 20:]
        alone = tiny_model(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)
