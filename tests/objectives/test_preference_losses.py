"""Preference losses against TRL 1.16's own code, in fp64, on random per-sequence log-probs.

Each parity test runs TRL's real loss method on a minimal stand-in ``self`` (a SimpleNamespace carrying only the
attributes the method reads, and a stand-in model whose "fused LM head" returns our per-sequence log-probs as
per-token log-probs that sum to them), then compares the loss, the gradients w.r.t. the policy log-probs and
the logged rewards with peftlab's functions at 1e-9. Nothing of TRL's formulas is re-typed here.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.objectives.preference_losses import (
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

TOL = {"atol": 1e-9, "rtol": 1e-9}
CPU = torch.device("cpu")


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m)


def _fake_model(table: dict[int, torch.Tensor]):
    """A model whose forward returns per-token log-probs chosen by the identity of ``input_ids``."""

    def model(**kwargs):
        log_probs = table[id(kwargs["input_ids"])]
        n, t = log_probs.shape
        zeros = torch.zeros(n, t, dtype=log_probs.dtype)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(n, t, dtype=torch.bool))

    model.training = True
    return model


def _per_token(seq_logps: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token log-probs (N, width) summing to ``seq_logps`` (the sum sits in the first column)."""
    return torch.cat([seq_logps[:, None], torch.zeros(seq_logps.shape[0], width - 1, dtype=seq_logps.dtype)], 1)


def _logps(g: torch.Generator, n: int, scale: float = 20.0) -> torch.Tensor:
    return (-scale * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()


class _KeepFp64(torch.Tensor):
    """TRL's ORPO casts its inputs with ``.float()``; this keeps fp64 through that cast so the comparison is fp64."""

    def float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else super().float(*args, **kwargs)


def _trl_dpo(pc, pr, rc, rr, lengths_c, lengths_r, *, beta, label_smoothing, loss_type):
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    b = pc.shape[0]
    width = int(max(lengths_c.max(), lengths_r.max())) + 1
    # Row: one prompt token, then the completion's tokens, then padding (IPO reads the completion lengths here).
    lengths = torch.cat([lengths_c, lengths_r])
    completion_mask = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= lengths[:, None])
    input_ids = torch.zeros(2 * b, width, dtype=torch.long)
    model = _fake_model({id(input_ids): _per_token(torch.cat([pc, pr]), width - 1)})
    trainer = SimpleNamespace(
        model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask.long(), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_dpo_equals_trl(loss_type):
    g = torch.Generator().manual_seed(0)
    b = 7
    pc, pr = _logps(g, b), _logps(g, b)
    rc, rr = _logps(g, b).detach(), _logps(g, b).detach()
    lengths_c = torch.randint(1, 9, (b,), generator=g)
    lengths_r = torch.randint(1, 9, (b,), generator=g)
    ls = 0.2 if loss_type == "robust" else 0.0
    for beta in (0.1, 0.7):
        expected, metrics = _trl_dpo(pc, pr, rc, rr, lengths_c, lengths_r, beta=beta, label_smoothing=ls,
                                     loss_type=loss_type)
        got = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls, loss_type=loss_type,
                       chosen_lengths=lengths_c, rejected_lengths=lengths_r)
        torch.testing.assert_close(got.loss, expected, **TOL)
        for a, e in zip(torch.autograd.grad(got.loss, (pc, pr)), torch.autograd.grad(expected, (pc, pr)),
                        strict=True):
            torch.testing.assert_close(a, e, **TOL)
        assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-12)
        assert got.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-12)
        accuracy = (got.chosen_rewards > got.rejected_rewards).double().mean().item()
        assert accuracy == pytest.approx(metrics["rewards/accuracies"][-1], abs=1e-7)  # TRL: a float32 mean
        assert not got.chosen_rewards.requires_grad


def _trl_cpo(chosen, rejected, *, beta, loss_type, label_smoothing, simpo_gamma=0.5):
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    logits = torch.zeros(chosen.shape[0], 2, 3, dtype=chosen.dtype)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              simpo_gamma=simpo_gamma, cpo_alpha=0.0, aux_loss_enabled=False,
                              accelerator=_accelerator())
    trainer.cpo_loss = functools.partial(cpo_trainer.CPOTrainer.cpo_loss, trainer)
    trainer.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, torch.tensor(0.0))
    return cpo_trainer.CPOTrainer.get_batch_loss_metrics(trainer, None, {})


