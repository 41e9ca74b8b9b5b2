"""The engine interface: the local engine and DeepSpeed's ZeRO engine both implement it, take the same steps
through it (one process, ZeRO-2: the same losses and LoRA weights), and each refuses the other's checkpoint;
ZeRO's part of a checkpoint is DeepSpeed's own sharded checkpoint with its ``latest`` file, staged and cleaned
up, from which a fresh engine continues exactly."""
from __future__ import annotations

import pytest
import torch
from helpers import ds_config, tiny_recipe_dict

from peftlab.adapters.peft_format import lora_state_dict
from peftlab.engine.deepspeed import ZeroEngine, join_for_deepspeed
from peftlab.engine.interface import Engine
from peftlab.engine.local import LocalEngine
from peftlab.errors import PeftlabError
from peftlab.model.load import build_model
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets
from peftlab.recipe.parse import recipe_from_dict

pytestmark = pytest.mark.xdist_group("deepspeed")


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(3, 200, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _model(recipe):
    torch.manual_seed(11)
    loaded = build_model(recipe)
    for name, p in loaded.model.named_parameters():  # B = 0 at init: give both weights a gradient at step 1
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return loaded.model


def _steps(engine: Engine, batches) -> list[float]:
    losses = []
    for b in batches:
        engine.model.train()
        loss = causal_lm_loss(engine.model, b, normalizer=float(count_targets(b)), settings=LossSettings("torch"))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def test_local_and_zero_engines_take_the_same_steps_and_zero_resumes_from_its_own_part(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", quantization={"mode": "none"}, adapter={"r": 4, "alpha": 8},
                           train={"lr": 1e-2, "max_steps": 6})
    raw["deepspeed"] = ds_config("zero2")
    recipe = recipe_from_dict(raw)
    join_for_deepspeed(recipe, torch.float32)  # a private process group of size 1
    cpu = torch.device("cpu")
    local = LocalEngine(_model(recipe), recipe.train, 6, cpu)
    zero = ZeroEngine(_model(recipe), recipe, 6, cpu, torch.float32)
    assert isinstance(local, Engine) and isinstance(zero, Engine)
    batches = _batches()
    torch.testing.assert_close(torch.tensor(_steps(zero, batches[:2])), torch.tensor(_steps(local, batches[:2])),
                               rtol=1e-6, atol=0)
    assert zero.lr == pytest.approx(local.lr)
    for k, v in lora_state_dict(local.model).items():
        torch.testing.assert_close(zero.adapter_state("x")[k], v, rtol=1e-5, atol=1e-7, msg=k)

    # ZeRO's part of a checkpoint: DeepSpeed's sharded checkpoint + latest, staged under the root and removed
    ck = tmp_path / "step-0000002"
    with zero.checkpoint_part(tmp_path / ".ds-staging-step-0000002") as part:
        assert part["deepspeed/latest"] == b"engine"
        assert any("optim_states" in name for name in part) and any("model_states" in name for name in part)
        for name, data in part.items():
            (ck / name).parent.mkdir(parents=True, exist_ok=True)
            (ck / name).write_bytes(data)
    assert not (tmp_path / ".ds-staging-step-0000002").exists()
    state, weights = zero.state_dict(), zero.adapter_state("x")
    assert state == {"engine": "deepspeed", "zero_stage": 2, "global_steps": 2}
    with pytest.raises(PeftlabError, match="written under DeepSpeed"):
        local.restore(ck, weights, state)
    resumed = ZeroEngine(_model(recipe), recipe, 6, cpu, torch.float32)
    with pytest.raises(PeftlabError, match="written by the single-process engine"):
        resumed.restore(ck, weights, local.state_dict())
    with pytest.raises(PeftlabError, match="holds no deepspeed/ directory"):
        resumed.restore(tmp_path / "empty", weights, state)
    resumed.restore(ck, {}, state)  # everything comes from deepspeed/
    assert all(torch.equal(resumed.adapter_state("x")[k], v) for k, v in weights.items())
    assert resumed.lr == zero.lr
    assert _steps(resumed, batches[2:]) == _steps(zero, batches[2:])  # and it continues exactly
