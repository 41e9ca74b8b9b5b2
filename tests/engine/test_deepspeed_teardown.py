"""ZeRO-3 in this process (peftlab/engine/deepspeed.py): DeepSpeed replaces torch.nn.functional.linear process-wide
for the run ("until manually reset"); closing the engine — and a failed engine build — puts the original back.
(tests/conftest.py restores it after every test anyway: the checks are inside the test bodies.)"""
from __future__ import annotations

import pytest
import torch
from helpers import ds_config, make_quickstart_data, tiny_recipe_dict
from torch import nn

from peftlab.engine import deepspeed as ds_engine
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer import setup as loop_setup
from peftlab.trainer.loop import train

pytestmark = pytest.mark.xdist_group("deepspeed")

CPU = torch.device("cpu")


def _zero3(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, its own process group
        monkeypatch.delenv(key, raising=False)
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 2, "grad_accum": 1, "micro_batch_size": 2})
    raw["deepspeed"] = ds_config("zero3")
    recipe = recipe_from_dict(raw)
    ds_engine.join_for_deepspeed(recipe, torch.float32)
    return recipe


def test_closing_a_zero3_engine_restores_functional_linear(tmp_path, monkeypatch):
    original = torch.nn.functional.linear
    recipe = _zero3(tmp_path, monkeypatch)
    torch.manual_seed(0)
    engine = ds_engine.ZeroEngine(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)), recipe, 2, CPU,
                                  torch.float32)
    assert torch.nn.functional.linear is not original  # the run trains through DeepSpeed's wrapper
    engine.backward(engine.model(torch.randn(2, 8)).pow(2).sum())
    assert engine.step().skipped is False
    engine.close()
    assert torch.nn.functional.linear is original
    engine.close()  # twice is harmless
    assert torch.nn.functional.linear is original
    assert engine.model(torch.randn(2, 8)).shape == (2, 1)  # the model still runs (its weights gathered by hooks)


def test_a_failed_zero3_engine_build_restores_functional_linear(tmp_path, monkeypatch):
    original = torch.nn.functional.linear
    recipe = _zero3(tmp_path, monkeypatch)

    def fail(model):
        raise RuntimeError("registering external parameters failed")

    monkeypatch.setattr(ds_engine, "_register_lora_external_params", fail)  # after deepspeed.initialize
    with pytest.raises(RuntimeError, match="registering external parameters failed"):
        ds_engine.ZeroEngine(nn.Sequential(nn.Linear(8, 1)), recipe, 2, CPU, torch.float32)
    assert torch.nn.functional.linear is original


@pytest.mark.parametrize("fail", [False, True])
def test_a_zero3_run_through_the_library_api_leaves_functional_linear_as_it_was(tmp_path, monkeypatch, fail):
    """peftlab.train with ZeRO-3 in this process, finished or failed (a simulated OOM at step 1): the Trainer closes
    its engine, so the rest of the process computes F.linear without DeepSpeed."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    if fail:
        monkeypatch.setenv("PEFTLAB_TEST_OOM_AT", "0:1")
    data = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=2)
    raw = tiny_recipe_dict(data, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 1, "grad_accum": 1, "micro_batch_size": 2, "eval_at_start": False})
    raw["deepspeed"] = ds_config("zero3")
    original = torch.nn.functional.linear
    if fail:
        with pytest.raises(Exception, match="(?i)memory"):
            train(recipe_from_dict(raw), quiet=True)
    else:
        train(recipe_from_dict(raw), quiet=True)
    assert torch.nn.functional.linear is original


def test_a_zero3_run_that_fails_while_it_is_built_leaves_functional_linear_as_it_was(tmp_path, monkeypatch):
    """The engine is built, then the run's construction fails (here: continuing metrics.jsonl): the half-built
    Trainer closes its engine before the error goes on."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    data = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=2)
    raw = tiny_recipe_dict(data, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 1, "grad_accum": 1, "micro_batch_size": 2, "eval_at_start": False})
    raw["deepspeed"] = ds_config("zero3")
    original = torch.nn.functional.linear

    def refuse(*args, **kwargs):
        assert torch.nn.functional.linear is not original  # the engine is built: DeepSpeed's wrapper is in
        raise RuntimeError("metrics.jsonl cannot be continued")

    monkeypatch.setattr(loop_setup, "continue_metrics", refuse)
    with pytest.raises(RuntimeError, match="cannot be continued"):
        train(recipe_from_dict(raw), quiet=True)
    assert torch.nn.functional.linear is original
