"""DeepSpeed scale-out (peftlab/engine/deepspeed.py): 2 processes under ZeRO-2/ZeRO-3 reproduce the
single-process run with the same global batch step by step, QLoRA trains under ZeRO-3, the DeepSpeed
config is filled from the recipe, and an ungathered (partitioned) adapter is never written."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ZERO_STEPS, ds_config, tiny_recipe_dict, torchrun_train, train_losses, zero_recipe_raw

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict

pytestmark = pytest.mark.xdist_group("deepspeed")

STEPS = ZERO_STEPS
recipe_raw = zero_recipe_raw


def torchrun_train_ok(tmp: Path, raw: dict) -> subprocess.CompletedProcess:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = torchrun_train(tmp, path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data_dir(zero_data):
    return zero_data  # tests/engine/conftest.py: the data of the shared 2-process runs


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """The reference: one process, global batch 2 x 2 (micro-batch 2, accumulation 2)."""
    from peftlab.trainer.loop import Trainer

    out = tmp_path_factory.mktemp("single")
    Trainer(recipe_from_dict(recipe_raw(data_dir, out, grad_accum=2)), quiet=True).train()
    return out


# ---- 2 processes match 1 process -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_single_process_step_by_step(stage, zero_run, single_run):
    out = zero_run(stage)  # recipe_raw(data_dir, out, grad_accum=1, deepspeed=ds_config(stage)) on 2 ranks
    expected, got = train_losses(single_run), train_losses(out)
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    ref, ours = adapter_tensors(single_run), adapter_tensors(out)
    assert ours.keys() == ref.keys() and len(ours) == 14 * 2
    # Two ranks sum gradients in another order (fp32 rounding, ~1e-7 relative); Adam divides each element
    # by its own gradient scale, which amplifies that rounding for elements whose gradient is near zero.
    # After 10 steps: per-tensor relative error ~1e-5, single elements up to ~2e-5 absolute (weights ~0.06).
    for key in ref:
        assert ours[key].shape == ref[key].shape and ours[key].abs().max() > 0, key
        assert float((ours[key] - ref[key]).norm() / ref[key].norm()) < 1e-4, key
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=5e-5, msg=key)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


@pytest.mark.slow
def test_qlora_under_zero3_trains_and_saves_an_adapter_peft_loads(data_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from peftlab.model.load import load_base_model

    out = tmp_path / "out"
    raw = recipe_raw(data_dir, out, grad_accum=1, deepspeed=ds_config("zero3"),
                     quant={"mode": "nf4", "quant_storage": "float32"})
    raw["train"]["max_steps"] = 4
    torchrun_train_ok(tmp_path, raw)
    losses = train_losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    tensors = adapter_tensors(out)
    assert len(tensors) == 28 and all(t.numel() > 0 for t in tensors.values())
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), "LoRA B never trained"
    recipe = recipe_from_dict(raw)
    base = load_base_model(recipe.model.name, dtype=torch.float32, device=torch.device("cpu"),
                           quant=recipe.quantization)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == 28
    for key, value in loaded.items():
        saved = key.replace(".default", "")
        torch.testing.assert_close(value, tensors[saved], rtol=0, atol=0)


# ---- the guard against ungathered adapters --------------------------------------------------------


def test_guard_refuses_a_partitioned_ungathered_adapter(data_dir, tmp_path, monkeypatch):
    """ZeRO-3 in one process still partitions: the raw state dict holds empty tensors; gathered it is whole."""
    from peftlab.adapters.peft_format import lora_state_dict
    from peftlab.engine.deepspeed import check_adapter_tensors, gathered_adapter_state
    from peftlab.trainer.loop import Trainer

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    trainer = Trainer(recipe_from_dict(recipe_raw(data_dir, tmp_path / "out", grad_accum=1,
                                                  deepspeed=ds_config("zero3"))), quiet=True)
    raw_state = lora_state_dict(trainer.model)
    assert raw_state and all(t.numel() == 0 for t in raw_state.values())
    with pytest.raises(PeftlabError, match=r"tensors are empty .*must be gathered before saving"):
        check_adapter_tensors(raw_state, where="ckpt")
    gathered = gathered_adapter_state(trainer.model)
    check_adapter_tensors(gathered)
    assert all(t.numel() > 0 for t in gathered.values())
    # the start-up line's counts: partitioned parameters count their whole size (ds_numel), not 0
    from peftlab.model.load import count_parameters

    trainable, total = count_parameters(trainer.model)
    assert trainable == sum(t.numel() for t in gathered.values()) > 0
    assert total == sum(int(p.ds_numel) for p in trainer.model.parameters()) > trainable
    # the engine's adapter state is the gathered one (checked), and the trainer's save path writes it
    engine_state = trainer.engine.adapter_state("adapter")
    assert engine_state.keys() == gathered.keys() and all(torch.equal(engine_state[k], gathered[k]) for k in gathered)
    trainer.save_adapter(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == gathered.keys() and all(torch.equal(saved[k], gathered[k]) for k in gathered)


def test_guard_refuses_empty_and_all_zero_adapters():
    from peftlab.engine.deepspeed import check_adapter_tensors

    with pytest.raises(PeftlabError, match="holds no LoRA tensors"):
        check_adapter_tensors({})
    zeros = {"base_model.model.l.lora_A.weight": torch.zeros(2, 4), "base_model.model.l.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(PeftlabError, match="all zeros .*lora_A"):
        check_adapter_tensors(zeros)
    fresh = {"base_model.model.l.lora_A.weight": torch.ones(2, 4), "base_model.model.l.lora_B.weight": torch.zeros(4, 2)}
    check_adapter_tensors(fresh)  # a fresh adapter (B = 0) is legitimate


# ---- the DeepSpeed config comes from the recipe ----------------------------------------------------


def _recipe_with(tmp_path: Path, data_dir: Path, config: dict, **train) -> object:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    raw = tiny_recipe_dict(data_dir, tmp_path / "out", train=train)
    raw["deepspeed"] = str(path)
    return recipe_from_dict(raw)


def test_auto_values_are_filled_from_the_recipe(tmp_path, data_dir):
    from peftlab.engine.deepspeed import deepspeed_config

    shipped = json.loads(Path(ds_config("zero3-offload")).read_text())
    recipe = _recipe_with(tmp_path, data_dir, shipped, micro_batch_size=3, grad_accum=5, max_grad_norm=0.5)
    cfg = deepspeed_config(recipe, world_size=4, compute_dtype=torch.float32, hidden_size=128)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 3 * 5 * 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 128 * 128 and z["stage3_param_persistence_threshold"] == 1280
    assert z["offload_optimizer"]["device"] == "cpu" and cfg["managed_gradient_accumulation"] is False


@pytest.mark.parametrize("config, train, message", [
    ({"train_micro_batch_size_per_gpu": 8}, {"micro_batch_size": 4},
     r"train_micro_batch_size_per_gpu=8 conflicts with the recipe's train.micro_batch_size=4"),
    ({"gradient_accumulation_steps": 2}, {"grad_accum": 4},
     r"gradient_accumulation_steps=2 conflicts with the recipe's train.grad_accum=4"),
    ({"gradient_clipping": 0.3}, {"max_grad_norm": 1.0}, r"gradient_clipping=0.3 conflicts .*train.max_grad_norm=1.0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {"lr": 2e-4},
     r"optimizer.params.lr=0.001 conflicts with the recipe's train.lr=0.0002"),
    ({"optimizer": {"type": "Lamb"}}, {}, r"optimizer.type=\"Lamb\" conflicts .*train.optimizer='adamw'"),
    ({"bf16": {"enabled": True}}, {}, r"bf16.enabled=true: .*model.dtype"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, r"remove \"scheduler\""),
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, {}, r"zero_optimization.sub_group_size=\"auto\""),
])
def test_conflicting_config_values_are_errors_naming_both(tmp_path, data_dir, config, train, message):
    from peftlab.engine.deepspeed import deepspeed_config

    recipe = _recipe_with(tmp_path, data_dir, config, **train)
    with pytest.raises(PeftlabError, match=message):
        deepspeed_config(recipe, world_size=2, compute_dtype=torch.float32)


def test_qlora_zero3_refuses_a_storage_dtype_other_than_the_compute_dtype(tmp_path, data_dir):
    from peftlab.engine.deepspeed import check_recipe_for_deepspeed

    raw = tiny_recipe_dict(data_dir, tmp_path / "out", quantization={"mode": "nf4", "quant_storage": "uint8"})
    raw["deepspeed"] = ds_config("zero3")
    with pytest.raises(PeftlabError, match=r"quantization.quant_storage=uint8 .*ZeRO-3.*quant_storage: float32"):
        check_recipe_for_deepspeed(recipe_from_dict(raw), torch.float32)
    raw["deepspeed"] = ds_config("zero2")  # ZeRO-2 does not partition weights: uint8 storage is fine
    check_recipe_for_deepspeed(recipe_from_dict(raw), torch.float32)


def test_a_missing_config_file_names_the_shipped_ones(tmp_path, data_dir):
    from peftlab.engine.deepspeed import read_deepspeed_json

    raw = tiny_recipe_dict(data_dir, tmp_path / "out")
    raw["deepspeed"] = "nope/zero9.json"
    with pytest.raises(PeftlabError, match=r"no such file .* name one of those shipped with peftlab: zero1, zero2, "
                                           r"zero2-offload, zero3, zero3-offload \(e.g. deepspeed: zero2\)"):
        read_deepspeed_json(recipe_from_dict(raw))
