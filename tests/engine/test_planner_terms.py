"""Single terms of the memory planner against what the code they model does, measured on the CPU with
torch.profiler's memory timeline (tests/helpers.py ``profiled_peak``):

- the row-chunked cross-entropy (the loss head on its PyTorch and Triton row paths): how many fp32
  ``rows x vocabulary`` buffers are live at its peak;
- the gradients: which ``.grad`` are alive at the peak of a step, with and without gradient accumulation;
- ``kernels: auto`` on CUDA where Triton is not installed: the PyTorch fallbacks the run takes, not the kernels.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import profiled_peak, with_sections
from peftlab.kernels import fused_linear_cross_entropy
from peftlab.kernels import nf4 as nf4_kernels
from peftlab.kernels.fused_linear_cross_entropy import default_chunk_rows, resolve_backend

from peftlab.engine.loss_head import ce_loss_head
from peftlab.engine.model_shape import kernels_run_triton, model_shape
from peftlab.engine.planner import estimate, fused_norm_saves
from peftlab.engine.planner_distill import distill_memory, teacher_shape
from peftlab.recipe.parse import recipe_from_dict


def _config(root: Path, *, hidden: int, vocab: int, inter: int = 128, layers: int = 1, dtype: str = "float32") -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
           "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": dtype}
    path = root / f"cfg-{hidden}-{vocab}-{inter}-{layers}-{dtype}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _recipe(tmp_path: Path, model_dir: Path, *, tokens: int, **sections):
    raw = {"model": {"name": str(model_dir), "dtype": "float32", "frozen_16bit": False, "attn_implementation": "sdpa"},
           "quantization": {"mode": "none"}, "adapter": {"r": 4, "dropout": 0.0},
           "data": {"train": [{"path": str(tmp_path / "t.jsonl")}], "max_seq_len": tokens},
           "train": {"micro_batch_size": 1, "grad_accum": 1, "host_allocator": "bounded"},
           "output": {"dir": str(tmp_path / "out")}}
    with_sections(raw, sections)
    return recipe_from_dict(raw)


# ---------------------------------------------------------------------------------------------------------------
# (a) the row-chunked cross-entropy

# (tokens, vocabulary, hidden): one chunk of every row (the chunk dominates: 2 and 3 buffers differ by 33 %),
# four chunks of 512 rows, a wide hidden size with few rows, and one where the fp32 hidden-state gradient is
# a large share of the peak (2 and 3 buffers still differ by 17 %)
CE_SHAPES = [(256, 40000, 64), (2048, 32000, 16), (64, 50000, 512), (1024, 4096, 512)]


def _row_chunk_peak(n: int, vocab: int, hidden: int, *, backend: str = "torch", head_dtype=torch.float32,
                    **opts) -> tuple[int, int]:
    """(profiled peak of the loss's forward + backward, rows per chunk): fp32 hidden states that need a gradient,
    a frozen head — the head in the loss's fp32 compute dtype takes the row chunks on the PyTorch backend."""
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden).to(head_dtype)
    y = torch.randint(0, vocab, (n,))
    rows = default_chunk_rows(n, hidden, vocab, gpu=False)
    peak = profiled_peak(lambda: fused_linear_cross_entropy(h, w, y, normalizer=n, backend=backend,
                                                            chunk_size=rows, **opts).backward())
    return peak, rows


@pytest.mark.parametrize("n, vocab, hidden", CE_SHAPES)
def test_pytorch_row_chunks_peak_at_two_fp32_chunks(n, vocab, hidden):
    """The PyTorch row path holds two fp32 rows x vocabulary buffers at its peak: the chunk's logits (turned into
    their gradient in place by torch_ce_rows) and logsumexp's temporary of the same size — not three. The bound is
    exact to per-row vectors: the peak is at least two chunks + the hidden-state gradient and under a third chunk
    by far more than the slack."""
    peak, rows = _row_chunk_peak(n, vocab, hidden)
    chunk = rows * vocab * 4
    two = 2 * chunk + n * hidden * 4
    assert two <= peak <= two + 64 * (n + rows), (peak, two, peak / chunk)
    assert peak < 3 * chunk + n * hidden * 4 - chunk // 2  # discriminates: a third chunk is not there


