"""What a run's checkpoint holds: the PEFT adapter, the resolved recipe, engine.pt, rng.pt, trainer_state.json
and recipe.yaml, in the order the kill points count them; the engine's own part rides along (DeepSpeed's
staged shards); a failure on rank 0 reaches every rank; only rank 0 writes."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.adapters.peft_format import lora_state_dict, read_adapter_config
from peftlab.checkpoint import save as save_mod
from peftlab.checkpoint import store as ckpt
from peftlab.checkpoint.resume import load_checkpoint
from peftlab.checkpoint.save import run_files, save_checkpoint
from peftlab.errors import PeftlabError

pytestmark = pytest.mark.xdist_group("trainer")

ORDER = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/peftlab_recipe.yaml",
         "engine.pt", "rng.pt", "trainer_state.json", "recipe.yaml"]


def test_checkpoint_contents(finished_run):
    root = finished_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]
    marker = json.loads((root / "step-0000002" / ckpt.MARKER).read_text())
    assert sorted(marker["files"]) == sorted(ORDER)
    c = load_checkpoint(root / "step-0000002")
    assert c.trainer_state["step"] == 2 and c.trainer_state["micro_index"] == 2
    assert 0 < c.trainer_state["n_train"] <= 24 and c.trainer_state["total_steps"] == 3  # rows past max_seq_len drop
    assert set(c.engine_state) == {"optimizer", "scheduler", "scaler"}
    assert c.engine_state["scheduler"]["last_epoch"] == 2
    assert set(c.rng) == {"python", "numpy", "torch", "cuda"}
    assert c.recipe["train"]["seed"] == 7 and c.recipe["checkpoint"]["keep_last"] == 3
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in c.adapter_weights)
    assert read_adapter_config(root / "step-0000002" / "adapter")["r"] == 8  # a PEFT-format adapter
    resolved = yaml.safe_load((root / "step-0000002" / "adapter" / "peftlab_recipe.yaml").read_text())
    assert resolved["model"]["dtype"] == "float32" and c.recipe["model"]["dtype"] == "auto"


def test_files_are_written_in_the_order_the_kill_points_count(make_trainer, tmp_path, monkeypatch):
    """test_resume.py kills runs at ``save-N-file-K``: K counts the files in this order."""
    t = make_trainer(tmp_path / "o", train={"max_steps": 1})
    written, real = [], ckpt.write_file
    monkeypatch.setattr(ckpt, "write_file", lambda path, data: (written.append(path), real(path, data)))
    path = t.save_checkpoint()
    names = [p.relative_to(p.parents[0 if p.parent.name != "adapter" else 1]).as_posix() for p in written]
    assert names[:-1] == ORDER and names[-1].startswith(f".{ckpt.MARKER}.tmp-")  # the marker goes last
    assert path.name == "step-0000000" and ckpt.verify(path) is None


class _Engine:
    """An engine with a part of its own (as DeepSpeed's staged shards) and a scripted adapter state."""

    def __init__(self, model, part: dict[str, bytes]):
        self.model, self.part, self.staging_seen = model, part, None

    def adapter_state(self, where: str) -> dict[str, torch.Tensor]:
        return {k: v + 1 for k, v in lora_state_dict(self.model).items()}  # what a gather would return

    @contextlib.contextmanager
    def checkpoint_part(self, staging: Path):
        self.staging_seen = staging
        yield self.part


def test_the_engines_part_and_its_adapter_state_are_written(make_trainer, tmp_path):
    t = make_trainer(tmp_path / "o", train={"max_steps": 1})
    engine = _Engine(t.model, {"deepspeed/engine/shard.pt": b"rank0", "deepspeed/latest": b"engine"})
    files = {"engine.pt": b"e", "trainer_state.json": b"{}"}
    root = tmp_path / "ck"
    path = save_checkpoint(root, 5, model=t.model, engine=engine, base_model_name_or_path="builtin:micro-llama",
                           files=lambda: files, keep_last=None)
    assert path == root / "step-0000005" and ckpt.verify(path) is None
    assert engine.staging_seen == root / ".ds-staging-step-0000005"
    assert (path / "deepspeed" / "latest").read_bytes() == b"engine"
    listed = json.loads((path / ckpt.MARKER).read_text())["files"]
    assert sorted(listed) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                              "deepspeed/engine/shard.pt", "deepspeed/latest", "engine.pt", "trainer_state.json"]
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    for k, v in lora_state_dict(t.model).items():  # the engine's (gathered) tensors, not the model's own
        assert torch.equal(saved[k], v + 1)


def test_rank_0_failure_is_raised_and_other_ranks_are_told(make_trainer, tmp_path, monkeypatch):
    t = make_trainer(tmp_path / "o", train={"max_steps": 1})

    def fail(*a, **kw):
        raise PeftlabError("disk says no")

    monkeypatch.setattr(save_mod, "write_checkpoint", fail)
    with pytest.raises(PeftlabError, match="disk says no"):
        t.save_checkpoint()
    # another rank: nothing to write itself, but the all-reduced flag says rank 0 failed
    monkeypatch.setattr(save_mod, "is_main_process", lambda: False)
    monkeypatch.setattr(save_mod, "all_reduce_sum", lambda value: value + 1)
    with pytest.raises(PeftlabError, match=r"rank 0 could not write checkpoint step-0000000 into .* \(see its error\)"):
        t.save_checkpoint()
    assert not (tmp_path / "o" / "checkpoints").exists() or not list((tmp_path / "o" / "checkpoints").iterdir())


def test_run_files_capture_the_rng_at_the_time_of_the_save():
    torch.manual_seed(1)
    files = run_files(resolved_recipe={"a": 1}, recipe={"b": 2}, engine_state={"x": torch.ones(2)},
                      trainer_state={"step": 3})
    assert list(files) == ORDER[2:]
    import io

    rng = torch.load(io.BytesIO(files["rng.pt"]), weights_only=True)
    assert torch.equal(rng["torch"], torch.random.manual_seed(1).get_state())
    assert json.loads(files["trainer_state.json"]) == {"step": 3}
    assert yaml.safe_load(files["recipe.yaml"]) == {"b": 2}
