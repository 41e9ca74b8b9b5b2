"""Fixtures of the trainer tests: short fp32 runs of the micro model on generated quickstart data."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_quickstart_data, short_run_recipe

from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer


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
