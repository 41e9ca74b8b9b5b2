"""A one-process DeepSpeed run sets the launcher variables DeepSpeed reads (RANK=0, LOCAL_RANK=0, WORLD_SIZE=1) when it
joins its private process group, and takes them back when the run is over — finished, failed, or failed while it was
being built. Left behind, they told accelerate (under TRL's and HF's trainers, later in the same process) that the
process was a rank of a launched job: ``LOCAL_RANK`` set on a CPU machine makes it a MULTI_CPU run.
(tests/conftest.py restores these variables after every test anyway: the checks are inside the test bodies.)"""
from __future__ import annotations

import os

import pytest
from helpers import ds_config, make_quickstart_data, tiny_recipe_dict

from peftlab.engine import process_group
from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer, train

pytestmark = pytest.mark.xdist_group("deepspeed")

LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def _recipe(tmp_path, **model):
    data = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=2)
    raw = tiny_recipe_dict(data, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 1, "grad_accum": 1, "micro_batch_size": 2, "eval_at_start": False})
    raw["deepspeed"] = ds_config("zero2")
    raw["model"].update(model)
    return recipe_from_dict(raw)


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)


def test_a_one_process_deepspeed_run_that_fails_takes_back_the_launcher_variables_it_set(tmp_path, monkeypatch,
                                                                                         no_launcher):
    """A simulated OOM at step 1: the same ``finally`` as a finished run (test_launcher_variables_set_before_the_run_are_kept
    trains one to the end)."""
    seen: dict[str, str | None] = {}
    build_engine = Trainer.__init__.__globals__["setup"].build_engine

    def spy(*args, **kwargs):  # the variables while the run is on: DeepSpeed reads them
        seen.update({k: os.environ.get(k) for k in LAUNCHER})
        return build_engine(*args, **kwargs)

    monkeypatch.setattr(Trainer.__init__.__globals__["setup"], "build_engine", spy)
    monkeypatch.setenv("PEFTLAB_TEST_OOM_AT", "0:1")
    with pytest.raises(Exception, match="(?i)memory"):
        train(_recipe(tmp_path), quiet=True)
    assert seen == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    assert [k for k in LAUNCHER if k in os.environ] == []
    assert process_group._launcher_env_set == {}


def test_a_deepspeed_run_that_fails_while_it_is_built_takes_them_back_too(tmp_path, no_launcher):
    with pytest.raises(PeftlabError):
        Trainer(_recipe(tmp_path, name=str(tmp_path / "no-such-model")), quiet=True)
    assert [k for k in LAUNCHER if k in os.environ] == []


def test_launcher_variables_set_before_the_run_are_kept(tmp_path, monkeypatch, no_launcher):
    """A launcher's (or the user's) own RANK/WORLD_SIZE/LOCAL_RANK for a one-process job are theirs: kept as they were."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    train(_recipe(tmp_path), quiet=True)
    assert {k: os.environ.get(k) for k in LAUNCHER} == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


def test_a_variable_changed_since_the_join_is_left_as_it_is(monkeypatch, no_launcher):
    monkeypatch.setattr(process_group, "_launcher_env_set", {"RANK": "0", "LOCAL_RANK": "0"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "3")  # someone set it since
    process_group.restore_launcher_env()
    assert "RANK" not in os.environ and os.environ["LOCAL_RANK"] == "3"
    assert process_group._launcher_env_set == {}