def test_cdpo_label_smoothing_equals_trl_conservative_loss():
    """TRL 1.16's DPOTrainer dropped cDPO's smoothing from ``sigmoid``; its CPO sigmoid loss still has the
    conservative formula, which on the DPO log-ratios is cDPO."""
    g = torch.Generator().manual_seed(1)
    pc, pr = _logps(g, 6), _logps(g, 6)
    rc, rr = _logps(g, 6).detach(), _logps(g, 6).detach()
    expected, metrics = _trl_cpo(pc - rc, pr - rr, beta=0.3, loss_type="sigmoid", label_smoothing=0.15)
    got = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.15)
    torch.testing.assert_close(got.loss, expected, **TOL)
    for a, e in zip(torch.autograd.grad(got.loss, (pc, pr)), torch.autograd.grad(expected, (pc, pr)), strict=True):
        torch.testing.assert_close(a, e, **TOL)
    assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo(label_smoothing):
    g = torch.Generator().manual_seed(2)
    chosen, rejected = _logps(g, 9, scale=3.0), _logps(g, 9, scale=3.0)  # per-token means
    for beta, gamma in ((0.1, 0.5), (2.0, 1.2)):
        expected, metrics = _trl_cpo(chosen, rejected, beta=beta, loss_type="simpo",
                                     label_smoothing=label_smoothing, simpo_gamma=gamma)
        got = simpo_loss(chosen, rejected, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
        torch.testing.assert_close(got.loss, expected, **TOL)
        for a, e in zip(torch.autograd.grad(got.loss, (chosen, rejected)),
                        torch.autograd.grad(expected, (chosen, rejected)), strict=True):
            torch.testing.assert_close(a, e, **TOL)
        assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-12)
        margins = (got.chosen_rewards - got.rejected_rewards).mean().item()
        assert margins == pytest.approx(metrics["rewards/margins"], abs=1e-12)


def test_orpo_equals_trl():
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(3)
    # Per-token means, both sides of TRL's log1mexp branch at -ln 2.
    chosen = torch.cat([-0.05 - 0.6 * torch.rand(4, generator=g, dtype=torch.float64),
                        -1.0 - 3 * torch.rand(4, generator=g, dtype=torch.float64)]).requires_grad_()
    rejected = (-0.02 - 4 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_()
    nll = (-chosen).mean()  # any differentiable scalar stands for the chosen tokens' cross-entropy
    logits = torch.zeros(8, 2, 3, dtype=torch.float64)
    for beta in (0.1, 0.5):
        trainer = SimpleNamespace(beta=beta, aux_loss_enabled=False, accelerator=_accelerator())
        trainer.odds_ratio_loss = functools.partial(orpo_trainer.ORPOTrainer.odds_ratio_loss, trainer)
        trainer.concatenated_forward = lambda model, batch: (
            chosen.as_subclass(_KeepFp64), rejected.as_subclass(_KeepFp64), logits, logits, nll)
        expected, metrics = orpo_trainer.ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
        expected = expected.as_subclass(torch.Tensor)
        assert expected.dtype == torch.float64
        got = orpo_loss(chosen, rejected, nll, beta=beta)
        torch.testing.assert_close(got.loss, expected, **TOL)
        for a, e in zip(torch.autograd.grad(got.loss, (chosen, rejected), retain_graph=True),
                        torch.autograd.grad(expected, (chosen, rejected), retain_graph=True), strict=True):
            torch.testing.assert_close(a, e, **TOL)
        assert got.log_odds.mean().item() == pytest.approx(metrics["log_odds_chosen"], abs=1e-12)
        assert torch.nn.functional.logsigmoid(got.log_odds).mean().item() == pytest.approx(
            metrics["log_odds_ratio"], abs=1e-12)
        assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-12)


