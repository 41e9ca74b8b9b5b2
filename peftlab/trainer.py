"""The training loop of ``peftlab train``: one readable function from recipe to adapter.

    setup   recipe -> seed -> model (+4-bit, +LoRA) -> data -> engine
    loop    for each optimizer step: the micro-batches of the step are drawn from a seeded
            per-epoch permutation; their target tokens are counted first, so every micro-batch loss is
            Σ token losses / (targets in the whole step) and accumulation is exact; backward; clip;
            step; schedule; log; eval every ``eval_every``; save every ``save_every``
    finish  eval, PEFT-format adapter, metrics JSONL / TensorBoard, loss-curve PNG, summary.json

The engine (``LocalEngine`` here, DeepSpeed under scale-out) owns backward and the optimizer step;
the loss takes final hidden states and the head weight (fused, never whole logits).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.errors import PeftlabError
from peftlab.loss import LossSettings, causal_lm_loss, count_targets
from peftlab.metrics import RunLog, plot_loss_curve


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], settings: LossSettings,
                         backward=lambda loss: loss.backward(), loss_fn=causal_lm_loss) -> tuple[float, int]:
    """Forward/backward the micro-batches of one optimizer step; returns (step loss, target tokens).

    Target tokens are counted over *all* micro-batches first and every micro-batch's summed token
    loss is divided by that total, so the accumulated gradient equals the gradient of the token-mean
    loss of the whole step — whatever the split into micro-batches (a mean of per-micro-batch means
    would weight tokens of short micro-batches more).
    """
    n_targets = sum(count_targets(b) for b in batches)
    total = 0.0
    if n_targets == 0:
        return 0.0, 0
    for b in batches:
        loss = loss_fn(model, b, normalizer=n_targets, settings=settings)
        backward(loss)
        total += float(loss.detach())
    return total, n_targets


class EpochSampler:
    """Micro-batches of example indices: a permutation seeded by (seed, epoch), cut into slices.

    Its position is (epoch, index of the next micro-batch) — all a resume needs to continue with
    exactly the same data order.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int):
        if n_examples == 0:
            raise PeftlabError("the training set is empty after tokenisation (check data.train and max_seq_len)")
        self.n = n_examples
        self.mbs = micro_batch_size
        self.seed = seed

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.mbs)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return [perm[i:i + self.mbs] for i in range(0, self.n, self.mbs)]


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    micro_index: int = 0          # next micro-batch within the epoch order
    tokens_seen: int = 0          # trained (target) tokens so far
    skipped_steps: int = 0        # non-finite gradients
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: TrainState
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    losses: list[float]


