"""peftlab.model.fused_norm: the RMSNorm instances of a tiny Llama and a tiny Gemma-2 replaced per instance give
the same logits and gradients (fp32: bit for bit on the PyTorch path, at kernel tolerance with the Triton kernels
under the interpreter); unknown norm classes are left alone and named; train.fused_norm wires it into
build_model."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftlab.errors import PeftlabError
from peftlab.model.fused_norm import FusedRMSNorm, apply_fused_norm

pytestmark = pytest.mark.xdist_group("gemma2")


def _tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rms_norm_eps=1e-5))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, attn_implementation="eager"))
    with torch.no_grad():  # norm weights away from their init (ones / zeros), so the offset matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _logits_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_replacement_keeps_logits_and_gradients(family):
    ours = _tiny(family)
    theirs = copy.deepcopy(ours)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _logits_and_grads(theirs, ids)
    n_norms = 2 * 2 + 1 if family == "llama" else 2 * 4 + 1  # Gemma-2: pre/post norms around attn and MLP
    weights_before = {n: p for n, p in ours.named_parameters()}
    names = apply_fused_norm(ours, backend="torch")
    assert len(names) == n_norms
    assert sum(isinstance(m, FusedRMSNorm) for m in ours.modules()) == n_norms
    # the same Parameter objects under the same names: checkpoints, optimizers and adapters see no change
    assert {n: p for n, p in ours.named_parameters()} == weights_before
    logits, grads = _logits_and_grads(ours, ids)
    assert torch.equal(logits, ref_logits)  # the PyTorch path is transformers' op sequence
    for n, g in grads.items():
        assert torch.equal(g, ref_grads[n]), n
    # the Triton kernels (interpreter): every gradient, norm weights included, at the kernel tolerance
    for m in ours.modules():
        if isinstance(m, FusedRMSNorm):
            m.backend = "triton"
    logits, grads = _logits_and_grads(ours, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


class CustomRMSNorm(nn.Module):  # a norm class peftlab does not know (e.g. from remote code)
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x


def test_unknown_norm_classes_are_left_alone_and_named(caplog):
    model = nn.Sequential(LlamaRMSNorm(8), CustomRMSNorm(), CustomRMSNorm())
    with caplog.at_level(logging.INFO, logger="peftlab.model.fused_norm"):
        assert apply_fused_norm(model) == ["0"]
    assert isinstance(model[0], FusedRMSNorm) and isinstance(model[1], CustomRMSNorm)
    assert "left 2 × CustomRMSNorm unfused" in caplog.text
    with pytest.raises(PeftlabError, match="no RMSNorm module peftlab can fuse .* set train.fused_norm: false"):
        apply_fused_norm(nn.Sequential(CustomRMSNorm(), nn.LayerNorm(8)))


def test_recipe_key_wires_build_model(micro_dir):
    from peftlab.model.load import build_model
    from peftlab.recipe.parse import recipe_from_dict

    def recipe(fused: bool, kernels: str = "auto"):
        return recipe_from_dict({"model": {"name": str(micro_dir)}, "quantization": {"mode": "none"},
                                 "adapter": {"r": 4, "dropout": 0.0}, "kernels": kernels,
                                 "data": {"train": [{"path": "unused.jsonl"}]},
                                 "train": {"device": "cpu", "fused_norm": fused}})

    plain = build_model(recipe(False), trainable=False).model
    fused = build_model(recipe(True), trainable=False).model
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 2 * plain.config.num_hidden_layers + 1
    ids = torch.randint(0, plain.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    with pytest.raises(PeftlabError, match="train.fused_norm=true with kernels=off"):
        recipe(True, kernels="off")
