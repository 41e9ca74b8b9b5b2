"""Fixtures of the trainer tests: short fp32 runs of the micro model on generated quickstart data."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer


def short_run_recipe(data_dir: Path, out: Path, **sections) -> dict:
    """3 steps of micro-batch 4 in fp32 with LoRA dropout, a checkpoint after every step, jsonl metrics only."""
    train = {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "save_every": 1, "eval_at_start": False,
             **sections.pop("train", {})}
    resume = sections.pop("resume", None)
    adapter = {"dropout": 0.1, **sections.pop("adapter", {})}
    output = {"report_to": ["jsonl"], "plot": False, **sections.pop("output", {})}
    raw = tiny_recipe_dict(data_dir, out, quantization={"mode": "none"}, adapter=adapter, data={"max_seq_len": 48},
                           train=train, eval={"max_prompts": 1, "max_new_tokens": 2}, output=output, **sections)
    return {**raw, "resume": resume}


@pytest.fixture(scope="session")
def short_recipe():
    """:func:`short_run_recipe`, for tests that build recipes themselves."""
    return short_run_recipe


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("short-data"), n_train=24, n_eval=2)


@pytest.fixture(scope="module")
def short_trainer(short_data):
    """``short_trainer(out, **sections)``: a Trainer of :func:`short_run_recipe` (quiet unless ``quiet=False``)."""
    def make(out: Path, quiet: bool = True, **sections) -> Trainer:
        return Trainer(recipe_from_dict(short_run_recipe(short_data, out, **sections)), quiet=quiet)
    return make
