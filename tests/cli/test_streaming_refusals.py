"""A ``data.streaming`` recipe without ``train.max_steps`` through the commands that take a training recipe:
``peftlab train`` and ``peftlab launch`` refuse it (one message, exit status 2, nothing written, no process
started), ``peftlab estimate`` still sizes it and says in one line that ``peftlab train`` will need max_steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import ds_config, make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main
from peftlab.engine import launch as launch_module
from peftlab.engine import planner

NEEDS_MAX_STEPS = ("data.streaming: true needs train.max_steps: a streamed data set's length is unknown until it "
                   "has been read, so train.epochs (2) cannot be turned into optimizer steps. Set train.max_steps "
                   "(e.g. --set train.max_steps=1000; the stream starts a new pass when it runs out), or set "
                   "data.streaming: false")


@pytest.fixture
def streaming_recipe(tmp_path) -> Path:
    data = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=2)
    raw = tiny_recipe_dict(data, tmp_path / "out", data={"streaming": True}, train={"epochs": 2},
                           quantization={"mode": "none"})
    raw["train"].pop("max_steps")
    raw["deepspeed"] = ds_config("zero2")
    (tmp_path / "hostfile").write_text("localhost slots=1\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("command", [["train"], ["launch", "--hostfile", "HOSTFILE", "--no-ssh", "--node-rank", "0"],
                                     ["launch", "--hostfile", "HOSTFILE"]])
def test_train_and_launch_refuse_streaming_without_max_steps_before_anything_starts(
        streaming_recipe, command, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(launch_module.subprocess, "call", lambda *a, **k: started.append(a) or 0)
    monkeypatch.setattr(launch_module, "node_rendezvous", lambda **k: started.append(k))
    before = _files(streaming_recipe.parent)
    argv = [command[0], str(streaming_recipe), *command[1:]]
    argv = [str(streaming_recipe.parent / "hostfile") if a == "HOSTFILE" else a for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"peftlab: error: {NEEDS_MAX_STEPS}\n"
    assert started == []  # no rendezvous, no deepspeed launcher
    assert _files(streaming_recipe.parent) == before  # no output.dir, no data cache


def test_estimate_sizes_a_streaming_recipe_and_says_train_will_need_max_steps(streaming_recipe, capsys, monkeypatch):
    monkeypatch.setattr(planner, "_probe_baseline", lambda recipe: 300 * planner.MiB)  # no measuring subprocess
    before = _files(streaming_recipe.parent)
    args = ["estimate", str(streaming_recipe), "--device", "cpu", "--device-memory", "64GiB"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["fits"] is True  # stdout stays the estimate
    assert err.splitlines() == [f"peftlab: warning: peftlab train will refuse this recipe as it is: {NEEDS_MAX_STEPS}"]
    assert main([*args, "--set", "train.max_steps=10"]) == 0
    out, err = capsys.readouterr()
    assert "budget 64.00 GiB: fits" in out and err == ""
    assert _files(streaming_recipe.parent) == before
