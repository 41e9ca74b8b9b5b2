"""Shared builders for tests: recipes over the built-in models and generated quickstart data."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def make_quickstart_data(out: Path, n_train: int = 64, n_eval: int = 16, seed: int = 1234) -> Path:
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import make_quickstart_data as gen
    finally:
        sys.path.pop(0)
    train, held_out = gen.generate(n_train, n_eval, seed)
    gen.write_jsonl(train, out / "train.jsonl")
    gen.write_jsonl(held_out, out / "eval.jsonl")
    return out


def tiny_recipe_dict(data_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A fast recipe: micro-llama, NF4, LoRA r=8 on all linear layers, small batches."""
    raw: dict[str, Any] = {
        "model": {"name": "builtin:micro-llama"},
        "quantization": {"mode": "nf4"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data_dir / "train.jsonl"), "format": "messages"}],
                 "eval": [{"path": str(data_dir / "eval.jsonl"), "format": "messages"}],
                 "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "log_every": 1,
                  "seed": 7, "warmup_steps": 0},
        "eval": {"metric": "loss", "max_prompts": 4, "max_new_tokens": 4},
        "output": {"dir": str(out_dir), "report_to": ["jsonl", "tensorboard"]},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw
