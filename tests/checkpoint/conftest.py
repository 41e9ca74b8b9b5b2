"""Fixtures of the checkpoint tests: a short fp32 run with LoRA dropout that saves after every step."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import make_quickstart_data, short_run_recipe

from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

checkpoint_recipe = short_run_recipe  # 3 steps, a checkpoint after every step (tests/helpers.py)


@pytest.fixture(scope="session")
def ck_recipe():
    """:func:`checkpoint_recipe`, for tests that build recipes themselves."""
    return checkpoint_recipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("ck-data"), n_train=24, n_eval=2)


@pytest.fixture(scope="module")
def make_trainer(data_dir):
    def make(out: Path, **sections) -> Trainer:
        return Trainer(recipe_from_dict(checkpoint_recipe(data_dir, out, **sections)), quiet=True)
    return make


@pytest.fixture(scope="module")
def finished_run(make_trainer, tmp_path_factory) -> Path:
    """A 3-step run with a checkpoint after steps 1 and 2 (the last step writes the final adapter)."""
    out = tmp_path_factory.mktemp("ck-run")
    make_trainer(out).train()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out