def test_softcap_adds_the_third_chunk():
    """With a soft-cap torch_ce_rows keeps tanh(z / c) for the chain rule: a third chunk-sized buffer (the one case
    of the PyTorch row path with three); label smoothing and the z-loss work in place (still two)."""
    n, vocab, hidden = CE_SHAPES[0]
    for opts, buffers in [({"softcap": 30.0}, 3), ({"label_smoothing": 0.1, "z_loss": 1e-4}, 2)]:
        peak, rows = _row_chunk_peak(n, vocab, hidden, **opts)
        low = buffers * rows * vocab * 4 + n * hidden * 4
        assert low <= peak <= low + 64 * (n + rows), (opts, peak / (rows * vocab * 4))


@pytest.mark.parametrize("head_dtype, buffers", [(torch.float32, 1.0), (torch.bfloat16, 1.5)])
def test_triton_row_chunks_peak_at_one_chunk_and_its_16bit_gradient(head_dtype, buffers):
    """The Triton row path (here under the interpreter, tests/conftest.py): the row kernel turns the logits into
    their gradient in place — one fp32 chunk — and a 16-bit head's GEMMs read a 16-bit copy of it (half a chunk
    more). The torch-level allocations are the same on a GPU (the kernels write into tensors torch allocates).
    Slack: per-row vectors, the 16-bit GEMMs' rows x hidden outputs and a vocabulary-wide temporary of the 16-bit
    path (< 10 % of a chunk at this shape, measured 7 %)."""
    n, vocab, hidden = 64, 8192, 32
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden).to(head_dtype)
    y = torch.randint(0, vocab, (n,))
    # the interpreter keeps the arguments of its last launch: a tiny launch first, so that no earlier test's chunk
    # is freed (unseen allocation, seen free) inside the measured window
    tiny = torch.randn(1, hidden, requires_grad=True)
    fused_linear_cross_entropy(tiny, w[:16], torch.zeros(1, dtype=torch.long), backend="triton").backward()
    peak = profiled_peak(lambda: fused_linear_cross_entropy(h, w, y, normalizer=n, backend="triton",
                                                            chunk_size=n).backward())
    chunk = n * vocab * 4
    low = buffers * chunk + n * hidden * 4
    assert low <= peak <= low + 0.1 * chunk, peak / chunk


@pytest.mark.parametrize("n, vocab, hidden, softcap", [(*shape, None) for shape in CE_SHAPES] + [(256, 40000, 64, 30.0)])
def test_planner_loss_head_term_is_the_measured_row_chunk_peak(tmp_path, n, vocab, hidden, softcap):
    """The planner's loss-head term for an fp32 CPU run (an fp32 head: the row chunks; train.loss.softcap: the third
    chunk) against the profiled peak of the same loss over the same shape, within the per-row slack of the
    measurement."""
    r = _recipe(tmp_path, _config(tmp_path, hidden=hidden, vocab=vocab), tokens=n, train={"loss": {"softcap": softcap}})
    fwd, bwd, path = ce_loss_head(r, model_shape(r, torch.float32, device="cpu"), device="cpu", elem=4, n_tokens=n)
    assert path.startswith("PyTorch row chunks")
    peak, rows = _row_chunk_peak(n, vocab, hidden, **({"softcap": softcap} if softcap else {}))
    assert abs(max(fwd, bwd) - peak) <= 64 * (n + rows), (max(fwd, bwd) / (rows * vocab * 4), peak / (rows * vocab * 4))


# ---------------------------------------------------------------------------------------------------------------
# (b) gradients

GRAD_H, GRAD_VOCAB, GRAD_TOKENS = 256, 16000, 256


@pytest.fixture(scope="module")
def grad_checkpoint(tmp_path_factory):
    """A 2-layer Llama (hidden 256, vocabulary 16,000: the loss's forward is the peak of a step), fp32 safetensors,
    with the built-in tokenizer beside it."""
    from peftlab.model.builtin import build_tokenizer
    from peftlab.model.quantized_load import save_random_checkpoint

    root = tmp_path_factory.mktemp("grads")
    cfg = _config(root, hidden=GRAD_H, vocab=GRAD_VOCAB, inter=512, layers=2)
    ckpt = save_random_checkpoint(cfg, root / "ckpt", dtype=torch.float32, seed=0)
    build_tokenizer().save_pretrained(ckpt)
    return ckpt


