"""Preference fine-tuning as an objective: DPO, IPO, robust DPO, ORPO, SimPO and KTO on LoRA adapters.

A micro-batch is ``2B`` rows of one forward (:mod:`peftlab.data.preference_batch`): the chosen answers, then the
rejected ones (KTO: the completions, then the mismatched completions of its KL estimate). Per-sequence
log-probs come from the chunked fused-linear path (:func:`peftlab.objectives.reference.sequence_logps`, never
whole logits); the reference is the same model with its adapters off (:mod:`peftlab.objectives.reference`),
per step or precomputed once in :meth:`PreferenceObjective.prepare`; ORPO and SimPO need none. The losses are
:mod:`peftlab.objectives.preference_losses` (TRL's formulas).

Normalisation: a step's loss is ``Σ w_i·ℓ_i / Σ w_i`` over every pair (KTO: completion) of the step, ``w`` the
example's loss weight (1 unless ``loss_weight``/``weight`` say otherwise), so gradient accumulation gives exactly
the gradient of the whole step's mean — TRL's per-batch mean when all weights are 1. ORPO's SFT term is, as in
TRL, the token mean over the chosen answers of the micro-batch.

Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` (+ ``kl`` for KTO; + ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen`` for ORPO) — on
train averaged over the steps since the last log record (:meth:`step_metrics`), and on eval (``eval_`` prefix)
with ``eval_loss``; KTO's eval accuracy compares the desirable and undesirable completions of one source pair.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.checkpoint.store import checkpoint_dirs
from peftlab.data.sources import hash_files
from peftlab.engine.process_group import all_reduce_sum, is_main_process
from peftlab.errors import PeftlabError
from peftlab.evaluation.evaluate import generation_metrics
from peftlab.objectives.causal_lm import LossSettings, count_targets
from peftlab.objectives.preference_losses import (
    PreferenceLoss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from peftlab.objectives.reference import (
    ReferenceCache,
    pairs_fingerprint,
    reference_logps,
    rows,
    sequence_logps,
)

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
DPO_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "robust": "robust"}
REFERENCE_FILE = "reference_logps.json"
FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class _Sums:
    """Running sums of the per-example figures (means on read); counts per figure."""

    total: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        self.total[name] += float(values.sum())
        self.count[name] += values.numel()

    def means(self, *, reduce: bool) -> dict[str, float]:
        out = {}
        for name in sorted(set(self.total) | set(self.count)):
            total, count = self.total[name], self.count[name]
            if reduce:  # every rank calls this at the same points (the log steps)
                total, count = all_reduce_sum(total), all_reduce_sum(count)
            if count:
                out[name] = total / count
        if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= set(out):  # KTO, as TRL logs it
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


@dataclass
class PreferenceObjective:
    """See the module docstring. ``config`` is the recipe's ``preference:`` section
    (:class:`peftlab.recipe.preference_config.PreferenceConfig`)."""

    config: Any
    settings: LossSettings = field(default_factory=LossSettings)
    tokenizer: Any = None             # evaluation only (generated answers are decoded)
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    recipe: Any = None
    n_train: int = 0                  # training examples (the precomputed reference covers them all)
    data_fingerprint: str = ""        # of the training rows: part of the precomputed reference's key
    n_eval: int = 0                   # held-out examples (precomputed too)
    cache: ReferenceCache | None = None
    _window: _Sums = field(default_factory=_Sums)

    # ---- the protocol ----
    def targets(self, batch: Batch) -> int:
        """Pairs (KTO: completions) of a micro-batch."""
        return int(batch["pairs"])

    def trained_tokens(self, batch: Batch) -> int:
        """Answer tokens whose log-probs the loss scores (the run's ``tokens_seen``; prompts are never trained):
        chosen + rejected of every pair; KTO: its completions (the mismatched rows of the KL estimate carry no
        gradient). The same count as :func:`~peftlab.objectives.reference.sequence_logps`' tokens per row."""
        if self.config.method == "kto":
            return count_targets(rows(batch, 0, int(batch["pairs"])))
        return count_targets(batch)

    def normalizer(self, batch: Batch) -> float:
        """Σ of the pairs' loss weights (= the pairs when unweighted)."""
        return float(self._weights(batch).double().sum())

    def loss(self, model: nn.Module, batch: Batch, *, normalizer: float) -> torch.Tensor:
        out, _ = self._forward(model, batch, self._window)
        return (out.losses * self._weights(batch).to(out.losses)).sum() / normalizer

    def step_metrics(self) -> dict[str, float]:
        """The train figures averaged over the steps since the last call (summed over ranks), then reset."""
        out = self._window.means(reduce=True)
        self._window = _Sums()
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch] | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if batches:
            was_training = model.training
            model.eval()
            sums, loss_sum, n = _Sums(), 0.0, 0
            try:
                for batch in batches:
                    out, _ = self._forward(model, batch, sums, evaluating=True)
                    loss_sum += float(out.losses.double().sum())
                    n += out.losses.numel()
            finally:
                model.train(was_training)
            metrics["eval_loss"] = loss_sum / n if n else float("nan")
            metrics.update({f"eval_{k}": v for k, v in sums.means(reduce=False).items()})
        r = self.recipe
        if r is not None and r.eval.metric in ("exact_match", "token_f1") and self.eval_prompts:
            metrics.update(generation_metrics(model, self.tokenizer, self.eval_prompts[: r.eval.max_prompts],
                                              max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size,
                                              show=r.eval.show_samples))
        return metrics

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        """Nothing beside the adapter: the result is a plain LoRA adapter."""

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        """``reference: precomputed``: the reference log-probs of every training and held-out pair, once, from the
        model as training starts (base + ``adapter.init_from`` if any), kept in ``output.dir/reference_logps.json``;
        a resumed run reads them back (its adapters have moved on). An eval before this (``eval_at_start``) scores
        the starting model against itself."""
        if self.config.reference != "precomputed" or not self.config.needs_reference or self.n_train == 0:
            return
        path = self.recipe.output_dir / REFERENCE_FILE
        key = reference_key(self.recipe, self.data_fingerprint)
        cached = ReferenceCache.read(path, key)
        if cached is not None and len(cached) > 0:
            self.cache = cached
            logger.info(f"preference: reference log-probs of {len(cached)} pairs read from {path}")
            return
        if resuming(self.recipe):
            raise PeftlabError(
                f"{path}: the precomputed reference log-probs of this run are missing or were computed for other "
                "data/model settings; a resumed run cannot recompute them (its adapters have trained). Start the "
                "run over (remove resume), or use preference.reference: adapters_off")
        self.cache = ReferenceCache(key)
        bs = self.recipe.train.micro_batch_size
        logger.info(f"preference: computing the reference log-probs of {self.n_train} training and {self.n_eval} "
                    f"held-out pairs once (reference: precomputed) -> {path}")
        self.cache.fill(model, self.n_train, bs, train_batches, self.settings)
        if self.n_eval:  # the held-out pairs too (their sample ids differ from the training rows')
            self.cache.fill(model, self.n_eval, bs, lambda ix: train_batches(ix, split="eval"), self.settings)
        if is_main_process():
            self.cache.save(path)

    def begin_step(self, step: int, total_steps: int) -> None:
        """No schedule."""

    # ---- the losses ----
    @staticmethod
    def _weights(batch: Batch) -> torch.Tensor:
        """One loss weight per pair (KTO: per completion): the row weight of its first row."""
        pairs = int(batch["pairs"])
        w = batch.get("loss_weights")
        return torch.ones(pairs) if w is None else w[:pairs, 0].float().cpu()

    def _reference(self, model: nn.Module, batch: Batch, policy: torch.Tensor) -> torch.Tensor:
        if self.config.reference != "precomputed":
            return reference_logps(model, batch, self.settings)
        if self.cache is None:  # an eval before prepare(): the model is the starting model, its own reference
            return policy.detach()
        return self.cache.lookup(batch)

    def _forward(self, model: nn.Module, batch: Batch, sums: _Sums,
                 evaluating: bool = False) -> tuple[PreferenceLoss, torch.Tensor]:
        """The micro-batch's per-example losses (with the figures added to ``sums``) and the policy log-probs."""
        c = self.config
        pairs = int(batch["pairs"])
        if c.method == "kto":
            return self._kto(model, batch, pairs, sums, evaluating)
        logps, n_tokens = sequence_logps(model, batch, self.settings)  # (2B,): chosen rows, then rejected rows
        chosen, rejected = logps[:pairs], logps[pairs:]
        n_c, n_r = n_tokens[:pairs], n_tokens[pairs:]
        if c.method in DPO_TYPES:
            ref = self._reference(model, batch, logps).to(logps)
            out = dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], beta=c.beta, label_smoothing=c.label_smoothing,
                           loss_type=DPO_TYPES[c.method], chosen_lengths=n_c, rejected_lengths=n_r)
            if c.sft_weight:  # RPO: + α · token-mean NLL of the micro-batch's chosen answers (TRL's "sft" loss)
                nll = -chosen.sum() / n_c.sum().clamp(min=1).to(chosen)
                out = dataclasses.replace(out, losses=out.losses + c.sft_weight * nll, nll=nll.detach())
                sums.add("nll_loss", nll.detach().reshape(1))
            shown_c, shown_r = chosen, rejected
        else:  # reference-free, length-normalised log-probs
            mean_c, mean_r = chosen / n_c.clamp(min=1).to(chosen), rejected / n_r.clamp(min=1).to(rejected)
            if c.method == "orpo":
                nll = -chosen.sum() / n_c.sum().clamp(min=1).to(chosen)
                out = orpo_loss(mean_c, mean_r, nll, beta=c.beta)
                sums.add("nll_loss", out.nll.reshape(1))
                # TRL's names: log_odds_ratio = mean logσ(log odds), log_odds_chosen = mean log odds
                sums.add("log_odds_ratio", torch.nn.functional.logsigmoid(out.log_odds.detach()))
                sums.add("log_odds_chosen", out.log_odds.detach())
            else:
                out = simpo_loss(mean_c, mean_r, beta=c.beta, simpo_gamma=c.simpo_gamma,
                                 label_smoothing=c.label_smoothing)
            shown_c, shown_r = mean_c, mean_r
        _pair_figures(sums, out, shown_c, shown_r)
        return out, logps

    def _kto(self, model: nn.Module, batch: Batch, n: int, sums: _Sums,
             evaluating: bool) -> tuple[PreferenceLoss, torch.Tensor]:
        c = self.config
        matched, mismatched = rows(batch, 0, n), rows(batch, n, 2 * n)
        logps, _ = sequence_logps(model, matched, self.settings)
        ref = reference_logps(model, batch, self.settings).to(logps)  # both halves, adapters off
        with torch.no_grad():  # KTO's reference point z0 carries no gradient (TRL computes it without one)
            kl_logps, _ = sequence_logps(model, mismatched, self.settings)
        # z0 = max(0, mean over the step's ranks of the mismatched log-ratios)
        diff = (kl_logps.double() - ref[n:].double())
        total, count = all_reduce_sum(float(diff.sum())), all_reduce_sum(diff.numel())
        kl = kto_kl_estimate(torch.tensor([total / max(count, 1)]), torch.zeros(1))
        desirable = batch["desirable"].to(logps.device)
        out = kto_loss(logps, ref[:n], desirable, kl, beta=c.beta, desirable_weight=c.desirable_weight,
                       undesirable_weight=c.undesirable_weight)
        sums.add("kl", out.kl.reshape(1))
        sums.add("rewards/chosen", out.chosen_rewards)
        sums.add("rewards/rejected", out.rejected_rewards)
        sums.add("logps/chosen", logps.detach()[desirable])
        sums.add("logps/rejected", logps.detach()[~desirable])
        if evaluating:  # the two completions of one source pair share its sample id: compare them
            rewards = (c.beta * (logps.detach() - ref[:n])).tolist()
            by_id: dict[int, dict[bool, float]] = defaultdict(dict)
            for sid, good, reward in zip(batch["sample_ids"].tolist(), desirable.tolist(), rewards):
                by_id[sid][good] = reward
            both = [(v[True], v[False]) for v in by_id.values() if len(v) == 2]
            if both:
                sums.add("rewards/accuracies", torch.tensor([float(a > b) for a, b in both]))
                sums.add("rewards/margins", torch.tensor([a - b for a, b in both]))
        return out, logps


