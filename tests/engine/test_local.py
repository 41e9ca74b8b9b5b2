"""The local engine: clipped AdamW steps, a non-finite gradient or a caller's skip drops the update but advances
the schedule, warmup + cosine/linear schedules, a reload applies the current recipe's lr exactly as the schedule
would, and its part of a checkpoint (restore refuses a DeepSpeed checkpoint; the adapter round-trips)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftlab.engine.local import LocalEngine, build_optimizer, lr_lambda, warmup_steps
from peftlab.errors import PeftlabError


def _train(**kw):
    return SimpleNamespace(**{"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                              "optimizer": "adamw", "scheduler": "constant", "warmup_steps": 0,
                              "warmup_ratio": 0.0, "warmup_start": "update", "max_grad_norm": None, **kw})


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    m.bias.requires_grad_(False)
    return m


def _backward(model, scale: float = 1.0) -> None:
    (model(torch.ones(4, 3)).sum() * scale).backward()


def test_step_is_plain_adamw_with_clipping():
    model, ref = _model(), _model()
    engine = LocalEngine(model, _train(max_grad_norm=0.5), total_steps=10, device=torch.device("cpu"))
    opt = torch.optim.AdamW([ref.weight], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        _backward(model)
        result = engine.step()
        _backward(ref)
        norm = torch.nn.utils.clip_grad_norm_([ref.weight], 0.5)
        opt.step()
        opt.zero_grad()
        assert result.grad_norm == pytest.approx(float(norm)) and not result.skipped
        assert torch.equal(model.weight, ref.weight)
    assert model.weight.grad is None  # zeroed for the next step


def test_nonfinite_gradient_or_skip_drops_the_update_and_advances_the_schedule():
    model = _model()
    engine = LocalEngine(model, _train(scheduler="linear"), total_steps=4, device=torch.device("cpu"))
    before = model.weight.detach().clone()
    _backward(model, scale=math.inf)
    result = engine.step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert torch.equal(model.weight, before) and engine.optimizer.state == {}
    assert engine.lr == pytest.approx(0.1 * 0.75)  # the schedule moved on
    _backward(model)
    assert engine.step(skip=True).skipped and torch.equal(model.weight, before)
    assert engine.lr == pytest.approx(0.1 * 0.5)


def test_schedules_with_warmup():
    f = lr_lambda("cosine", warmup=2, total=6)
    assert [round(f(s), 6) for s in range(7)] == [0.5, 1.0, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6),
                                                   0.5, round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6), 0.0]
    assert [lr_lambda("linear", 0, 4)(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_lambda("constant", 1, 4)(3) == 1.0
    assert warmup_steps(_train(warmup_steps=None, warmup_ratio=0.03), 100) == 3
    assert warmup_steps(_train(warmup_steps=7, warmup_ratio=0.5), 100) == 7


def test_zero_warmup_start_is_transformers_schedule_step_for_step():
    """warmup_start: zero follows transformers' schedulers (TRL, Axolotl, torchtune use them) at every step: the first
    step at lr 0, the same cosine/linear afterwards; the default starts one warmup step later (no step at lr 0)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for kind, hf_schedule in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = hf_schedule(opt, num_warmup_steps=3, num_training_steps=11)
        ours = lr_lambda(kind, warmup=3, total=11, start="zero")
        for s in range(11):
            assert ours(s) == pytest.approx(hf.lr_lambdas[0](s), abs=1e-12), (kind, s)
        assert [lr_lambda(kind, 3, 11)(s) for s in range(3)] == [1 / 3, 2 / 3, 1.0]  # default: one step earlier
        assert lr_lambda(kind, 3, 11)(5) == ours(5)  # ... the same after the warmup
    with pytest.raises(ValueError, match="'update' or 'zero'"):
        lr_lambda("cosine", 3, 11, start="one")
    engine = LocalEngine(_model(), _train(scheduler="cosine", warmup_steps=2, warmup_start="zero"), total_steps=6,
                         device=torch.device("cpu"))
    assert engine.lr == 0.0  # the first step of the recipe's schedule runs at lr 0


def test_reload_applies_the_current_recipes_lr_as_the_schedule_would():
    model = _model()
    engine = LocalEngine(model, _train(scheduler="linear"), total_steps=10, device=torch.device("cpu"))
    for _ in range(3):
        _backward(model)
        engine.step()
    state = engine.state_dict()
    same = LocalEngine(_model(), _train(scheduler="linear"), total_steps=10, device=torch.device("cpu"))
    same.load_state_dict(state)
    assert same.lr == engine.lr == pytest.approx(0.1 * 0.7)
    lowered = LocalEngine(_model(), _train(scheduler="linear", lr=0.01), total_steps=10, device=torch.device("cpu"))
    lowered.load_state_dict(state)
    assert lowered.lr == pytest.approx(0.01 * 0.7)  # a resumed run may lower train.lr after a spike


def test_adamw_needs_params_and_8bit_optimizers_need_cuda():
    with pytest.raises(PeftlabError, match="nothing to train: no parameter requires grad"):
        build_optimizer([], _train(), torch.device("cpu"))
    with pytest.raises(PeftlabError, match="train.optimizer=paged_adamw_8bit needs a CUDA GPU"):
        build_optimizer([nn.Parameter(torch.ones(1))], _train(optimizer="paged_adamw_8bit"), torch.device("cpu"))


def test_checkpoint_part_restore_and_adapter(tmp_path):
    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.adapters.peft_format import lora_state_dict, read_adapter_weights
    from peftlab.model.load import load_base_model

    def lora_model():
        torch.manual_seed(1)
        model = load_base_model("builtin:micro-llama", dtype=torch.float32, device=torch.device("cpu"))
        inject_lora(model, r=2, alpha=4, dropout=0.0, kernel_backend="torch")
        return model

    model = lora_model()
    engine = LocalEngine(model, _train(lr=1e-2), total_steps=5, device=torch.device("cpu"))
    model(input_ids=torch.arange(8)[None]).logits.float().square().mean().backward()
    engine.step()
    with engine.checkpoint_part(tmp_path / "staging") as part:
        assert part == {}  # optimizer state travels in engine.pt (state_dict), weights in the adapter
    assert not (tmp_path / "staging").exists()
    weights = engine.adapter_state("x")
    assert weights.keys() == lora_state_dict(model).keys() and all(v.device.type == "cpu" for v in weights.values())
    fresh = lora_model()
    other = LocalEngine(fresh, _train(lr=1e-2), total_steps=5, device=torch.device("cpu"))
    other.restore(tmp_path, weights, engine.state_dict())
    assert all(torch.equal(lora_state_dict(fresh)[k], v) for k, v in weights.items())
    assert other.lr == engine.lr and other.optimizer.state_dict()["state"].keys() == \
        engine.optimizer.state_dict()["state"].keys()
    (tmp_path / "deepspeed").mkdir()
    with pytest.raises(PeftlabError, match="was written under DeepSpeed"):
        other.restore(tmp_path, weights, engine.state_dict())
    engine.save_adapter(tmp_path / "adapter", base_model_name_or_path="builtin:micro-llama")
    saved = read_adapter_weights(tmp_path / "adapter")
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)
