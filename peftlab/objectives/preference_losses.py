"""Preference losses on per-sequence log-probs: DPO (sigmoid / cDPO, IPO, robust), ORPO, SimPO and KTO.

Pure functions: they take the per-sequence log-probs the model produced (one number per completion, e.g. from
:func:`peftlab.kernels.fused_linear_sequence_logprobs`) and return a :class:`PreferenceLoss` holding the
per-example losses (differentiable w.r.t. the policy log-probs) and the detached rewards TRL logs. Nothing
here runs a model. The formulas, hyper-parameter names and defaults are TRL 1.16's (``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, the experimental ``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss``);
tests/objectives/test_preference_losses.py calls TRL's own code and checks losses and gradients in fp64.

Math runs in fp32, or in fp64 when any input is fp64 (bf16 log-prob sums lose whole nats on long completions).
Hyper-parameters are checked here too (a :class:`~peftlab.errors.PeftlabError` names the key), so a caller that
bypasses the recipe schema still cannot train on a silently meaningless loss.

Which log-probs each loss wants (the caller builds them; TRL's conventions):

- ``dpo_loss``: *sums* of the completion's label log-probs (policy and reference). ``loss_type="ipo"`` also
  needs the completion token counts (``chosen_lengths`` / ``rejected_lengths``): TRL 1.16 divides the
  log-ratios by them (IPO's per-token normalisation) while the logged rewards stay on the sums.
- ``orpo_loss``: per-token *means* of the completion log-probs (TRL's ``average_log_prob=True``), and the
  chosen completions' NLL (the token-mean cross-entropy over the batch's chosen ANSWER tokens, a scalar; TRL 1.16's
  ORPOTrainer also scores the prompt tokens, which on short answers drowns the preference: bench/cpo_vs_trl.py).
- ``simpo_loss``: per-token *means* (SimPO is length-normalised; TRL's CPO averages for ``simpo``).
- ``kto_loss``: *sums*, plus the batch KL estimate from :func:`kto_kl_estimate` on mismatched completions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from peftlab.errors import PeftlabError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")


@dataclass(frozen=True)
class PreferenceLoss:
    """One batch of a preference loss.

    ``losses`` has one entry per example (per pair for DPO/ORPO/SimPO, per completion for KTO); their mean is the
    batch loss TRL optimises (:attr:`loss`). Rewards are detached: ``chosen_rewards`` / ``rejected_rewards`` are
    per pair for the paired losses, and for KTO the desirable / undesirable completions' rewards (in batch order,
    so their lengths are the two counts). ``nll`` (ORPO's SFT term), ``log_odds`` (ORPO, per pair) and ``kl``
    (KTO's clamped estimate, a 0-d tensor) are detached extras for the metrics; ``None`` where a loss has none.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None = None
    log_odds: Tensor | None = None
    kl: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """The batch loss: the mean of the per-example losses (what TRL's trainers return)."""
        return self.losses.mean()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLoss:
    """DPO and its variants on summed completion log-probs; each argument is ``(B,)``.

    With ``Δ = (π_c − ref_c) − (π_r − ref_r)`` (log-ratios of the chosen minus the rejected completion):

    - ``sigmoid`` (DPO): ``−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``. ``ε = label_smoothing = 0`` is TRL 1.16's
      ``sigmoid`` loss; ``ε > 0`` is conservative DPO (cDPO, labels flipped with probability ε, ε ≤ 0.5), the
      formula TRL's sigmoid loss had before 1.x and its CPO trainer's sigmoid loss still has (TRL 1.16's
      DPOTrainer *ignores* ``label_smoothing`` for ``sigmoid``; here it is honoured, so leave it 0 for TRL's).
    - ``robust`` (rDPO): ``(−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)``, unbiased under label flips with
      probability ``ε ∈ [0, 0.5)``.
    - ``ipo``: ``(Δ' − 1/(2β))²`` where ``Δ'`` divides each log-ratio by its completion's token count (TRL 1.16
      and the IPO authors' normalisation; ``β`` is the paper's τ). Pass ``chosen_lengths`` /
      ``rejected_lengths`` (token counts, clamped to ≥ 1 as TRL does) with *sums* as the log-probs.

    Rewards (all loss types, as TRL logs them): ``β·(π − ref)`` on the summed log-ratios.
    """
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise PeftlabError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)} (got {loss_type!r})")
    _check_label_smoothing(label_smoothing, loss_type)
    tensors = _as_compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_same_shape(("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
                      tensors)
    pc, pr, rc, rr = tensors
    # The reference never gets a gradient: it is the frozen model (or cached numbers).
    chosen_logratios = pc - rc.detach()
    rejected_logratios = pr - rr.detach()
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = losses * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise PeftlabError(
                "loss_type 'ipo' needs chosen_lengths and rejected_lengths (the completion token counts): IPO "
                "normalises the summed log-ratios per token as TRL does"
            )
        n_chosen = chosen_lengths.to(device=pc.device, dtype=pc.dtype).clamp(min=1.0)
        n_rejected = rejected_lengths.to(device=pc.device, dtype=pc.dtype).clamp(min=1.0)
        _check_same_shape(("policy_chosen_logps", "chosen_lengths", "rejected_lengths"), (pc, n_chosen, n_rejected))
        ipo_delta = chosen_logratios / n_chosen - rejected_logratios / n_rejected
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO (reference-free): ``nll − β·logσ(log_odds)`` per pair.

    ``chosen_logps`` / ``rejected_logps`` are per-token *means* ``(B,)`` (so ``exp`` of them is a probability
    and the odds are finite); ``log_odds = (c − r) − (log(1−eᶜ) − log(1−eʳ))``. ``chosen_nll`` is the SFT term,
    a scalar (the token-mean cross-entropy of the batch's chosen answer tokens; TRL 1.16 includes the prompt's) or
    ``(B,)``; it is added to every pair, so :attr:`PreferenceLoss.loss` equals TRL's ``nll − mean(β·logσ(log_odds))``. ``β`` is the
    paper's λ (TRL default 0.1). Rewards: ``β·logps`` (TRL's).
    """
    _check_beta(beta)
    c, r, nll = _as_compute_dtype(chosen_logps, rejected_logps, chosen_nll)
    _check_same_shape(("chosen_logps", "rejected_logps"), (c, r))
    if nll.dim() not in (0, 1) or (nll.dim() == 1 and nll.shape != c.shape):
        raise PeftlabError(f"chosen_nll must be a scalar or shaped like chosen_logps {tuple(c.shape)} "
                           f"(got {tuple(nll.shape)})")
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    return PreferenceLoss(
        losses=nll - beta * ratio,
        chosen_rewards=beta * c.detach(),
        rejected_rewards=beta * r.detach(),
        nll=nll.detach(),
        log_odds=log_odds.detach(),
    )


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (reference-free, length-normalised, target margin γ), TRL's CPO ``loss_type="simpo"``.

    ``chosen_logps`` / ``rejected_logps`` are per-token *means* ``(B,)``. With ``m = c − r − γ/β``:
    ``−(1−ε)·logσ(βm) − ε·logσ(−βm)``, i.e. the margin ``β(c − r) − γ`` as in the SimPO paper, where
    ``simpo_gamma`` is γ itself (not γ/β). Defaults are TRL's CPOConfig (β 0.1, γ 0.5, ε 0); the SimPO paper
    trains with β around 2–2.5 and γ/β around 0.5. TRL's CPOTrainer adds ``cpo_alpha · NLL`` (default 1.0) to
    this; SimPO proper (``cpo_alpha=0``) is what this function returns. Rewards: ``β·logps``.
    """
    _check_beta(beta)
    if not math.isfinite(simpo_gamma):
        raise PeftlabError(f"simpo_gamma must be a finite number (got {simpo_gamma})")
    if not 0.0 <= label_smoothing <= 0.5:
        raise PeftlabError(f"label_smoothing must lie in [0, 0.5] for SimPO (got {label_smoothing})")
    c, r = _as_compute_dtype(chosen_logps, rejected_logps)
    _check_same_shape(("chosen_logps", "rejected_logps"), (c, r))
    margin = (c - r) - simpo_gamma / beta
    losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    return PreferenceLoss(losses=losses, chosen_rewards=beta * c.detach(), rejected_rewards=beta * r.detach())


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z₀``: ``max(0, mean(π − ref))`` over *mismatched* completions, detached.

    The inputs are summed log-probs ``(B,)`` of each prompt paired with another example's completion (TRL
    shifts the completions by one within the batch); no gradient flows through the estimate (KTO treats it as
    a constant). Under data parallelism TRL averages the per-rank means before the clamp: a caller with several
    ranks should all-reduce the mean of ``policy_kl_logps − ref_kl_logps`` and clamp that.
    """
    p, r = _as_compute_dtype(policy_kl_logps, ref_kl_logps)
    _check_same_shape(("policy_kl_logps", "ref_kl_logps"), (p, r))
    return (p - r).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired completions: summed log-probs ``(B,)`` and a bool label per completion.

    With ``ρ = π − ref`` and ``z₀ = kl`` (see :func:`kto_kl_estimate`): desirable completions lose
    ``w_d·(1 − σ(β(ρ − z₀)))``, undesirable ones ``w_u·(1 − σ(β(z₀ − ρ)))`` (Eq. 7 of the KTO paper, TRL's
    ``loss_type="kto"``). The losses stay in batch order; their mean is TRL's (which concatenates desirable then
    undesirable before its mean). Rewards ``β·ρ`` are split into the desirable (``chosen_rewards``) and the
    undesirable (``rejected_rewards``) ones.
    """
    _check_beta(beta)
    for key, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (math.isfinite(value) and value > 0):
            raise PeftlabError(f"{key} must be a finite number > 0 (got {value})")
    p, r = _as_compute_dtype(policy_logps, ref_logps)
    _check_same_shape(("policy_logps", "ref_logps"), (p, r))
    if is_desirable.shape != p.shape:
        raise PeftlabError(f"is_desirable must have the shape of policy_logps {tuple(p.shape)} "
                           f"(got {tuple(is_desirable.shape)})")
    desirable = is_desirable.to(device=p.device, dtype=torch.bool)
    z0 = torch.as_tensor(kl, dtype=p.dtype, device=p.device).detach()
    logratios = p - r.detach()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )
    rewards = beta * logratios.detach()
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=rewards[desirable],
        rejected_rewards=rewards[~desirable],
        kl=z0.reshape(()),
    )


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for ``x < 0`` without cancellation: log1p near −∞, expm1 near 0 (branch at −ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _as_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """fp64 when any input is fp64, fp32 otherwise (bf16/fp16 sums are too coarse for these differences)."""
    if any(not torch.is_floating_point(t) for t in tensors):
        raise PeftlabError("preference losses take floating-point log-probs "
                           f"(got {', '.join(str(t.dtype) for t in tensors)})")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) for t in tensors)


def _check_same_shape(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if len(shapes[0]) != 1 or any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"{n} {s}" for n, s in zip(names, shapes, strict=True))
        raise PeftlabError(f"per-sequence log-probs must be 1-D tensors of one shape (batch,): got {listed}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise PeftlabError(f"beta must be a finite number > 0 (got {beta!r})")


def _check_label_smoothing(label_smoothing: float, loss_type: str) -> None:
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise PeftlabError(
            f"label_smoothing must lie in [0, 0.5) for loss_type 'robust' (got {label_smoothing}): it is the "
            "probability that a preference label is flipped"
        )
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise PeftlabError(
            f"label_smoothing must lie in [0, 0.5] for loss_type 'sigmoid' (cDPO; got {label_smoothing})"
        )
    if loss_type == "ipo" and label_smoothing:
        raise PeftlabError(f"label_smoothing has no meaning for loss_type 'ipo' (got {label_smoothing}); set it to 0")
