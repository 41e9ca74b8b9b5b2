"""Checkpoints under DeepSpeed go through DeepSpeed's own sharded checkpoint: a 2-process ZeRO run killed
after a checkpoint and resumed with `resume: auto` continues with the same per-step losses as an
uninterrupted 2-process run (optimizer partitions, scheduler and adapter restored on every rank), the
checkpoint's COMPLETE marker lists and hashes every file of DeepSpeed's checkpoint, and DeepSpeed's own
zero_to_fp32 converts it without a tag (the `latest` file).

The uninterrupted run is tests/engine/conftest.py's ``zero_run`` (the same recipe without checkpoints, shared with
test_deepspeed.py): the resumed run must match it, so writing checkpoints must not change the training either."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ZERO_STEPS, ds_config, torchrun_train, train_losses, zero_recipe_raw

from peftlab.checkpoint import store as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deepspeed")]

STEPS, SAVE_EVERY, KILL_AT = ZERO_STEPS, 2, "step-5"   # killed in step 5: resumes from the checkpoint of step 4


def _recipe(tmp: Path, data: Path, out: Path, stage: str) -> Path:
    """zero_run's recipe, plus a checkpoint every SAVE_EVERY steps."""
    raw = zero_recipe_raw(data, out, grad_accum=1, deepspeed=ds_config(stage), save_every=SAVE_EVERY)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_killed_zero_run_resumes_with_the_losses_of_an_uninterrupted_run(stage, zero_data, zero_run, tmp_path):
    ref = zero_run(stage)

    out = tmp_path / "out"
    recipe = _recipe(tmp_path, zero_data, out, stage)
    killed = torchrun_train(tmp_path, recipe, PEFTLAB_TEST_KILL_AT=KILL_AT)
    assert killed.returncode != 0, "the kill hook did not stop the run"
    root = out / "checkpoints"
    complete, _ = ckpt.scan(root)
    assert [step for _, step in complete] == [2, 4]
    newest = complete[-1][0]
    assert ckpt.verify(newest) is None
    listed = json.loads((newest / ckpt.MARKER).read_text())["files"]
    ds_files = sorted(k for k in listed if k.startswith("deepspeed/"))
    on_disk = sorted(p.relative_to(newest).as_posix() for p in (newest / "deepspeed").rglob("*") if p.is_file())
    assert ds_files and ds_files == on_disk, "every file of DeepSpeed's checkpoint is covered by COMPLETE"
    # one optimizer partition per rank, and the gathered (whole, non-empty) adapter beside them
    assert sum("optim_states" in k for k in ds_files) == 2, ds_files
    from safetensors.torch import load_file

    adapter = load_file(str(newest / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 28 and all(t.numel() > 0 for t in adapter.values())
    assert not [p for p in root.iterdir() if p.name.startswith(".ds-staging-")], "staging directory left behind"
    # DeepSpeed's own converter reads the tag from `latest` (listed and hashed in COMPLETE like the rest):
    # without --tag it reconstructs, from the ranks' optimizer partitions, exactly the adapter weights.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    assert "deepspeed/latest" in listed and (newest / "deepspeed" / "latest").read_text() == "engine"
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(newest / "deepspeed"))
    lora = {f"base_model.model.{k}": v for k, v in fp32.items() if "lora_" in k}
    assert lora.keys() == adapter.keys()
    for key, value in adapter.items():
        assert torch.equal(lora[key], value), key

    resumed = torchrun_train(tmp_path, recipe, "--set", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, got = train_losses(ref), train_losses(out)
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=0)