def _step_peak(recipe, steps: int) -> tuple[int, int]:
    """(profiled peak of ``steps`` optimizer steps of a freshly built model, trainable bytes): peftlab's model, its
    loss and LocalEngine (backward per micro-batch, clip + AdamW + zero_grad(set_to_none) per step)."""
    from peftlab.engine.local import LocalEngine
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

    torch.manual_seed(0)
    loaded = build_model(recipe, device=torch.device("cpu"))
    engine = LocalEngine(loaded.model, recipe.train, 10, torch.device("cpu"))
    ids = torch.randint(0, GRAD_VOCAB, (1, GRAD_TOKENS))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    settings = LossSettings.from_recipe(recipe)
    loaded.model.train()

    def step():
        for _ in range(recipe.train.grad_accum):
            engine.backward(causal_lm_loss(loaded.model, batch, normalizer=float(GRAD_TOKENS), settings=settings))
        engine.step()

    peak = profiled_peak(lambda: [step() for _ in range(steps)])
    return peak, sum(p.numel() * p.element_size() for p in loaded.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype, checkpointing", [("float32", True), ("float32", False), ("bfloat16", True)])
def test_gradients_are_alive_at_the_peak_only_when_accumulating(tmp_path, grad_checkpoint, dtype, checkpointing):
    """LoRA r=64 on every linear of a 2-layer Llama whose peak is the loss's forward. The optimizer sets the grads to
    None after each step, so with grad_accum 1 none is alive at that peak; with grad_accum 2 the second micro-batch's
    forward runs beside all of them. Measured: the two-step peak with grad_accum 2 exceeds grad_accum 1's by the
    trainable bytes (fp32 LoRA grads, in a bf16 model too: the adapters train in fp32) to within 2 %; the planner's
    peaks differ by exactly that (before: by nothing, the grads were counted at every moment)."""
    def recipe(grad_accum: int):
        return _recipe(tmp_path, grad_checkpoint, tokens=GRAD_TOKENS, adapter={"r": 64, "dropout": 0.0},
                       model={"gradient_checkpointing": checkpointing, "dtype": dtype}, train={"grad_accum": grad_accum})

    one, two = recipe(1), recipe(2)
    (m1, trainable), (m2, _) = _step_peak(one, 2), _step_peak(two, 2)
    assert abs((m2 - m1) - trainable) <= 0.02 * trainable, ((m2 - m1) / trainable)
    e1, e2 = estimate(one, device="cpu", baseline=0), estimate(two, device="cpu", baseline=0)
    assert e1.components["gradients"] == 0 and e2.components["gradients"] == trainable
    step_bytes = [e.total - e.components["allocator_overhead"] for e in (e1, e2)]  # bounded: 5 % slack on top
    assert step_bytes[1] - step_bytes[0] == trainable


def test_first_step_peaks_below_the_later_ones_by_the_optimizer_state(tmp_path, grad_checkpoint):
    """AdamW makes its moments at the first step: the first step's peak is the later steps' less the state (8 bytes
    per fp32 LoRA parameter, to within 2 %) — the planner counts the later steps' (optimizer_state, alive throughout
    from the second step on)."""
    r = _recipe(tmp_path, grad_checkpoint, tokens=GRAD_TOKENS, adapter={"r": 64, "dropout": 0.0},
                train={"grad_accum": 2})
    (first, trainable), (two, _) = _step_peak(r, 1), _step_peak(r, 2)
    state = estimate(r, device="cpu", baseline=0).components["optimizer_state"]
    assert state == 2 * trainable
    assert abs((two - first) - state) <= 0.02 * state, (two - first) / state


def test_auto_fit_counts_the_grads_the_batch_it_keeps_accumulates(tmp_path):
    """The largest micro-batch is searched with the grad_accum train.auto_fit would set for it (micro-batch x
    grad_accum kept): a recipe of micro-batch 4 x grad_accum 1 that fits 2 rows trains 2 x 2, grads alive at the
    forward — the search counts them."""
    r = _recipe(tmp_path, _config(tmp_path, hidden=64, vocab=4000), tokens=64, train={"micro_batch_size": 4})
    est = estimate(r, device="cpu", baseline=0)
    assert est.components["gradients"] == 0  # grad_accum 1: no .grad at the forward's peak
    budget_two = estimate(r, device="cpu", baseline=0, micro_batch_size=2).total
    r.train.grad_accum = 2
    accumulating_two = estimate(r, device="cpu", baseline=0, micro_batch_size=2).total
    r.train.grad_accum = 1
    assert accumulating_two > budget_two
    # a budget that fits 2 rows without the grads but not with them: 2 rows would not fit once accumulating
    est = estimate(r, device="cpu", baseline=0, device_memory=budget_two)
    assert est.max_micro_batch_size == 1
    est = estimate(r, device="cpu", baseline=0, device_memory=accumulating_two)
    assert est.max_micro_batch_size == 2


# ---------------------------------------------------------------------------------------------------------------
# (c) kernels: auto on CUDA without Triton


@pytest.fixture
def no_triton(monkeypatch):
    """A machine whose Triton cannot be imported, as the kernels see it: every kernel module's flag."""
    import importlib

    for name in ("nf4", "fused_linear_cross_entropy", "fused_lora_linear", "fused_lora_block", "rms_norm", "rope",
                 "swiglu"):
        monkeypatch.setattr(importlib.import_module(f"peftlab.kernels.{name}"), "_HAS_TRITON", False)


class _CudaTensor:
    is_cuda = True
    dtype = torch.bfloat16


def test_without_triton_kernels_auto_on_cuda_runs_the_pytorch_references(no_triton):
    """The runtime's own rule (use_triton / the losses' resolve_backend) and the planner's agree: auto on CUDA runs
    the references where Triton is missing; kernels: triton is counted as asked (the run refuses it)."""
    assert not nf4_kernels.use_triton("auto", torch.device("cuda"), "test")
    assert resolve_backend("auto", _CudaTensor(), _CudaTensor()) == "torch"
    assert not kernels_run_triton("auto", "cuda")
    assert kernels_run_triton("triton", "cuda")
    assert not kernels_run_triton("auto", "cpu") and not kernels_run_triton("torch", "cuda")


def test_with_triton_kernels_auto_on_cuda_takes_the_kernels(monkeypatch):
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", True)
    assert kernels_run_triton("auto", "cuda")


def _cuda_recipe(tmp_path, **sections):
    """A bf16 GPU run with a small vocabulary (a decoder layer's backward is the peak, not the loss) and LoRA on
    every linear: the kernel path and the PyTorch path keep different inputs."""
    model = _config(tmp_path, hidden=256, vocab=512, inter=704, layers=2, dtype="bfloat16")
    return _recipe(tmp_path, model, tokens=1024, model={"dtype": "bfloat16", "gradient_checkpointing": True},
                   adapter={"r": 8, "dropout": 0.0, "target_modules": "all-linear"}, **sections)


def test_cuda_without_triton_counts_the_pytorch_layers_not_the_kernels(tmp_path, monkeypatch):
    """kernels: auto on a CUDA machine without Triton: LoraLinear's fused_lora_linear and the fused norm run their
    references, so the planner counts what kernels: torch counts (before: the kernels' smaller saves); with Triton
    it counts less. fused_blocks keep their block Functions (torch GEMMs) without Triton: counted as blocks."""
    auto, torch_ = _cuda_recipe(tmp_path, train={"fused_norm": True}), _cuda_recipe(tmp_path, kernels="torch")
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", True)
    with_triton = estimate(auto, device="cuda").components
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", False)
    without = estimate(auto, device="cuda").components
    reference = estimate(torch_, device="cuda").components
    assert without["activations"] + without["temporary_buffers"] == (reference["activations"]
                                                                     + reference["temporary_buffers"])
    assert with_triton["activations"] + with_triton["temporary_buffers"] < without["activations"] + without[
        "temporary_buffers"]
    blocks = _cuda_recipe(tmp_path, train={"fused_blocks": True})
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", True)
    blocks_triton = estimate(blocks, device="cuda").components
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", False)
    assert estimate(blocks, device="cuda").components["activations"] == blocks_triton["activations"]


def test_cuda_without_triton_does_not_advise_the_fused_norm(tmp_path, monkeypatch):
    """train.fused_norm saves a 16-bit run's fp32 norm copies only where its Triton kernel runs: without Triton the
    fused norm is transformers' op sequence, so the estimate and the out-of-memory advice do not suggest it; the
    estimate says which path it counted."""
    r = _cuda_recipe(tmp_path)
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", True)
    assert fused_norm_saves(r, "cuda")
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", False)
    assert not fused_norm_saves(r, "cuda")
    notes = estimate(r, device="cuda").notes
    assert not any("fused_norm" in n for n in notes)
    assert any(n.startswith("kernels: auto without Triton") for n in notes), notes


def test_cuda_without_triton_counts_the_pytorch_kd_loss(tmp_path, monkeypatch):
    """An online distill run on CUDA without Triton: fused_linear_kd_loss resolves auto to PyTorch, so the planner
    counts the PyTorch KD row chunks (a bf16 student head that the vocabulary-outer pass does not take for JSD),
    not the Triton ones."""
    teacher = _config(tmp_path / "t", hidden=256, vocab=512, inter=704, layers=2, dtype="bfloat16")
    r = _cuda_recipe(tmp_path, distill={"kind": "jsd", "teacher": {"name": str(teacher),
                                                                   "quantization": {"mode": "none"}}})
    shape = model_shape(r, torch.bfloat16, device="cuda")

    def path() -> str:
        return distill_memory(r, shape, teacher_shape(r, "cuda"), device="cuda", elem=2, mbs=1, seq=1024).path

    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", True)
    assert path().startswith("Triton row chunks")
    monkeypatch.setattr(nf4_kernels, "_HAS_TRITON", False)
    assert path().startswith("PyTorch row chunks")


def test_cuda_without_triton_counts_the_pytorch_cross_entropy(tmp_path, no_triton):
    r = _cuda_recipe(tmp_path)
    path = ce_loss_head(r, model_shape(r, torch.bfloat16, device="cuda"), device="cuda", elem=2, n_tokens=1024)[2]
    assert not path.startswith("Triton")


def _block_saved_bytes_per_token(dtype: torch.dtype, backend: str, fused_blocks: bool) -> float:
    """What autograd saves per token in one Llama decoder layer (LoRA r=4 on every linear, SDPA with a causal mask),
    with ``train.fused_blocks``' block Functions or the per-module path, on the CPU with LoRA's ``backend`` — every
    storage counted once, the parameters, cos/sin and the layer's input left out (as
    tests/engine/test_model_shape.py counts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.adapters.fused_blocks import apply_fused_blocks
    from peftlab.adapters.lora_inject import inject_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    inject_lora(model, r=4, alpha=8, dropout=0.0, kernel_backend=backend)
    if fused_blocks:
        assert apply_fused_blocks(model) == {}  # nothing left on the per-module path
    model.train()
    T = 16
    x = torch.randn(1, T, 64, dtype=dtype, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin, x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=torch.arange(T)[None])
    return sum(saved.values()) / T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_blocks_keep_the_same_tensors_without_triton(dtype):
    """The block Functions of train.fused_blocks save the same tensors whether their GEMMs run in Triton (here the
    interpreter) or in torch (kernels: torch, or auto where Triton does not run: the CPU, CUDA without Triton) —
    so the planner counts blocks wherever they run — and less than the per-module path."""
    triton_saved = _block_saved_bytes_per_token(dtype, "triton", True)
    assert _block_saved_bytes_per_token(dtype, "torch", True) == triton_saved
    assert _block_saved_bytes_per_token(dtype, "auto", True) == triton_saved
    assert _block_saved_bytes_per_token(dtype, "torch", False) > triton_saved


def test_cpu_fused_blocks_are_counted_as_the_blocks_that_run(tmp_path):
    """train.fused_blocks on a CPU run without a 4-bit base (kernels: auto takes no Triton there, the blocks still
    run): the planner's activations are lower than without it by what the blocks save less, measured per layer and
    token (before: the blocks were counted only on the kernel path, i.e. not at all on the CPU); with an NF4 base
    on the CPU (bitsandbytes may repack it for its CPU kernel, the per-module path) it counts the per-module path."""
    model = _config(tmp_path, hidden=64, vocab=300, inter=160, layers=1)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))

    def activations(blocks: bool, quant: str = "none") -> int:
        r = _recipe(tmp_path, model, tokens=16, adapter={"r": 4, "alpha": 8, "dropout": 0.0,
                                                         "target_modules": "all-linear"},
                    model={"gradient_checkpointing": False}, train={"fused_blocks": blocks},
                    quantization={"mode": quant})
        return estimate(r, device="cpu", baseline=0).components["activations"]

    measured = _block_saved_bytes_per_token(torch.float32, "torch", False) - _block_saved_bytes_per_token(
        torch.float32, "auto", True)
    assert activations(False) - activations(True) == 16 * measured
    assert activations(False, "nf4") == activations(True, "nf4")
