"""peftlab.export.fidelity: the merge's fidelity numbers against a plain-PyTorch computation on fixed logits,
the held-out batches it uses, and the report as written and summarised (the end-to-end report of a real merge
is checked in test_merge.py)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from peftlab.export.fidelity import (
    BUILTIN_PROMPTS,
    REPORT_NAME,
    compare_logits,
    format_report,
    report_batches,
    write_report,
)
from peftlab.export.source import MergeSource
from peftlab.model.builtin import build_tokenizer


class FixedLogits(torch.nn.Module):
    """A "model" that returns the given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == self.logits.shape[:2] and attention_mask.shape == input_ids.shape
        return SimpleNamespace(logits=self.logits)


def reference(la, lb, mask, labels):
    """Ground truth: the same quantities written the obvious way."""
    real = mask.bool()
    diff = (la - lb).abs()[real]
    targets = labels[:, 1:]

    def ppl(logits):
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                              reduction="mean")
        return math.exp(nll.item())

    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "perplexity_adapter": ppl(la), "perplexity_merged": ppl(lb),
            "top1_agreement": (la.argmax(-1) == lb.argmax(-1))[real].float().mean().item(),
            "tokens": int(real.sum()), "target_tokens": int((targets != -100).sum())}


def test_compare_logits_equals_the_plain_computation():
    g = torch.Generator().manual_seed(0)
    la = torch.randn(2, 7, 11, generator=g)
    lb = la + 0.3 * torch.randn(2, 7, 11, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids = torch.randint(0, 11, (2, 7), generator=g)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # a prompt token: not a target
    got = compare_logits(FixedLogits(la), FixedLogits(lb),
                         [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    want = reference(la, lb, mask, labels)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-5), key
    same = compare_logits(FixedLogits(la), FixedLogits(la), [{"input_ids": ids, "attention_mask": mask,
                                                               "labels": labels}])
    assert same["max_abs_logit_diff"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["perplexity_adapter"] == same["perplexity_merged"]


def test_without_a_recipe_the_batches_are_the_built_in_prompts(tmp_path):
    source = MergeSource(tmp_path, {}, "b", tmp_path, None, None, None)
    tok = build_tokenizer()
    batches, where = report_batches(source, tok, n_samples=3)
    assert where == "built-in prompts" and len(batches) == 1
    batch = batches[0]
    assert batch["input_ids"].shape[0] == 3
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == list(BUILTIN_PROMPTS[:3])
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)  # padding is never a target


def test_the_report_file_and_its_summary_line(tmp_path):
    report = {"samples": 4, "samples_source": "built-in prompts", "tokens": 60, "max_abs_logit_diff": 1.234e-6,
              "mean_abs_logit_diff": 2e-7, "perplexity_adapter": 12.3456789, "perplexity_merged": 12.3456,
              "top1_agreement": 0.99}
    path = write_report(tmp_path, report)
    assert path == tmp_path / REPORT_NAME and json.loads(path.read_text()) == report
    assert path.read_text().endswith("}\n") and not list(tmp_path.glob(".*"))
    assert format_report(report) == (
        "fidelity (4 samples from built-in prompts, 60 tokens): max |Δlogit| 1.23e-06, mean |Δlogit| 2e-07, "
        "perplexity adapter 12.3457 vs merged 12.3456, top-1 agreement 99.0%")
