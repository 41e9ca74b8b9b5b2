"""Fused per-sequence log-probs: Triton (under TRITON_INTERPRET=1) and chunked PyTorch paths against the
full-logits reference — values and gradients of hidden / weight / bias under a per-sequence upstream gradient,
fp32 and bf16, odd shapes, ignored rows, soft-cap; fp64 gradcheck of both backward modes; only scored rows reach
the head; no gradient work under no_grad; AOT compiles of the row kernel for sm_80/89/90."""
from __future__ import annotations

import importlib

import pytest
import torch
from peftlab.kernels.fused_linear_logprobs import (
    fused_linear_sequence_logprobs,
    reference_linear_sequence_logprobs,
)

from peftlab.errors import PeftlabError

lp_mod = importlib.import_module("peftlab.kernels.fused_linear_logprobs")

# B=3 sequences of T=7 rows, H=19, V=133: no size divides a block; V spans one ROW_BLOCK_V block partially.
ODD = (3, 7, 19, 133)

OPTIONS = {
    # (Q)LoRA: frozen head, gradient w.r.t. hidden only (computed in forward, scaled per sequence in backward)
    "frozen_head": {"train_head": False, "softcap": None},
    # trainable head + bias + soft-cap: backward re-runs the chunks with the per-sequence gradients
    "trainable_head_softcap": {"train_head": True, "softcap": 3.0},
}


def make_inputs(b: int, t: int, h: int, v: int, dtype: torch.dtype, *, train_head: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(dtype).requires_grad_(train_head)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_(train_head)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = -100  # prompt rows
    labels[1, 4:] = -100  # a shorter completion (padding)
    upstream = torch.randn(b, generator=g)  # d loss / d logp of each sequence
    return hidden, weight, bias, labels, upstream


def run(fn, hidden, weight, bias, labels, upstream, **kw):
    leaves = [x for x in (hidden, weight, bias) if x.requires_grad]
    logps, n_tokens = fn(hidden, weight, labels, bias=bias, **kw)
    grads = torch.autograd.grad((logps * upstream).sum(), leaves)
    return logps.detach(), n_tokens, grads


def fp32_leaves(*tensors):
    return [x.detach().float().requires_grad_(x.requires_grad) for x in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference_odd_shape(backend, dtype, option, assert_kernel_close):
    opt = OPTIONS[option]
    hidden, weight, bias, labels, upstream = make_inputs(*ODD, dtype, train_head=opt["train_head"])
    logps, n_tokens, grads = run(fused_linear_sequence_logprobs, hidden, weight, bias, labels, upstream,
                                 softcap=opt["softcap"], backend=backend, chunk_rows=4)
    assert logps.dtype == torch.float32 and logps.shape == (3,)
    ref, ref_n, ref_grads = run(reference_linear_sequence_logprobs, *fp32_leaves(hidden, weight, bias), labels,
                                upstream, softcap=opt["softcap"])
    assert n_tokens.tolist() == ref_n.tolist() == [5, 2, 5]
    assert_kernel_close(logps, ref, dtype, "logps")
    assert len(grads) == len(ref_grads) == (3 if opt["train_head"] else 1)
    for name, g, r, leaf in zip(("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == leaf.dtype, name  # gradients come back in the dtype of their input
        assert_kernel_close(g, r, dtype, f"grad {name}")
    assert torch.count_nonzero(grads[0][labels == -100]) == 0  # ignored rows get no gradient


@pytest.mark.parametrize("train_head", [False, True], ids=["eager_hidden_grad", "replayed_chunks"])
def test_gradcheck_fp64_per_sequence_upstream(train_head):
    """Any per-sequence upstream gradient, both backward modes, with soft-cap, bias and chunking."""
    hidden, weight, bias, labels, _ = make_inputs(3, 5, 4, 9, torch.float64, train_head=train_head, seed=2)
    labels[2] = -100  # a sequence with nothing scored: logp 0, no gradient

    def f(h, w, b):
        return fused_linear_sequence_logprobs(h, w, labels, bias=b, softcap=4.0, backend="torch", chunk_rows=3)[0]

    out = f(hidden, weight, bias)
    assert out.dtype == torch.float64 and out[2].item() == 0.0
    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_only_scored_rows_reach_the_head(monkeypatch):
    hidden, weight, _, labels, upstream = make_inputs(*ODD, torch.float32, train_head=False)
    seen = []
    real = lp_mod.run_chunks

    def spy(h, *args):
        seen.append(h.shape[0])
        return real(h, *args)

    monkeypatch.setattr(lp_mod, "run_chunks", spy)
    logps, _ = fused_linear_sequence_logprobs(hidden, weight, labels, backend="torch")
    (logps * upstream).sum().backward()
    assert seen == [int((labels != -100).sum())] == [12]  # 12 of 21 rows; frozen head: one pass, no replay


def test_no_grad_reference_pass_computes_no_gradients(monkeypatch):
    hidden, weight, bias, labels, _ = make_inputs(*ODD, torch.float32, train_head=True)
    flags = []
    real = lp_mod.run_chunks

    def spy(*args):
        flags.append(args[8:12])  # compute_grad, need_h, need_w, need_b
        return real(*args)

    monkeypatch.setattr(lp_mod, "run_chunks", spy)
    with torch.no_grad():
        logps, _ = fused_linear_sequence_logprobs(hidden, weight, labels, bias=bias, backend="torch")
        ref, _ = reference_linear_sequence_logprobs(hidden, weight, labels, bias=bias)
    assert flags == [(False, False, False, False)] and logps.grad_fn is None
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_frozen_16bit_head_online_path_matches_the_reference(softcap, monkeypatch):
    """A frozen bf16 head under fp32 hidden states (model.frozen_16bit on the CPU) goes through the CE's online
    vocabulary-outer path with log p = -CE; forced to several slices and row blocks."""
    ce_mod = importlib.import_module("peftlab.kernels.fused_linear_cross_entropy")
    monkeypatch.setattr(ce_mod, "ONLINE_MIN_SLICE", 16)
    monkeypatch.setattr(ce_mod, "ONLINE_SLICE_BYTES", 1)
    hidden, weight, bias, labels, upstream = make_inputs(*ODD, torch.float32, train_head=False)
    weight, bias = weight.detach().bfloat16(), bias.detach().bfloat16()
    called = []
    real = ce_mod.torch_ce_online
    monkeypatch.setattr(lp_mod, "torch_ce_online", lambda *a, **k: called.append(1) or real(*a, **k))
    logps, _ = fused_linear_sequence_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, chunk_rows=5,
                                              backend="torch")
    (grad,) = torch.autograd.grad((logps * upstream).sum(), hidden)
    ref, _ = reference_linear_sequence_logprobs(hidden, weight.float(), labels, bias=bias.float(), softcap=softcap)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    assert called
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_chunk_rows_do_not_change_the_result(chunk_rows):
    hidden, weight, bias, labels, upstream = make_inputs(*ODD, torch.float32, train_head=True)
    logps, _, grads = run(fused_linear_sequence_logprobs, hidden, weight, bias, labels, upstream,
                          backend="torch", chunk_rows=chunk_rows)
    ref, _, ref_grads = run(reference_linear_sequence_logprobs, hidden, weight, bias, labels, upstream)
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=5e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=5e-4)


def test_nothing_scored_gives_zeros_and_a_zero_gradient():
    hidden, weight, _, labels, _ = make_inputs(*ODD, torch.float32, train_head=False)
    logps, n_tokens = fused_linear_sequence_logprobs(hidden, weight, torch.full_like(labels, -100),
                                                     backend="torch")
    assert logps.tolist() == [0.0, 0.0, 0.0] and n_tokens.tolist() == [0, 0, 0]
    (g,) = torch.autograd.grad(logps.sum(), hidden)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cuda"}, "backend="),
        ({"softcap": 0.0}, "softcap must be a positive number"),
        ({"chunk_rows": 0}, "chunk_rows must be a positive number of rows"),
    ],
)
def test_user_errors(kwargs, match):
    hidden, weight, _, labels, _ = make_inputs(*ODD, torch.float32, train_head=False)
    with pytest.raises(PeftlabError, match=match):
        fused_linear_sequence_logprobs(hidden, weight, labels, **kwargs)


