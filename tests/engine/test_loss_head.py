"""The loss head's share of the planner (peftlab/engine/loss_head.py): the cross-entropy's path is the one the loss
takes (the dispatcher's own rule), and the vocabulary-outer path's working set against torch.profiler's memory
timeline."""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from helpers import profiled_peak, with_sections
from peftlab.kernels import fused_linear_cross_entropy
from peftlab.kernels.fused_linear_cross_entropy import default_chunk_rows, online_block

from peftlab.engine.estimate_report import MiB
from peftlab.engine.loss_head import ce_loss_head, head_online
from peftlab.engine.model_shape import model_shape
from peftlab.engine.planner import estimate
from peftlab.recipe.parse import recipe_from_dict

H, VOCAB, N = 64, 40000, 256


def _recipe(tmp_path: Path, **sections):
    """A 1-layer Llama with a wide vocabulary (the loss's forward is the peak moment), bf16 checkpoint, no 4-bit."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": VOCAB,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    raw = {"model": {"name": str(tmp_path / "m")}, "quantization": {"mode": "none"}, "adapter": {"r": 4},
           "data": {"train": [{"path": str(tmp_path / "t.jsonl")}], "max_seq_len": N},
           "train": {"micro_batch_size": 1, "grad_accum": 1, "host_allocator": "bounded"}, "output": {"dir": str(tmp_path / "out")}}
    with_sections(raw, sections)
    return recipe_from_dict(raw)


def _loss_head(recipe, device: str) -> int:
    return estimate(recipe, device=device, baseline=0).components["loss_head"]


@pytest.mark.parametrize("compute, head, trains", [(torch.float32, torch.float32, False),
                                                   (torch.float32, torch.bfloat16, False),
                                                   (torch.bfloat16, torch.bfloat16, False),
                                                   (torch.bfloat16, torch.bfloat16, True),
                                                   (torch.float32, torch.bfloat16, True)])
def test_head_online_is_the_path_the_loss_takes(tmp_path, monkeypatch, compute, head, trains):
    """The loss on the PyTorch backend, with a spy on its vocabulary-outer pass, against head_online for a model shape
    with the same dtypes: a 16-bit head that does not train takes it, whatever the compute dtype."""
    module = importlib.import_module("peftlab.kernels.fused_linear_cross_entropy")
    calls = []
    real = module.torch_ce_online
    monkeypatch.setattr(module, "torch_ce_online", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = torch.randn(8, 16, dtype=compute, requires_grad=True)
    w = torch.randn(50, 16).to(head).requires_grad_(trains)
    fused_linear_cross_entropy(h, w, torch.randint(0, 50, (8,)), backend="torch").backward()
    shape = dataclasses.replace(model_shape(_recipe(tmp_path)), head_16bit=head != compute,
                                head_trainable=trains)
    assert head_online(shape, elem=compute.itemsize, backend="torch") == bool(calls)
    assert not head_online(shape, elem=compute.itemsize, backend="triton")


def test_cpu_bf16_run_counts_the_vocabulary_outer_pass_as_measured(tmp_path):
    """model.dtype: bfloat16 on the CPU (frozen_16bit does not apply): the loss takes torch_ce_online; the planner's
    loss_head against the profiled peak of the loss's forward + backward, within 15 % (row chunks: ~2.4x more)."""
    r = _recipe(tmp_path, model={"dtype": "bfloat16"})
    predicted = _loss_head(r, "cpu")
    torch.manual_seed(0)
    h = torch.randn(N, H, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(VOCAB, H).to(torch.bfloat16)
    y = torch.randint(0, VOCAB, (N,))
    measured = profiled_peak(lambda: fused_linear_cross_entropy(h, w, y, normalizer=N).backward())
    assert abs(predicted - measured) <= 0.15 * measured, (predicted / MiB, measured / MiB)
    fwd, _, path = ce_loss_head(r, model_shape(r, torch.bfloat16, device="cpu"), device="cpu", elem=2, n_tokens=N)
    assert fwd == predicted and path.startswith("vocabulary-outer (torch_ce_online)")


def test_cuda_with_kernels_torch_counts_the_vocabulary_outer_pass(tmp_path):
    """A 16-bit run on a GPU with kernels: torch runs the same PyTorch loss as the CPU: the same bytes; kernels:
    auto takes the Triton row chunks."""
    cpu = _loss_head(_recipe(tmp_path, model={"dtype": "bfloat16"}), "cpu")
    rows, width = online_block(N, VOCAB, 4)  # one slice of logits, of the head upcast, the block upcast, grad_h
    assert _loss_head(_recipe(tmp_path, kernels="torch"), "cuda") == cpu == (rows * width + width * H + rows * H
                                                                            + N * H) * 4
    rows = default_chunk_rows(N, H, VOCAB, gpu=True)  # one fp32 chunk + its bf16 copy for the GEMMs
    assert _loss_head(_recipe(tmp_path), "cuda") == rows * VOCAB * (4 + 2) + N * H * 4


def test_fp32_cpu_run_takes_the_online_path_only_over_a_16bit_head(tmp_path):
    """fp32 on the CPU: model.frozen_16bit keeps the bf16 checkpoint's head in 16 bits (online); without it the head
    is fp32 and the loss runs row chunks."""
    on = _recipe(tmp_path, model={"dtype": "float32"})
    off = _recipe(tmp_path, model={"dtype": "float32", "frozen_16bit": False})
    rows = default_chunk_rows(N, H, VOCAB, gpu=False)
    assert _loss_head(off, "cpu") == 2 * rows * VOCAB * 4 + N * H * 4
    assert _loss_head(on, "cpu") < _loss_head(off, "cpu")
    assert ce_loss_head(on, model_shape(on, device="cpu"), device="cpu", elem=4, n_tokens=N)[2].startswith(
        "vocabulary-outer")


def _step_peaks(r) -> tuple[int, int]:
    """(planner, profiled): the step-dependent bytes at the peak of the recipe's second step (the first makes
    AdamW's moments) on the CPU: the trainer's loss, LoRA, unfreeze_modules, param groups and optimizer on a
    1-layer Llama whose 40,000 x 64 head dominates. The planner's: everything but the baseline, the weights and the
    allocator's overhead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.adapters.freezing import optimizer_param_groups, unfreeze_modules
    from peftlab.engine.local import build_optimizer
    from peftlab.model.load import attach_adapters
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

    c = estimate(r, device="cpu", baseline=0).components
    predicted = c["gradients"] + c["optimizer_state"] + c["activations"] + c["loss_head"] + c["temporary_buffers"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(r.model.name), torch_dtype=torch.float32,
                                             attn_implementation="sdpa")
    attach_adapters(model, r, torch.device("cpu"))
    unfrozen = unfreeze_modules(model, r.adapter.unfreeze)
    opt = build_optimizer(optimizer_param_groups(model, r.adapter, r.train.lr, unfrozen), r.train, torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (1, N))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()

    def step():
        for _ in range(r.train.grad_accum):
            causal_lm_loss(model, batch, normalizer=float(N), settings=LossSettings.from_recipe(r)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return predicted, profiled_peak(lambda: (step(), step()))  # the moments made in the first, alive in the second


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trained_head_adds_what_the_profiled_step_adds(tmp_path, grad_accum):
    """adapter.unfreeze: [head] on an fp32 CPU run: its AdamW moments, alive through the step, and its fp32 gradient,
    made by the loss in its forward (with grad_accum 1 it becomes the head's .grad; from the second micro-batch on the
    .grad of the first is alive beside it): what unfreezing the head adds to the planner's peak against what it adds
    to the profiled step, within 15 % (before: nothing was counted)."""
    kw = {"model": {"dtype": "float32", "attn_implementation": "sdpa", "frozen_16bit": False},  # fp32 heads both
          "train": {"grad_accum": grad_accum}}
    plain_predicted, plain_measured = _step_peaks(_recipe(tmp_path, **kw))
    predicted, measured = _step_peaks(_recipe(tmp_path, adapter={"unfreeze": ["head"]}, **kw))
    added, measured_added = predicted - plain_predicted, measured - plain_measured
    assert measured_added >= 2.5 * VOCAB * H * 4  # moments + gradient: the head three times over
    assert abs(added - measured_added) <= 0.15 * measured_added, (added / MiB, measured_added / MiB)
