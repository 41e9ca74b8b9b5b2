"""How faithful a merge is: the adapter model against the merged model on a few held-out samples.

After every merge (``peftlab merge``, ``--report-samples N``; 0 skips it) the adapter on its base, built as
training built it (4-bit when it trained 4-bit), and the merged model read back from disk see the same
batches: the training recipe's eval data when it can be read, else a few built-in prompts. The report — max /
mean absolute logit difference over real tokens, each model's perplexity, top-1 agreement — is written as
``merge_report.json`` beside the weights and summarised in one line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab.adapters.peft_format import load_adapter
from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.data.collate import collate
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.export.source import MergeSource, tokenizer_dir
from peftlab.model.load import build_model, load_base_model, load_tokenizer

REPORT_NAME = "merge_report.json"

# Shown by the fidelity report when the training recipe's eval data cannot be read.
BUILTIN_PROMPTS = (
    "The capital of France is Paris. The capital of Italy is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "after c comes d, after d comes e, after e comes",
    "Question: what is 3 + 4?\nAnswer: 7\nQuestion: what is 5 - 2?\nAnswer:",
)


def adapter_model(source: MergeSource):
    """(model, tokenizer) of the adapter on its base, as training built it (4-bit when it trained 4-bit)."""
    if source.recipe is not None:
        recipe = source.recipe.model_copy(deep=True)
        recipe.model.name = str(source.base_dir)
        recipe.train.device = "cpu"
        recipe.model.gradient_checkpointing = False
        loaded = build_model(recipe, device=torch.device("cpu"), adapter_dir=source.adapter_dir, trainable=False)
        return loaded.model.eval(), loaded.tokenizer
    model = load_base_model(str(source.base_dir), dtype=torch.float32, device=torch.device("cpu"))
    load_adapter(model, source.adapter_dir, kernel_backend="torch")
    return model.eval(), load_tokenizer(str(tokenizer_dir(source)))


def report_batches(source: MergeSource, tokenizer: Any, n_samples: int) -> tuple[list[dict[str, Tensor]], str]:
    """Held-out batches: the training recipe's eval data when it can be read, else built-in prompts."""
    if source.recipe is not None and source.recipe.data.eval:
        try:
            data = build_data(source.recipe.data, tokenizer, seed=source.recipe.train.seed,
                              base_dir=Path(source.recipe.base_dir))
            if data.eval:
                examples = list(data.eval[:n_samples])
                batch = collate(examples, pad_token_id=data.pad_token_id, attn_implementation="sdpa")
                keep = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")
                        if k in batch and batch[k].dim() == 2}
                if "position_ids" not in batch and set(keep) == {"input_ids", "attention_mask", "labels"}:
                    paths = ", ".join(str(s.path) for s in source.recipe.data.eval if getattr(s, "path", None))
                    return [keep], f"training recipe eval data ({paths or 'data.eval'})"
        except (PeftlabError, OSError, ValueError):
            pass
    texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(min(n_samples, len(BUILTIN_PROMPTS)))]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}], \
        "built-in prompts"


@torch.no_grad()
def compare_logits(model_a, model_b, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Max/mean |logits_a - logits_b| over real tokens, each model's perplexity, top-1 agreement."""
    max_diff, sum_diff, n_logits, agree, n_tok = 0.0, 0.0, 0, 0, 0
    nll = [0.0, 0.0]
    n_targets = 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        la = model_a(**inputs).logits.float()
        lb = model_b(**inputs).logits.float()
        real = batch["attention_mask"].bool()
        diff = (la - lb).abs()[real]
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.sum().item()
        n_logits += diff.numel()
        agree += (la.argmax(-1) == lb.argmax(-1))[real].sum().item()
        n_tok += int(real.sum())
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        n_targets += int(mask.sum())
        for i, logits in enumerate((la, lb)):
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll[i] -= picked[mask].sum().item()
    ppl = [math.exp(min(v / max(n_targets, 1), 50.0)) for v in nll]
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum_diff / max(n_logits, 1),
            "perplexity_adapter": ppl[0], "perplexity_merged": ppl[1], "top1_agreement": agree / max(n_tok, 1),
            "tokens": n_tok, "target_tokens": n_targets}


def fidelity_report(source: MergeSource, merged_dir: Path, *, n_samples: int = 8,
                    base_precision: str = "trained") -> dict[str, Any]:
    """Adapter model vs merged model on a few held-out samples (see :func:`compare_logits`)."""
    from transformers import AutoModelForCausalLM

    ref, tokenizer = adapter_model(source)
    config = json.loads((merged_dir / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or "float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    batches, where = report_batches(source, tokenizer, n_samples)
    report: dict[str, Any] = {
        "adapter": str(source.adapter_dir), "base": source.base_name, "merged": str(merged_dir),
        "base_precision": base_precision, "dtype": str(dtype).removeprefix("torch."),
        "adapter_model": ("4-bit " + source.quant.mode.upper()) if source.quant else "dense",
        "samples": int(batches[0]["input_ids"].shape[0]), "samples_source": where,
    }
    report.update(compare_logits(ref, merged, batches))
    return report


def format_report(report: dict[str, Any]) -> str:
    return (
        f"fidelity ({report['samples']} samples from {report['samples_source']}, {report['tokens']} tokens): "
        f"max |Δlogit| {report['max_abs_logit_diff']:.3g}, mean |Δlogit| {report['mean_abs_logit_diff']:.3g}, "
        f"perplexity adapter {report['perplexity_adapter']:.4f} vs merged {report['perplexity_merged']:.4f}, "
        f"top-1 agreement {report['top1_agreement']:.1%}"
    )


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """``merge_report.json`` in ``out_dir`` (atomically)."""
    return atomic_write_text(Path(out_dir) / REPORT_NAME, json.dumps(report, indent=2) + "\n")
