"""Freezing: adapters only on chosen layers (ranges, top-k), unfrozen base modules with their own lr,
and LoRA+ (B matrices at ratio x lr) — checked on the gradients and on real optimizer updates."""
from __future__ import annotations

import pytest
import torch

from peftlab.adapters.freezing import optimizer_param_groups, parse_layers, resolve_layers, unfreeze_modules
from peftlab.adapters.lora_inject import lora_modules
from peftlab.engine.local import LocalEngine
from peftlab.errors import PeftlabError
from peftlab.model.load import build_model
from peftlab.recipe.parse import recipe_from_dict


def _recipe(tmp_path, **adapter):
    raw = {"model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
           "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, **adapter},
           "data": {"train": [str(tmp_path / "unused.jsonl")]},
           "train": {"lr": 1e-3, "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": None},
           "output": {"dir": str(tmp_path / "out")}}
    return recipe_from_dict(raw)


def _loss(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    return model(input_ids=ids, labels=ids).loss


def test_layer_specs_parse_and_resolve(tmp_path):
    assert parse_layers(["0..2", 5, "7-8"]) == [0, 1, 2, 5, 7, 8]
    assert parse_layers("16..18") == [16, 17, 18] and parse_layers("top:8") == "top:8"
    for bad in (["3..1"], ["a"], [-1]):
        with pytest.raises(ValueError):
            parse_layers(bad)
    r = _recipe(tmp_path, layers="top:1")
    resolve_layers(r)
    assert r.adapter.layers == [1]  # micro-llama has 2 layers
    r = _recipe(tmp_path, layers="bottom:1")
    resolve_layers(r)
    assert r.adapter.layers == [0]
    with pytest.raises(PeftlabError, match=r"\[5\] do not exist.*layers 0..1"):
        resolve_layers(_recipe(tmp_path, layers=[1, 5]))
    with pytest.raises(PeftlabError, match="adapter.layers"):
        recipe_from_dict({"data": {"train": ["x.jsonl"]}, "adapter": {"layers": ["16...x"]}})


def test_frozen_layers_get_no_adapters_and_no_gradients(tmp_path):
    r = _recipe(tmp_path, layers=["1..1"], unfreeze=["embeddings"], unfreeze_lr=1e-5)
    resolve_layers(r)
    model = build_model(r).model
    assert lora_modules(model) and all(".layers.1." in n for n in lora_modules(model))
    unfrozen = unfreeze_modules(model, r.adapter.unfreeze)
    assert list(unfrozen) == ["model.embed_tokens"]
    _loss(model).backward()
    for name, p in model.named_parameters():
        trained = ("lora_" in name and ".layers.1." in name) or name.startswith("model.embed_tokens")
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
        if "lora_B" in name or name.startswith("model.embed_tokens"):
            assert p.grad.abs().max() > 0, name
    groups = optimizer_param_groups(model, r.adapter, r.train.lr, unfrozen)
    by_name = {g["name"]: g for g in groups}
    assert by_name["unfrozen"]["lr"] == pytest.approx(1e-5) and by_name["adapters"]["lr"] == 1e-3
    assert by_name["unfrozen"]["params"] == [model.model.embed_tokens.weight]
    with pytest.raises(PeftlabError, match="no module 'nonexistent'"):
        unfreeze_modules(model, ["nonexistent"])


def test_loraplus_gives_b_its_own_learning_rate_in_real_updates(tmp_path):
    r = _recipe(tmp_path, loraplus_lr_ratio=16.0)
    model = build_model(r).model
    for m in lora_modules(model).values():  # non-zero B so A has gradients in the first step
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    groups = optimizer_param_groups(model, r.adapter, r.train.lr)
    engine = LocalEngine(model, r.train, total_steps=10, device=torch.device("cpu"), param_groups=groups)
    assert [(g["name"], g["lr"]) for g in engine.optimizer.param_groups] == [("adapters", 1e-3), ("lora_B", 1.6e-2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _loss(model).backward()
    engine.step()
    # Adam's first step moves every weight with a non-zero gradient by lr (x sign): B by 16x as much as A
    for n, p in model.named_parameters():
        if p.requires_grad:
            step = (p.detach() - before[n]).abs().max().item()
            assert step == pytest.approx(1.6e-2 if "lora_B" in n else 1e-3, rel=1e-3), n
    # the per-group rates survive a checkpoint reload (recomputed from lr_scale)
    state = engine.state_dict()
    engine2 = LocalEngine(model, r.train, total_steps=10, device=torch.device("cpu"),
                          param_groups=optimizer_param_groups(model, r.adapter, r.train.lr))
    engine2.load_state_dict(state)
    assert [g["lr"] for g in engine2.optimizer.param_groups] == [1e-3, 1.6e-2]
    # without LoRA+: one group at train.lr
    plain = optimizer_param_groups(model, _recipe(tmp_path).adapter, 1e-3)
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3