class Trainer:
    def __init__(self, recipe: Any, *, quiet: bool = False):
        from peftlab.data import build_data, collate
        from peftlab.models import build_model

        self.recipe = recipe
        self.quiet = quiet
        self.out_dir = recipe.output_dir
        self._check_output_dir()
        seed_everything(recipe.train.seed)
        self.loaded = build_model(recipe)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.settings = LossSettings.from_recipe(recipe, self.model)
        # The training objective: plain causal-LM cross-entropy, or (recipe ``distill:``) a loss that
        # also runs a teacher. Same signature: (model, batch, *, normalizer, settings) -> scalar.
        from peftlab.distill import build_distill_loss

        self.loss_fn = causal_lm_loss if recipe.distill is None else build_distill_loss(recipe, self.loaded)
        cache_dir = Path(os.environ.get("PEFTLAB_DATA_CACHE", self.out_dir / ".data-cache"))
        self.data = build_data(recipe.data, self.tokenizer, seed=recipe.train.seed, cache_dir=cache_dir,
                               base_dir=Path(recipe.base_dir))
        self._collate = collate
        self.pad_id = self.data.pad_token_id
        t = recipe.train
        self.sampler = EpochSampler(len(self.data.train), t.micro_batch_size, t.seed)
        steps_per_epoch = math.ceil(self.sampler.micro_batches_per_epoch / t.grad_accum)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self.engine = self._build_engine()
        self.state = TrainState()
        self.log = RunLog(self.out_dir, recipe.output.report_to)

    # ---- setup helpers -------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        out = self.out_dir
        if (out / "adapter" / "adapter_config.json").exists() and not self.recipe.output.overwrite \
                and self.recipe.resume is None:
            raise PeftlabError(
                f"output.dir {out} already holds a finished run; choose another output.dir, set "
                "output.overwrite: true, or resume it"
            )
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl",):
            if (out / stale).exists() and self.recipe.resume is None:
                (out / stale).unlink()

    def _build_engine(self):
        from peftlab.engine import LocalEngine

        return LocalEngine(self.model, self.recipe.train, self.total_steps, self.device)

    def batch(self, indices: list[int], split: str = "train") -> dict[str, torch.Tensor]:
        rows = self.data.train if split == "train" else self.data.eval
        b = self._collate([rows[i] for i in indices], pad_token_id=self.pad_id,
                          attn_implementation=self.recipe.model.attn_implementation)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def eval_batches(self):
        if not self.data.eval:
            return None
        bs = self.recipe.train.micro_batch_size
        n = len(self.data.eval)
        batches = []
        for i in range(0, n, bs):
            b = self.batch(list(range(i, min(n, i + bs))), split="eval")
            b.pop("loss_weights", None)  # eval loss is the plain token mean
            batches.append(b)
        return batches

    # ---- the loop ------------------------------------------------------------------------------
    def next_micro_batches(self) -> list[list[int]]:
        """The micro-batches of the next optimizer step (may cross an epoch boundary)."""
        out = []
        while len(out) < self.recipe.train.grad_accum:
            order = self.sampler.epoch_order(self.state.epoch)
            if self.state.micro_index >= len(order):
                self.state.epoch += 1
                self.state.micro_index = 0
                continue
            out.append(order[self.state.micro_index])
            self.state.micro_index += 1
        return out

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's figures."""
        batches = [self.batch(ix) for ix in self.next_micro_batches()]
        self.model.train()
        total, n_targets = accumulate_gradients(self.model, batches, self.settings, self.engine.backward,
                                                self.loss_fn)
        lr = self.engine.lr
        result = self.engine.step()
        self.state.step += 1
        self.state.tokens_seen += n_targets
        if result.skipped:
            self.state.skipped_steps += 1
        return {"loss": total, "lr": lr, "grad_norm": result.grad_norm, "targets": n_targets,
                "tokens": int(sum(int(b["attention_mask"].sum()) if b["attention_mask"].dim() == 2
                                  else b["input_ids"].numel() for b in batches)),
                "skipped": result.skipped}

    def evaluate(self) -> dict[str, Any]:
        from peftlab.evaluate import evaluate

        return evaluate(self.model, self.tokenizer, self.eval_batches(), self.data.eval_prompts,
                        recipe=self.recipe, settings=self.settings)

    def train(self) -> TrainResult:
        r = self.recipe
        say = (lambda *a: None) if self.quiet else (lambda *a: print(*a, flush=True))
        trainable, total = _param_counts(self.model)
        say(f"peftlab: {r.model.name} on {self.device} ({self.loaded.dtype}), quantization={r.quantization.mode}, "
            f"LoRA r={r.adapter.r} on {len(self.loaded.lora_modules)} modules: {trainable:,} trainable / "
            f"{total:,} parameters")
        say(f"data: {len(self.data.train)} train rows, {len(self.data.eval or [])} eval rows, "
            f"{self.total_steps} optimizer steps of {r.train.micro_batch_size}x{r.train.grad_accum}")
        before: dict[str, Any] = {}
        if r.train.eval_at_start:
            before = self.evaluate()
            self.log.log(0, "eval", before)
            say("eval before training: " + _fmt_metrics(before))
        losses: list[float] = []
        bar = _progress(self.total_steps, disable=self.quiet)
        t0 = time.perf_counter()
        window_tokens, window_t = 0, t0
        while self.state.step < self.total_steps:
            figs = self.train_step()
            losses.append(figs["loss"])
            window_tokens += figs["tokens"]
            now = time.perf_counter()
            figs["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{figs['loss']:.4f}", lr=f"{figs['lr']:.2e}", tok_s=f"{figs['tokens_per_s']:.0f}")
            if self.state.step % r.train.log_every == 0 or self.state.step == self.total_steps:
                self.log.log(self.state.step, "train", figs)
                window_tokens, window_t = 0, now
            if r.train.eval_every and self.state.step % r.train.eval_every == 0 and self.state.step < self.total_steps:
                m = self.evaluate()
                self.log.log(self.state.step, "eval", m)
                bar.write(f"step {self.state.step}: " + _fmt_metrics(m))
            if r.train.save_every and self.state.step % r.train.save_every == 0 and self.state.step < self.total_steps:
                self.save_adapter(self.out_dir / "checkpoints" / f"step-{self.state.step:07d}")
        bar.close()
        after = self.evaluate()
        self.log.log(self.state.step, "eval", after)
        say("eval after training:  " + _fmt_metrics(after))
        for s in after.get("samples", []):
            say(f"sample: {s['prompt'].strip()!r}\n  reference:  {s['reference']!r}\n  generation: {s['prediction']!r}")
        adapter_dir = self.save_adapter(self.out_dir / "adapter")
        self.log.close()
        if r.output.plot:
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png")
        summary = {"steps": self.state.step, "tokens_seen": self.state.tokens_seen,
                   "skipped_steps": self.state.skipped_steps, "train_time_s": time.perf_counter() - t0,
                   "eval_before": _strip_samples(before), "eval_after": _strip_samples(after),
                   "adapter": str(adapter_dir)}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"adapter (PEFT format): {adapter_dir}\nmetrics: {self.out_dir / 'metrics.jsonl'}  "
            f"loss curve: {self.out_dir / 'loss_curve.png'}")
        return TrainResult(self.out_dir, adapter_dir, self.state, before, after, losses)

    def save_adapter(self, path: Path) -> Path:
        from peftlab.lora import save_adapter
        from peftlab.recipe import dump_recipe

        save_adapter(self.model, path, base_model_name_or_path=self.recipe.model.name)
        # What PEFT's adapter_config.json has no field for (the base's quantisation and compute dtype,
        # every training setting) travels beside it, so `peftlab eval/generate/merge DIR` rebuild the
        # exact model that was trained.
        dump_recipe(self.recipe, path / "peftlab_recipe.yaml")
        return path


def _param_counts(model) -> tuple[int, int]:
    from peftlab.models import count_parameters

    return count_parameters(model)


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=disable, file=sys.stdout, dynamic_ncols=True)


def _fmt_metrics(m: dict[str, Any]) -> str:
    keys = [k for k in ("exact_match", "eval_loss", "perplexity") if k in m]
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys) or "(no eval data)"


def _strip_samples(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "samples"}


def train(recipe: Any, *, quiet: bool = False) -> TrainResult:
    return Trainer(recipe, quiet=quiet).train()