def _pair_figures(sums: _Sums, out: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    sums.add("rewards/chosen", out.chosen_rewards)
    sums.add("rewards/rejected", out.rejected_rewards)
    sums.add("rewards/margins", out.chosen_rewards - out.rejected_rewards)
    sums.add("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).float())
    sums.add("logps/chosen", chosen.detach())
    sums.add("logps/rejected", rejected.detach())


def reference_key(recipe: Any, data_fingerprint: str) -> str:
    """What precomputed reference log-probs depend on: the training rows, the model, its quantization and
    starting adapter (with the content of ``adapter.init_from``), the kernels."""
    h = hashlib.sha256(json.dumps([recipe.fingerprint("model", "quantization", "adapter", "kernels", "data"),
                                   data_fingerprint], sort_keys=True).encode())
    if recipe.adapter.init_from:
        init = recipe.resolve_path(recipe.adapter.init_from)
        files = sorted(init.glob("adapter_model.*")) if init.is_dir() else []
        h.update(hash_files(files).encode() if files else b"")
    return h.hexdigest()[:16]


def resuming(recipe: Any) -> bool:
    """Whether this run continues from a checkpoint (``resume:`` set and one exists)."""
    return recipe.resume is not None and bool(checkpoint_dirs(recipe.output_dir / recipe.checkpoint.dir))


def build_preference_objective(recipe: Any, loaded: Any, data: Any) -> PreferenceObjective:
    """The objective of a recipe with a ``preference:`` section."""
    settings = LossSettings.from_recipe(recipe, loaded.model)
    return PreferenceObjective(recipe.preference, settings, loaded.tokenizer, data.eval_prompts, recipe,
                               n_train=len(data.train), data_fingerprint=pairs_fingerprint([*data.train, *(data.eval or [])]),
                               n_eval=len(data.eval or []))
