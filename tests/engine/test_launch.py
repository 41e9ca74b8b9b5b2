"""``peftlab launch`` (peftlab/engine/launch.py): hostfile checks, a two-node run on loopback with --no-ssh,
and a missing node reported by rank within the preflight timeout instead of a hang."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ds_config, free_port, make_quickstart_data, subprocess_env, tiny_recipe_dict

from peftlab.engine.launch import deepspeed_command, read_hostfile
from peftlab.errors import PeftlabError

pytestmark = pytest.mark.xdist_group("deepspeed")

HOSTFILE = "localhost slots=1\n127.0.0.1 slots=1\n"  # two "nodes" that are both this machine


def write_recipe(tmp: Path, steps: int = 3) -> Path:
    data = make_quickstart_data(tmp / "data", n_train=24, n_eval=4)
    raw = tiny_recipe_dict(data, tmp / "out", quantization={"mode": "none"},
                           train={"max_steps": steps, "grad_accum": 1, "micro_batch_size": 2, "eval_at_start": False},
                           output={"report_to": ["jsonl"], "plot": False}, eval={"metric": "loss"})
    raw["deepspeed"] = ds_config("zero2")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp / "hostfile").write_text(HOSTFILE)
    return path


def launch_cmd(recipe: Path, node_rank: int, port: int, timeout_s: float) -> list[str]:
    return [sys.executable, "-P", "-m", "peftlab.cli.main", "launch", str(recipe), "--hostfile",
            str(recipe.parent / "hostfile"), "--no-ssh", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--preflight-timeout", str(timeout_s)]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_to_completion(tmp_path):
    recipe = write_recipe(tmp_path)
    port = free_port()
    env = subprocess_env()
    nodes = [subprocess.Popen(launch_cmd(recipe, r, port, 60), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert "dist_world_size=2" in outs[0]


@pytest.mark.slow
@pytest.mark.parametrize("present, missing_message", [
    (0, r"node rank\(s\) 1 \(127.0.0.1\) did not join within 4s"),
    (1, r"node rank 1: node rank 0 \(localhost\) is missing"),
])
def test_a_missing_node_is_named_within_the_preflight_timeout(tmp_path, present, missing_message):
    import re

    recipe = write_recipe(tmp_path)
    t0 = time.monotonic()
    proc = subprocess.run(launch_cmd(recipe, present, free_port(), 4), cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(missing_message, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert elapsed < 4 + 30  # the timeout plus interpreter/recipe start-up, never a hang
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_hostfile_errors_name_the_line(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("# nodes\nnode-1 slots=8\nnode-2 8\n")
    with pytest.raises(PeftlabError, match=r"hosts:3: expected 'HOSTNAME slots=N'"):
        read_hostfile(bad)
    bad.write_text("node-1 slots=8\nnode-1 slots=8\n")
    with pytest.raises(PeftlabError, match=r"hosts:2: host 'node-1' is listed twice"):
        read_hostfile(bad)
    with pytest.raises(PeftlabError, match="no such file"):
        read_hostfile(tmp_path / "absent")
    bad.write_text("node-1 slots=8\n\nnode-2 slots=4  # second\n")
    assert [(h.name, h.slots) for h in read_hostfile(bad)] == [("node-1", 8), ("node-2", 4)]


def test_unresolvable_host_and_missing_deepspeed_key_are_clear_errors(tmp_path):
    from peftlab.engine.launch import launch

    recipe = write_recipe(tmp_path)
    (tmp_path / "hostfile").write_text("localhost slots=1\nno-such-node.invalid slots=1\n")
    with pytest.raises(PeftlabError, match=r"do not resolve .*no-such-node.invalid \(.*hostfile:2"):
        launch(str(recipe), hostfile=str(tmp_path / "hostfile"), no_ssh=True, node_rank=0)
    raw = yaml.safe_load(recipe.read_text())
    raw.pop("deepspeed")
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(PeftlabError, match="has no 'deepspeed' key"):
        launch(str(recipe), hostfile=str(tmp_path / "hostfile"), no_ssh=True, node_rank=0)


def test_the_deepspeed_command_for_ssh_and_no_ssh():
    ssh = deepspeed_command("r.yaml", hostfile="h", no_ssh=False, node_rank=0, nproc_per_node=8,
                            master_addr="n1", master_port=29500, launcher="openmpi", overrides=["train.lr=1e-4"])
    assert ssh[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert ["--launcher", "openmpi"] == ssh[ssh.index("--launcher"):ssh.index("--launcher") + 2]
    assert ssh[-5:] == ["peftlab.cli.main", "train", "r.yaml", "--set", "train.lr=1e-4"]
    assert "--num_gpus" in ssh and "--no_ssh" not in ssh
    local = deepspeed_command("r.yaml", hostfile="h", no_ssh=True, node_rank=1, nproc_per_node=None,
                              master_addr="n1", master_port=29500, launcher="pdsh", overrides=[])
    assert local[local.index("--node_rank") + 1] == "1" and "--no_ssh" in local and "--num_gpus" not in local


def test_launch_says_and_runs_the_deepspeed_command(tmp_path, monkeypatch, caplog):
    import logging

    from peftlab.engine import launch as launch_module

    recipe = write_recipe(tmp_path)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    calls = []
    monkeypatch.setattr(launch_module.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 7)
    monkeypatch.delenv("PEFTLAB_JOIN_TIMEOUT", raising=False)
    with caplog.at_level(logging.INFO, logger="peftlab"):
        code = launch_module.launch(str(recipe), hostfile=str(tmp_path / "hostfile"), preflight_timeout=30,
                                    overrides=["train.lr=1e-3"])
    assert code == 7  # the launcher's exit status
    [(cmd, env)] = calls
    assert cmd == deepspeed_command(str(recipe), hostfile=str(tmp_path / "hostfile"), no_ssh=False, node_rank=0,
                                    nproc_per_node=None, master_addr="localhost", master_port=29500,
                                    launcher="pdsh", overrides=["train.lr=1e-3"])
    assert (env["PYTHONSAFEPATH"], env["PEFTLAB_JOIN_TIMEOUT"]) == ("1", "30")
    assert [r.getMessage() for r in caplog.records if r.name == "peftlab.engine.launch"] == [
        "peftlab launch: " + " ".join(cmd)]