def test_kto_equals_trl():
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(4)
    b = 8
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    policy, ref = _logps(g, b), _logps(g, b).detach()
    # Mismatched completions: a policy slightly above the reference so the clamp at 0 is not what is tested.
    ref_kl = _logps(g, b).detach()
    policy_kl = ref_kl + 0.5 * torch.rand(b, generator=g, dtype=torch.float64)
    input_ids = torch.zeros(b, 2, dtype=torch.long)
    kl_input_ids = torch.ones(b, 2, dtype=torch.long)
    model = _fake_model({id(input_ids): _per_token(policy, 1), id(kl_input_ids): _per_token(policy_kl, 1)})
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "completion_mask": torch.tensor([[0, 1]] * b), "label": labels,
             "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(kl_input_ids),
             "KL_completion_mask": torch.tensor([[0, 1]] * b), "ref_logps": ref, "ref_KL_logps": ref_kl}
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.4, 1.3, 0.7)):
        trainer = SimpleNamespace(
            model=model, accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
            calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        )
        trainer._compute_kl_logps = functools.partial(kto_trainer.KTOTrainer._compute_kl_logps, trainer)
        expected = kto_trainer.KTOTrainer._compute_loss(trainer, model, batch, False)
        metrics = trainer._metrics["train"]
        kl = kto_kl_estimate(policy_kl, ref_kl)
        got = kto_loss(policy, ref, labels, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
        assert kl.item() > 0
        assert kl.item() == pytest.approx(metrics["kl"][-1], abs=1e-12)
        torch.testing.assert_close(got.loss, expected, **TOL)
        torch.testing.assert_close(torch.autograd.grad(got.loss, policy)[0],
                                   torch.autograd.grad(expected, policy)[0], **TOL)
        assert got.chosen_rewards.shape == (4,) and got.rejected_rewards.shape == (4,)
        assert got.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-12)
        assert got.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-12)


def test_kto_kl_estimate_is_clamped_and_detached():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-1.0, -2.0])
    kl = kto_kl_estimate(policy, ref)
    assert kl.item() == 0.0 and not kl.requires_grad
    assert kto_kl_estimate(ref, policy).item() == pytest.approx(2.5)


def test_bf16_inputs_compute_in_fp32():
    pc, pr, rc, rr = (torch.tensor([-10.0, -20.0], dtype=torch.bfloat16) for _ in range(4))
    out = dpo_loss(pc, pr - 1, rc, rr)
    assert out.losses.dtype == torch.float32
    assert simpo_loss(pc, pr).losses.dtype == torch.float32


@pytest.mark.parametrize(("call", "message"), [
    (lambda x: dpo_loss(x, x, x, x, beta=0.0), "beta must be a finite number > 0 (got 0.0)"),
    (lambda x: dpo_loss(x, x, x, x, beta=float("nan")), "beta must be a finite number > 0"),
    (lambda x: dpo_loss(x, x, x, x, loss_type="hinge"), "loss_type must be one of sigmoid, ipo, robust (got 'hinge')"),
    (lambda x: dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5),
     "label_smoothing must lie in [0, 0.5) for loss_type 'robust' (got 0.5)"),
    (lambda x: dpo_loss(x, x, x, x, label_smoothing=0.7), "label_smoothing must lie in [0, 0.5] for loss_type 'sigmoid'"),
    (lambda x: dpo_loss(x, x, x, x, loss_type="ipo"), "loss_type 'ipo' needs chosen_lengths and rejected_lengths"),
    (lambda x: dpo_loss(x, x, x, x[:2]), "per-sequence log-probs must be 1-D tensors of one shape"),
    (lambda x: simpo_loss(x, x, simpo_gamma=float("inf")), "simpo_gamma must be a finite number (got inf)"),
    (lambda x: simpo_loss(x, x, label_smoothing=-0.1), "label_smoothing must lie in [0, 0.5] for SimPO"),
    (lambda x: orpo_loss(x, x, x[:2]), "chosen_nll must be a scalar or shaped like chosen_logps (3,)"),
    (lambda x: kto_loss(x, x, x > -2, 0.0, undesirable_weight=0.0), "undesirable_weight must be a finite number > 0"),
    (lambda x: kto_loss(x, x, (x > -2)[:2], 0.0), "is_desirable must have the shape of policy_logps (3,)"),
    (lambda x: dpo_loss(x.long(), x, x, x), "preference losses take floating-point log-probs"),
])
def test_bad_hyper_parameters_are_refused(call, message):
    x = torch.tensor([-1.0, -2.0, -3.0])
    with pytest.raises(PeftlabError) as err:
        call(x)
    assert message in str(err.value)