def test_user_errors_on_inputs():
    hidden, weight, _, labels, _ = make_inputs(*ODD, torch.float32, train_head=False)
    with pytest.raises(PeftlabError, match="outside the vocabulary"):
        fused_linear_sequence_logprobs(hidden, weight, torch.full_like(labels, 133))
    with pytest.raises(PeftlabError, match="like nn.Linear.weight"):
        fused_linear_sequence_logprobs(hidden, weight.t(), labels)
    with pytest.raises(PeftlabError, match=r"labels must be int64 token ids of shape \(batch, seq\)"):
        fused_linear_sequence_logprobs(hidden, weight, labels[:, :-1])
    with pytest.raises(PeftlabError, match=r"hidden must be a floating-point \(batch, seq, hidden\) tensor"):
        fused_linear_sequence_logprobs(hidden[0], weight, labels)


def test_aot_compile(capsys):
    """The row kernel, with and without soft-cap, compiles for sm_80/89/90 without spills. The logits GEMM
    launches are the CE loss's (the same kernel and configuration; its AOT test compiles them)."""
    pytest.importorskip("triton")
    from peftlab.kernels.aot import assert_compiles
    from peftlab.kernels.fused_linear_cross_entropy import aot_launches as ce_launches

    launches = lp_mod.aot_launches(torch.bfloat16)
    gemms = [x for x in launches if x[0].__name__ == "_logits_kernel"]
    assert gemms and all(x in ce_launches(torch.bfloat16) for x in gemms)
    rows = [x for x in launches if x[0].__name__ == "_logprob_row_kernel"]
    reports = assert_compiles(rows, capsys=capsys)
    assert len(reports) == 2 * 3 and {r.arch for r in reports} == {80, 89, 90}
    assert all(r.n_spills == 0 for r in reports), "the log-prob row kernel spills registers"
