"""The GPU step's peftlab configuration run on the CPU with every kernel on its Triton path (the interpreter): fused
RMSNorm, the whole-block q/k/v, o and gated-MLP Functions, the in-place RoPE kernel on q/k (a CUDA-only branch of
:mod:`peftlab.adapters.fused_blocks`: views of a multi-output Function's outputs, rotated in place, under gradient
checkpointing) and the fused cross-entropy; also with the long-context keys (offloaded layer inputs recomputed
under LeanSaved, the MLP in chunks). The loss and every LoRA gradient equal the plain per-module model's."""
from __future__ import annotations

import functools

import pytest
import torch
from peftlab.kernels import rope
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab.adapters.fused_blocks as fb
from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model.fused_norm import apply_fused_norm
from peftlab.model.load import enable_gradient_checkpointing
from peftlab.model.long_context import apply_activation_offload, apply_mlp_chunking
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

FP32 = {"atol": 1e-5, "rtol": 5e-4}


def tiny(backend: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float()
    model.requires_grad_(False)
    inject_lora(model, r=4, alpha=8, kernel_backend=backend)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    model.config.use_cache = False
    return model


def loss_and_grads(model, backend: str):
    ids = torch.randint(0, 96, (1, 19), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, normalizer=16.0, settings=LossSettings(backend=backend))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("long_context", [False, True], ids=["checkpointed", "offload+mlp_chunks"])
def test_the_gpu_configuration_gives_the_per_module_loss_and_gradients(monkeypatch, long_context):
    ref_model = tiny("torch")
    enable_gradient_checkpointing(ref_model.train())
    ref_loss, ref = loss_and_grads(ref_model, "torch")

    calls = []
    kernel_rope = functools.partial(rope.apply_rope_, backend="triton")
    monkeypatch.setattr(fb, "_uses_rope_kernel", lambda q: True)  # what q.is_cuda says on a GPU
    monkeypatch.setattr(fb, "apply_rope_", lambda *a: (calls.append(1), kernel_rope(*a))[1])
    model = tiny("triton")
    apply_fused_norm(model, backend="triton")
    assert fb.apply_fused_blocks(model) == {}
    enable_gradient_checkpointing(model.train())
    if long_context:
        apply_activation_offload(model)
        apply_mlp_chunking(model, 7)
    for step in range(2):  # the second step runs on the buffers (weights, pinned/offload slots) of the first
        loss, got = loss_and_grads(model, "triton")
        torch.testing.assert_close(loss, ref_loss, **FP32)
        assert sorted(got) == sorted(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **FP32, msg=lambda m, k=k, step=step: f"step {step}, {k}: {m}")
    # the kernel rotated q/k in every forward and every recompute (2 layers x (forward + recompute) x 2 steps)
    assert len(calls) == 2 * 2 * 2
