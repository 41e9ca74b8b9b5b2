"""Fused linear KD loss: against a direct full-logits PyTorch computation (F.kl_div, TRL's JSD
convention), the reference, the Triton row kernel under TRITON_INTERPRET=1 (fp32 and bf16), top-k
offline distillation (k = V equals the full loss), and AOT compiles of the KD row kernel."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from peftlab.kernels.fused_linear_kd_loss import fused_linear_kd_loss, reference_linear_kd_loss, topk_kd_loss

from peftlab.errors import PeftlabError

# the module itself (the package binds the name ``fused_linear_kd_loss`` to the function)
kd_mod = importlib.import_module("peftlab.kernels.fused_linear_kd_loss")

BT, HS, HT, V = 47, 31, 20, 123  # teacher hidden size differs from the student's; nothing divides a block
KINDS = {
    "forward_kl": {"kind": "forward_kl"},
    "reverse_kl": {"kind": "reverse_kl"},
    "jsd_0.5": {"kind": "jsd", "beta": 0.5},
    "jsd_0.2": {"kind": "jsd", "beta": 0.2},
}


def make_inputs(dtype: torch.dtype = torch.float32, bt: int = BT, hs: int = HS, ht: int = HT, v: int = V,
                seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(bt, hs, generator=g).to(dtype).requires_grad_()
    sw = (torch.randn(v, hs, generator=g) / hs**0.5 * 2).to(dtype).requires_grad_()
    sb = (torch.randn(v, generator=g) * 0.3).to(dtype).requires_grad_()
    th = torch.randn(bt, ht, generator=g).to(dtype)
    tw = (torch.randn(v, ht, generator=g) / ht**0.5 * 3).to(dtype)
    labels = torch.randint(0, v, (bt,), generator=g)
    labels[1::5] = -100
    return sh, sw, sb, th, tw, labels


def direct_kd(sh, sw, sb, th, tw, labels, *, kind, beta=0.5, temperature=1.0, alpha=0.5):
    """α·CE + (1-α)·T²·D written out with F.kl_div on full fp32 logits (independent of peftlab)."""
    s = sh.float() @ sw.float().t() + sb.float()
    t = (th.float() @ tw.float().t()).detach()
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if kind == "forward_kl":  # KL(t‖s)
        d = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":  # KL(s‖t)
        d = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:  # TRL generalized_jsd_loss
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        d = beta * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
            lm, ls, reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="none")
    return torch.where(labels != -100, alpha * ce + (1 - alpha) * temperature**2 * d, 0.0).sum()


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_direct_computation_fp32(kind, backend):
    sh, sw, sb, th, tw, labels = make_inputs()
    kw = {**KINDS[kind], "temperature": 2.0, "alpha": 0.3}
    loss = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, backend=backend, chunk_size=16, **kw)
    expected = direct_kd(sh, sw, sb, th, tw, labels, **kw)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=5e-4)
    for g, r in zip(grads(loss, sh, sw, sb), grads(expected, sh, sw, sb)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_reference_bf16(kind, backend, assert_kernel_close):
    sh, sw, sb, th, tw, labels = make_inputs(torch.bfloat16)
    kw = {**KINDS[kind], "temperature": 1.5, "alpha": 0.5, "reduction": "mean"}
    loss = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, backend=backend, chunk_size=16, **kw)
    assert loss.dtype == torch.float32
    f32 = [t.detach().float().requires_grad_() for t in (sh, sw, sb)]
    ref = reference_linear_kd_loss(f32[0], f32[1], th.float(), tw.float(), labels, student_bias=f32[2], **kw)
    assert_kernel_close(loss, ref, torch.bfloat16, "loss")
    for name, g, r in zip(("hidden", "head", "bias"), grads(loss, sh, sw, sb), grads(ref, *f32)):
        assert g.dtype == torch.bfloat16
        assert_kernel_close(g, r, torch.bfloat16, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_realistic_shape(dtype, assert_kernel_close):
    """V spans two vocab blocks of the row kernel and several GEMM tiles."""
    sh, sw, _, th, tw, labels = make_inputs(dtype, bt=64, hs=48, ht=80, v=4500)
    kw = {"kind": "jsd", "beta": 0.5, "temperature": 2.0, "alpha": 0.5, "normalizer": 40.0}
    loss = fused_linear_kd_loss(sh, sw, th, tw, labels, backend="triton", **kw)
    f32 = [t.detach().float().requires_grad_() for t in (sh, sw)]
    ref = reference_linear_kd_loss(f32[0], f32[1], th.float(), tw.float(), labels, **kw)
    assert_kernel_close(loss, ref, dtype, "loss")
    for g, r in zip(grads(loss, sh, sw), grads(ref, *f32)):
        assert_kernel_close(g, r, dtype, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reduction_none_with_random_upstream_gradient(backend):
    sh, sw, sb, th, tw, labels = make_inputs()
    up = torch.randn(BT)
    kw = {"kind": "reverse_kl", "temperature": 3.0, "alpha": 0.7, "reduction": "none"}
    per_tok = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, backend=backend, chunk_size=10, **kw)
    ref = reference_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, **kw)
    assert per_tok.shape == labels.shape and torch.all(per_tok[labels == -100] == 0)
    torch.testing.assert_close(per_tok, ref, atol=1e-5, rtol=5e-4)
    for g, r in zip(grads((per_tok * up).sum(), sh, sw, sb), grads((ref * up).sum(), sh, sw, sb)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=5e-4)


def test_reduction_none_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    sh = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(6, 3, generator=g, dtype=torch.float64)
    tw = torch.randn(9, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 8, -100, 4, 2, -100])

    def f(h, w):
        return fused_linear_kd_loss(h, w, th, tw, labels, kind="jsd", beta=0.3, temperature=2.0, alpha=0.4,
                                    reduction="none", backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(f, (sh, sw), eps=1e-6, atol=1e-7, fast_mode=True)


def test_teacher_gets_no_gradient_and_student_head_can_be_frozen():
    sh, sw, _, th, tw, labels = make_inputs()
    th.requires_grad_()
    tw.requires_grad_()
    sw.requires_grad_(False)
    loss = fused_linear_kd_loss(sh, sw, th, tw, labels, backend="torch")
    g_sh, g_th, g_tw = torch.autograd.grad(loss, (sh, th, tw), allow_unused=True)
    assert g_th is None and g_tw is None
    expected = direct_kd(sh, sw, torch.zeros(V), th, tw, labels, kind="forward_kl")
    torch.testing.assert_close(g_sh, torch.autograd.grad(expected, sh)[0], atol=1e-5, rtol=5e-4)


def test_jsd_endpoints_follow_trl():
    sh, sw, _, th, tw, labels = make_inputs()
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = fused_linear_kd_loss(sh, sw, th, tw, labels, kind="jsd", beta=beta, backend="torch")
        other = fused_linear_kd_loss(sh, sw, th, tw, labels, kind=kind, backend="torch")
        torch.testing.assert_close(jsd, other, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_with_k_equal_vocab_equals_full(kind):
    sh, sw, sb, th, tw, labels = make_inputs()
    kw = {**KINDS[kind], "temperature": 2.0, "alpha": 0.25}
    full = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, backend="torch", **kw)
    teacher_logprobs = F.log_softmax(th @ tw.t(), -1)  # stored at T = 1, as generation engines do
    lp, ids = teacher_logprobs.topk(V, -1)  # k = V, sorted: a permutation of the vocabulary
    top = topk_kd_loss(sh, sw, lp, ids, labels, student_bias=sb, chunk_size=8, **kw)
    torch.testing.assert_close(top, full, atol=1e-5, rtol=5e-4)
    for g, r in zip(grads(top, sh, sw, sb), grads(full, sh, sw, sb)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=5e-4)


def test_topk_renormalises_both_distributions_over_the_ids():
    sh, sw, _, th, tw, labels = make_inputs()
    k, temp = 7, 2.0
    lp, ids = F.log_softmax(th @ tw.t(), -1).topk(k, -1)
    loss = topk_kd_loss(sh, sw, lp, ids, labels, kind="forward_kl", temperature=temp, alpha=0.0)
    # direct: teacher top-k renormalised at T, student restricted to the same ids and renormalised
    s = (sh @ sw.t()).gather(1, ids)
    pt = F.softmax((th @ tw.t()).gather(1, ids) / temp, -1)
    d = (pt * (pt.log() - F.log_softmax(s / temp, -1))).sum(-1)
    expected = torch.where(labels != -100, temp**2 * d, 0.0).sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=5e-4)


ONLINE_CASES = {  # kind options, temperature, alpha, reduction; forward KL (and JSD at beta 0) go online
    "forward_kl-T1": (KINDS["forward_kl"], 1.0, 0.5, "sum"),
    "forward_kl-T2": (KINDS["forward_kl"], 2.0, 0.3, "sum"),
    "forward_kl-kd_only": (KINDS["forward_kl"], 1.0, 0.0, "sum"),
    "forward_kl-kd_only-T3": (KINDS["forward_kl"], 3.0, 0.0, "sum"),
    "forward_kl-ce_only": (KINDS["forward_kl"], 2.0, 1.0, "sum"),
    "forward_kl-none": (KINDS["forward_kl"], 2.0, 0.6, "none"),
    "jsd_beta0-T2": ({"kind": "jsd", "beta": 0.0}, 2.0, 0.5, "sum"),
    # reverse KL and JSD keep the row chunks (two passes online measured slower): same parity, no online call
    "reverse_kl-T2": (KINDS["reverse_kl"], 2.0, 0.3, "sum"),
    "jsd_0.2-none": (KINDS["jsd_0.2"], 3.0, 0.7, "none"),
}


def force_small_online_slices(monkeypatch):
    """8 vocabulary slices of 16 rows: every rescaling step of the online softmax runs."""
    ce_mod = importlib.import_module("peftlab.kernels.fused_linear_cross_entropy")
    monkeypatch.setattr(ce_mod, "ONLINE_MIN_SLICE", 16)
    monkeypatch.setattr(ce_mod, "ONLINE_SLICE_BYTES", 1)
    return ce_mod


@pytest.mark.parametrize("case", list(ONLINE_CASES))
def test_frozen_16bit_student_head_goes_vocabulary_outer_and_matches_the_reference(case, monkeypatch):
    """model.frozen_16bit on the CPU: frozen bf16 student and teacher heads (and biases) under fp32 hidden states
    take the online path for forward KL (torch_kd_online, one pass), never the row chunks (which upcast both heads
    per chunk); reverse KL and JSD take the row chunks. Either way the loss and the hidden states' gradient equal the
    full-logits reference over the upcast heads. chunk_size=16 makes 3 row blocks."""
    kw, temperature, alpha, reduction = ONLINE_CASES[case]
    ce_mod = force_small_online_slices(monkeypatch)
    online, chunked = [], []
    real_online, real_grads = kd_mod.torch_kd_online, ce_mod.chunk_grad_matmuls
    monkeypatch.setattr(kd_mod, "torch_kd_online", lambda *a, **k: online.append(1) or real_online(*a, **k))
    monkeypatch.setattr(ce_mod, "chunk_grad_matmuls", lambda *a: chunked.append(1) or real_grads(*a))
    sh, sw, sb, th, tw, labels = make_inputs()
    sw, sb, tw = sw.detach().bfloat16(), sb.detach().bfloat16(), tw.bfloat16()
    tb = (torch.randn(V, generator=torch.Generator().manual_seed(5)) * 0.3).bfloat16()
    opts = {**kw, "temperature": temperature, "alpha": alpha, "reduction": reduction}
    up = torch.randn(BT) if reduction == "none" else torch.tensor(1.0)
    loss = fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, backend="torch",
                                chunk_size=16, **opts)
    (grad,) = grads((loss * up).sum(), sh)
    ref = reference_linear_kd_loss(sh, sw.float(), th, tw.float(), labels, student_bias=sb.float(),
                                   teacher_bias=tb.float(), **opts)
    (ref_grad,) = grads((ref * up).sum(), sh)
    goes_online = kd_mod._kernel_kind(kw["kind"], kw.get("beta", 0.5)) == 0
    assert (bool(online), bool(chunked)) == (goes_online, not goes_online)
    torch.testing.assert_close(loss, ref, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 0.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_over_a_frozen_16bit_head_is_online_and_equals_the_upcast_head(kind, alpha, monkeypatch):
    """Offline distillation over a frozen bf16 head: the CE goes vocabulary-outer (torch_ce_online; skipped at
    α = 0, where the loss needs no full-vocabulary logits at all) and the divergence gathers the k head rows;
    loss and gradient equal the row-chunked path over the fp32 upcast of the same head."""
    ce_mod = force_small_online_slices(monkeypatch)
    monkeypatch.setattr(kd_mod, "TOPK_GATHER_BYTES", 1)  # one row per gather block
    ce_calls, chunked = [], []
    real_ce, real_grads = kd_mod.torch_ce_online, ce_mod.chunk_grad_matmuls
    monkeypatch.setattr(kd_mod, "torch_ce_online", lambda *a, **k: ce_calls.append(1) or real_ce(*a, **k))
    monkeypatch.setattr(ce_mod, "chunk_grad_matmuls", lambda *a: chunked.append(1) or real_grads(*a))
    sh, sw, sb, th, tw, labels = make_inputs()
    sw16, sb16 = sw.detach().bfloat16(), sb.detach().bfloat16()
    lp, ids = F.log_softmax(th @ tw.t(), -1).topk(7, -1)
    kw = {**KINDS[kind], "temperature": 2.0, "alpha": alpha}
    loss = topk_kd_loss(sh, sw16, lp, ids, labels, student_bias=sb16, chunk_size=16, **kw)
    (grad,) = grads(loss, sh)
    assert not chunked and len(ce_calls) == (1 if alpha else 0)
    sh32 = sh.detach().clone().requires_grad_()
    ref = topk_kd_loss(sh32, sw16.float(), lp, ids, labels, student_bias=sb16.float(), chunk_size=16, **kw)
    (ref_grad,) = grads(ref, sh32)
    assert chunked  # the reference took the row chunks
    torch.testing.assert_close(loss, ref, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=2e-6, rtol=1e-5)


def test_user_errors():
    sh, sw, _, th, tw, labels = make_inputs()
    with pytest.raises(PeftlabError, match="kind="):
        fused_linear_kd_loss(sh, sw, th, tw, labels, kind="kl")
    with pytest.raises(PeftlabError, match="share"):
        fused_linear_kd_loss(sh, sw, th, tw[:-1], labels)
    with pytest.raises(PeftlabError, match="temperature"):
        fused_linear_kd_loss(sh, sw, th, tw, labels, temperature=0.0)
    with pytest.raises(PeftlabError, match="normalizer is only valid"):
        fused_linear_kd_loss(sh, sw, th, tw, labels, reduction="none", normalizer=3)


def test_aot_compile_kd_row_kernel(capsys):
    """The KD row kernel (each kind) for sm_80/89/90; it reads fp32 logits buffers so
    its launches do not depend on the input dtype. The logits GEMM is covered by the CE test."""
    pytest.importorskip("triton")
    from peftlab.kernels.aot import assert_compiles

    launches = [launch for launch in kd_mod.aot_launches(torch.bfloat16) if launch[0].__name__ == "_kd_row_kernel"]
    reports = assert_compiles(launches, capsys=capsys)
    assert len(reports) == 3 * 3
