"""The training loop of ``peftlab train``: one readable function from recipe to adapter.

    setup   recipe -> seed -> model (+4-bit, +LoRA) -> data -> engine
    loop    for each optimizer step: the micro-batches of the step are drawn from a seeded
            per-epoch permutation; their target tokens are counted first, so every micro-batch loss is
            Σ token losses / (targets in the whole step) and accumulation is exact; backward; clip;
            step; schedule; log; eval every ``eval_every``; save every ``save_every``
    finish  eval, PEFT-format adapter, metrics JSONL / TensorBoard, loss-curve PNG, summary.json

Fault tolerance (docs/fault-tolerance.md): checkpoints are atomic directories written at step
boundaries (:mod:`peftlab.checkpoint.store`) holding adapter, optimizer/scheduler, sampler position and every
RNG state, so ``resume: auto`` continues bit for bit; SIGTERM/SIGINT save at the next step boundary and
exit 0; guards skip non-finite steps (aborting after ``guards.max_consecutive_nonfinite`` in a row) and
watch for loss spikes.

The engine (``LocalEngine`` here, DeepSpeed under scale-out) owns backward and the optimizer step;
the loss takes final hidden states and the head weight (fused, never whole logits).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.checkpoint import store as ckpt
from peftlab.errors import PeftlabError
from peftlab.metrics.runlog import RunLog, plot_loss_curve
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets, loss_normalizer


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
    from peftlab.engine.deepspeed import all_reduce_sum

    # Under data parallelism every rank divides by the GLOBAL count, and the step loss is the sum over
    # ranks: N processes then compute exactly what one process does with the same global batch.
    n_targets = all_reduce_sum(sum(count_targets(b) for b in batches))
    # Per-row / per-dataset loss weights: the step loss is the weighted mean Σ w·ℓ / Σ w (equal to the
    # target count when all weights are one), so weight 2 on a row is the same as that row twice.
    normalizer = all_reduce_sum(sum(loss_normalizer(b) for b in batches))
    total = 0.0
    if n_targets == 0:
        return 0.0, 0
    if normalizer <= 0:  # every target of the step has weight 0: nothing to learn from
        return 0.0, n_targets
    for b in batches:
        loss = loss_fn(model, b, normalizer=normalizer, settings=settings)
        backward(loss)
        total += float(loss.detach())
    return all_reduce_sum(total), n_targets


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
    skipped_steps: int = 0        # steps with a non-finite loss or gradient (update not applied)
    nonfinite_streak: int = 0     # of those, how many in a row up to now
    recent_losses: list[float] = field(default_factory=list)  # loss-spike watchdog window (finite losses)
    history: list[dict[str, Any]] = field(default_factory=list)

    _SAVED = ("step", "epoch", "micro_index", "tokens_seen", "skipped_steps", "nonfinite_streak", "recent_losses")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls._SAVED})


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: TrainState
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    losses: list[float]
    preempted: bool = False           # stopped by SIGTERM/SIGINT after saving a checkpoint
    checkpoint: Path | None = None    # the newest checkpoint of the run
    best: dict[str, Any] | None = None  # early stopping: best metric, step and its adapter dir (best/)


def _real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a batch (packs under sdpa/eager carry a 4D mask, so not its sum)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


class Trainer:
    def __init__(self, recipe: Any, *, quiet: bool = False):
        from peftlab.data import build_data, collate
        from peftlab.model.load import build_model, pick_device

        self.recipe = recipe
        from peftlab.engine.deepspeed import init_distributed

        # Join the process group first (the data cache and DeepSpeed need it); rank 0 alone speaks.
        self.dist = init_distributed(recipe)
        self.quiet = quiet or not self.dist.is_main
        self.out_dir = recipe.output_dir
        self._check_output_dir()
        self.ckpt_root = ckpt.safe_subpath(self.out_dir, recipe.checkpoint.dir, what="checkpoint.dir")
        resume_from = self._resume_checkpoint()
        from peftlab.engine.hostmem import choose_cpu_threads

        # train.threads, else torch's pool capped at the CPUs this process may use (reported at start-up)
        self.cpu_threads = choose_cpu_threads(recipe.train.threads, torch.get_num_threads())
        if self.cpu_threads[0] != torch.get_num_threads():
            torch.set_num_threads(self.cpu_threads[0])
        seed_everything(recipe.train.seed)
        from peftlab.adapters import freezing

        freezing.resolve_layers(recipe)  # adapter.layers: top:k -> explicit indices
        if recipe.train.host_allocator == "bounded" and pick_device(recipe.train.device).type == "cpu":
            from peftlab.engine.hostmem import bound_host_heap

            bound_host_heap()  # before loading: peak host memory = live tensors (peftlab/hostmem.py)
        if recipe.task == "causal_lm":
            if recipe.train.auto_fit:  # shrink micro-batch / max_seq_len to what the memory planner says fits
                from peftlab.engine.planner import apply_auto_fit

                apply_auto_fit(recipe, say=(lambda *a: None) if quiet else print)
            self.loaded = build_model(recipe)
        else:  # sequence classification / regression: backbone (decoder or encoder) + LoRA; head below
            from peftlab.objectives.classification import build_classifier_model

            self.loaded = build_classifier_model(recipe)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.settings = LossSettings.from_recipe(recipe, self.model)
        # The training objective: plain causal-LM cross-entropy, or (recipe ``distill:``) a loss that
        # also runs a teacher. Same signature: (model, batch, *, normalizer, settings) -> scalar.
        from peftlab.objectives.distillation import build_distill_loss

        self.loss_fn = causal_lm_loss if recipe.distill is None else build_distill_loss(recipe, self.loaded)
        cache_dir = Path(os.environ.get("PEFTLAB_DATA_CACHE", self.out_dir / ".data-cache"))
        self.data = build_data(recipe.data, self.tokenizer, seed=recipe.train.seed, cache_dir=cache_dir,
                               base_dir=Path(recipe.base_dir))
        self._collate = collate
        self.pad_id = self.data.pad_token_id
        if recipe.task != "causal_lm":
            from peftlab.objectives.classification import attach_head, classification_loss

            attach_head(self.model, self.data, recipe)
            self.loss_fn = classification_loss
        self.unfrozen = freezing.unfreeze_modules(self.model, recipe.adapter.unfreeze)
        from peftlab.trainer.early_stopping import EarlyStopping

        self.early_stopping = EarlyStopping.from_recipe(recipe)
        self._last_eval: tuple[int, dict[str, Any]] | None = None
        t = recipe.train
        self.sampler = EpochSampler(len(self.data.train), t.micro_batch_size, t.seed)
        steps_per_epoch = math.ceil(self.sampler.micro_batches_per_epoch / (t.grad_accum * self.dist.world_size))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self.engine = self._build_engine()
        self.state = TrainState()
        self.data_fingerprint = data_fingerprint(self.data.train)
        self.resumed_from: Path | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._last_saved: tuple[int, Path] | None = None
        self._save_due = False
        self._stop_signal: int | None = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self._continue_metrics()
        self.log = RunLog(self.out_dir, recipe.output.report_to if self.dist.is_main else [],
                          params=recipe.to_dict(), run_name=self.out_dir.name)

    # ---- setup helpers -------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        """Refuse an output.dir the run cannot use (a file, not writable) or would mix with an earlier run's
        checkpoints — before anything in it is changed; then clear what a fresh run replaces."""
        out = self.out_dir
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
            raise PeftlabError(f"output.dir {out} {where}, not a directory; set output.dir to a directory "
                               "(peftlab creates it when missing), or move that file away")
        try:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.probe_writable(out)
        except OSError as exc:
            why, fix = ckpt.storage_problem(exc)
            raise PeftlabError(f"output.dir {out} is not writable ({why}): {fix}. The run writes its checkpoints, "
                               "metrics and adapter there; nothing was trained") from None
        fresh = self.recipe.resume is None
        if (out / "adapter" / "adapter_config.json").exists() and not self.recipe.output.overwrite and fresh:
            raise PeftlabError(
                f"output.dir {out} already holds a finished run; choose another output.dir, set "
                "output.overwrite: true, or resume it"
            )
        ckpt_root = ckpt.safe_subpath(out, self.recipe.checkpoint.dir, what="checkpoint.dir")
        earlier = ckpt.checkpoint_dirs(ckpt_root)
        if fresh and earlier and not self.recipe.output.overwrite:
            # Their steps would interleave with this run's: rotation could keep theirs and drop ours, and a
            # later resume: auto would continue the OTHER run.
            raise PeftlabError(
                f"output.dir {out} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[-3:])}"
                f"{', ...' if len(earlier) > 3 else ''} in {ckpt_root}); continue that run with resume: auto, start "
                "over with output.overwrite: true (deletes them), or choose another output.dir"
            )
        if fresh and self._is_main():  # every rank checked; one removes what the fresh run replaces
            (out / "metrics.jsonl").unlink(missing_ok=True)
            ckpt.remove_checkpoints(ckpt_root)

    def _is_main(self) -> bool:
        dist = getattr(self, "dist", None)
        return dist is None or dist.is_main

    def _warn(self, msg: str) -> None:
        if self._is_main():
            print(f"peftlab: warning: {msg}", file=sys.stderr, flush=True)

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint ``resume:`` points at: the newest complete one (auto), a given one, or none."""
        resume = self.recipe.resume
        if resume is None:
            return None
        if resume == "auto":
            found = ckpt.find_resume_checkpoint(self.ckpt_root, self._warn)
            if found is None and not self.quiet:
                print(f"peftlab: resume: auto — no complete checkpoint in {self.ckpt_root}; starting at step 0",
                      flush=True)
            return found
        return self.recipe.resolve_path(resume)

    def _load_checkpoint(self, path: Path) -> None:
        """Restore adapter weights, engine state, loop position and guard state (RNG: in ``train``).

        Under DeepSpeed (the checkpoint holds ``deepspeed/``) every rank loads DeepSpeed's own checkpoint
        instead: adapter weights, optimizer partitions and scheduler come from it.

        Refused — before anything is changed — when the recipe differs in a key that decides what the
        run computes (model, quantization, adapter, data, batch geometry, seed, optimizer) or when the
        tokenized training data differ; other changed keys (lr, max_steps, ...) are named and applied.
        """
        from peftlab.adapters.peft_format import lora_state_dict

        loaded = ckpt.load_checkpoint(path)
        refused, changed = ckpt.recipe_differences(loaded.recipe, self.recipe.to_dict())
        if refused:
            raise PeftlabError(
                f"resume: the recipe differs from the one that wrote {path} in settings that would make the "
                "resumed run wrong:\n  " + "\n  ".join(refused) + "\nRestore those values, or start a fresh "
                "run (another output.dir, or no resume key)"
            )
        saved = loaded.trainer_state
        if saved.get("data_fingerprint") != self.data_fingerprint:
            raise PeftlabError(
                f"resume: the tokenized training data differ from those the checkpoint {path} was trained on "
                f"({saved.get('n_train')} rows then, {len(self.data.train)} now; fingerprint "
                f"{saved.get('data_fingerprint')} then, {self.data_fingerprint} now). Restore the files of "
                "data.train, or start a fresh run"
            )
        if changed:
            self._warn(f"resuming from {path} with changed settings (they apply from the next step on): "
                       + "; ".join(changed))
        from peftlab.adapters.peft_format import lora_parameters

        params = lora_state_dict(self.model)
        weights = loaded.adapter_weights
        # (ZeRO-3 parameters are empty partitions here; ds_shape is their whole shape)
        shapes = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in lora_parameters(self.model).items()}
        bad = sorted(params.keys() ^ weights.keys()) + sorted(
            k for k in params.keys() & weights.keys() if shapes[k] != tuple(weights[k].shape))
        if bad:
            raise PeftlabError(f"resume: the adapter weights in {path} do not fit this model (keys missing, "
                               f"unexpected or of another shape: {', '.join(bad[:4])})")
        ds_dir = path / "deepspeed"
        if ds_dir.is_dir() and not hasattr(self.engine, "load_checkpoint"):
            raise PeftlabError(f"resume: {path} was written under DeepSpeed (it holds deepspeed/); resume it with "
                               "the same deepspeed recipe key, or start a new run")
        if hasattr(self.engine, "load_checkpoint"):
            self.engine.load_state_dict(loaded.engine_state)  # refuses a single-process engine's checkpoint
            if not ds_dir.is_dir():
                raise PeftlabError(f"resume: {path} holds no deepspeed/ directory (DeepSpeed's optimizer and "
                                   "scheduler state), so the run cannot continue exactly; resume from a checkpoint "
                                   "written by this peftlab under DeepSpeed, or start a new run")
            # Every rank: LoRA weights (fp32 partitions), optimizer, scheduler and engine counters.
            self.engine.load_checkpoint(ds_dir)
        else:
            with torch.no_grad():
                for k, p in params.items():  # detached tensors sharing the parameters' storage
                    p.copy_(weights[k].to(device=p.device, dtype=p.dtype))
            self.engine.load_state_dict(loaded.engine_state)
        self.state = TrainState.from_json(saved)
        self._resume_rng = loaded.rng
        self.resumed_from = path
        self._last_saved = (self.state.step, path)
        if not self.quiet:
            print(f"peftlab: resuming from {path} (step {self.state.step}, epoch {self.state.epoch})", flush=True)

    def _continue_metrics(self) -> None:
        """metrics.jsonl of a resumed run keeps its records up to the checkpoint's step (later ones are
        recomputed, so no step appears twice); a fresh run starts a new file."""
        path = self.out_dir / "metrics.jsonl"
        if not self._is_main() or not path.exists():
            return
        if self.resumed_from is None:
            path.unlink(missing_ok=True)
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("step", 0) <= self.state.step:
                keep.append(line + "\n")
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step boundary (atomically; see peftlab.checkpoint.store)."""
        step = self.state.step
        path = self.ckpt_root / ckpt.checkpoint_name(step)
        if hasattr(self.engine, "save_checkpoint"):  # DeepSpeed: every rank takes part
            path = self._save_deepspeed_checkpoint(step)
        elif self._is_main():
            files = ckpt.adapter_files(self.model, self.recipe.model.name)
            files.update(self._checkpoint_files())
            path = ckpt.write_checkpoint(self.ckpt_root, step, files, keep_last=self.recipe.checkpoint.keep_last)
        self._last_saved = (step, path)
        self._save_due = False
        return path

    def _checkpoint_files(self) -> dict[str, bytes]:
        """Everything of a checkpoint but the adapter weights and DeepSpeed's shards (rank 0's view)."""
        import yaml

        files = {"adapter/peftlab_recipe.yaml": yaml.safe_dump(self.resolved_recipe().to_dict(),
                                                               sort_keys=False).encode()}
        files["engine.pt"] = ckpt.torch_bytes(self.engine.state_dict())
        files["rng.pt"] = ckpt.torch_bytes(ckpt.capture_rng())
        trainer_state = {**self.state.to_json(), "data_fingerprint": self.data_fingerprint,
                         "n_train": len(self.data.train), "total_steps": self.total_steps}
        files["trainer_state.json"] = (json.dumps(trainer_state, indent=1) + "\n").encode()
        files["recipe.yaml"] = yaml.safe_dump(self.recipe.to_dict(), sort_keys=False).encode()
        return files

    def _save_deepspeed_checkpoint(self, step: int) -> Path:
        """A checkpoint under DeepSpeed, called on every rank.

        Every rank gathers the adapter (ZeRO-3 partitions; checked non-empty) and writes its shard of
        DeepSpeed's own checkpoint (optimizer partitions, scheduler, engine counters) into the staging
        directory ``<checkpoint root>/.ds-staging-step-N`` — the checkpoint root must therefore be on a
        filesystem every rank sees (shared storage on multi-node runs). After a barrier rank 0 adds every
        staged file as ``deepspeed/<relative path>`` to the atomic checkpoint (so ``COMPLETE`` lists and
        hashes them) with DeepSpeed's ``latest`` file naming the tag, removes the staging directory, and tells
        the other ranks whether it succeeded. ``deepspeed/`` is thus a complete DeepSpeed checkpoint directory:
        ``zero_to_fp32.py <checkpoint>/deepspeed OUT`` works on it without ``--tag``.
        """
        import shutil

        from peftlab.engine.deepspeed import (
            DEEPSPEED_TAG,
            all_reduce_sum,
            barrier,
            check_adapter_tensors,
            gathered_adapter_state,
        )

        name = ckpt.checkpoint_name(step)
        staging = self.ckpt_root / f".ds-staging-{name}"
        tensors = {k: v.contiguous() for k, v in gathered_adapter_state(self.model).items()}
        check_adapter_tensors(tensors, where=f"checkpoint {name}")
        if self._is_main():
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of a crashed save
            staging.mkdir(parents=True)
        barrier()
        self.engine.save_checkpoint(staging)
        barrier()
        path = self.ckpt_root / name
        error: PeftlabError | None = None
        if self._is_main():
            try:
                files = ckpt.adapter_files(self.model, self.recipe.model.name, tensors=tensors)
                files.update(self._checkpoint_files())
                for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                    files[f"deepspeed/{f.relative_to(staging).as_posix()}"] = f.read_bytes()
                # DeepSpeed's own tools (zero_to_fp32.py, load_checkpoint without a tag) read the tag from
                # `latest`; written here, so it is hashed in COMPLETE and renamed into place with the rest.
                files["deepspeed/latest"] = DEEPSPEED_TAG.encode()
                path = ckpt.write_checkpoint(self.ckpt_root, step, files, keep_last=self.recipe.checkpoint.keep_last)
            except PeftlabError as exc:
                error = exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        failed = all_reduce_sum(1 if error is not None else 0)  # also the closing barrier
        if error is not None:
            raise error
        if failed:
            raise PeftlabError(f"rank 0 could not write checkpoint {name} into {self.ckpt_root} (see its error)")
        return path

    @contextlib.contextmanager
    def _signals_handled(self):
        """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to checkpoint at the next step boundary and
        stop; a second one exits at once (the last complete checkpoint stays valid: saves are atomic)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None:
                print(f"peftlab: second {name}: exiting now, without a new checkpoint", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self._stop_signal = signum
            print(f"peftlab: {name} received: saving a checkpoint at the end of this step, then exiting "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _abort(self, msg: str) -> PeftlabError:
        last = self._last_saved[1] if self._last_saved else ckpt.latest_complete(self.ckpt_root)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        self.log.close()
        return PeftlabError(f"{msg}; no checkpoint was written for it and {where}")

    def _build_engine(self):
        from peftlab.engine.local import LocalEngine

        if self.recipe.deepspeed is not None:
            from peftlab.engine.deepspeed import ZeroEngine

            return ZeroEngine(self.model, self.recipe, self.total_steps, self.device, self.loaded.dtype)
        from peftlab.adapters.freezing import optimizer_param_groups

        groups = optimizer_param_groups(self.model, self.recipe.adapter, self.recipe.train.lr, self.unfrozen)
        return LocalEngine(self.model, self.recipe.train, self.total_steps, self.device, param_groups=groups)

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
        # A step takes grad_accum x world_size micro-batches of the global order; rank r trains
        # micro-batches r, r + world_size, ... (one process with grad_accum x world_size sees them all).
        while len(out) < self.recipe.train.grad_accum * self.dist.world_size:
            order = self.sampler.epoch_order(self.state.epoch)
            if self.state.micro_index >= len(order):
                self.state.epoch += 1
                self.state.micro_index = 0
                continue
            out.append(order[self.state.micro_index])
            self.state.micro_index += 1
        return out[self.dist.rank::self.dist.world_size]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's figures.

        Guards: a non-finite loss or gradient drops the update (counted in ``skipped_steps``);
        ``guards.max_consecutive_nonfinite`` of them in a row, or a loss spike with
        ``guards.loss_spike_action: abort``, raise PeftlabError before anything is applied or saved.
        """
        g = self.recipe.guards
        indices = self.next_micro_batches()
        batches = [self.batch(ix) for ix in indices]
        self.model.train()
        total, n_targets = accumulate_gradients(self.model, batches, self.settings, self.engine.backward,
                                                self.loss_fn)
        step = self.state.step + 1
        ckpt.test_kill_point(f"step-{step}-backward")
        finite_loss = math.isfinite(total)
        spike = self._loss_spike(total) if finite_loss else None
        lr = self.engine.lr
        result = self.engine.step(skip=not finite_loss or (spike is not None and g.loss_spike_action == "abort"))
        if spike is not None and g.loss_spike_action == "abort":
            raise self._abort(f"training stopped at step {step}: {spike} (guards.loss_spike_action=abort); "
                              "the update was not applied. Lower train.lr or raise guards.loss_spike_factor, "
                              "then rerun with resume: auto")
        self.state.step = step
        self.state.tokens_seen += n_targets
        if result.skipped:
            self.state.skipped_steps += 1
            self.state.nonfinite_streak += 1
            self._warn(f"step {step}: non-finite {'loss' if not finite_loss else 'gradient norm'} "
                       f"(loss={total}, grad_norm={result.grad_norm}); update skipped "
                       f"({self.state.nonfinite_streak} in a row, {self.state.skipped_steps} in all)")
            if self.state.nonfinite_streak >= g.max_consecutive_nonfinite:
                first = step - self.state.nonfinite_streak + 1
                raise self._abort(
                    f"training aborted: {self.state.nonfinite_streak} optimizer steps in a row (steps {first}-{step}) "
                    f"had a non-finite loss or gradient (guards.max_consecutive_nonfinite="
                    f"{g.max_consecutive_nonfinite}). Lower train.lr, check the data rows of those steps, or "
                    "use model.dtype: float32, then rerun with resume: auto")
        else:
            self.state.nonfinite_streak = 0
            if n_targets:
                self.state.recent_losses = (self.state.recent_losses + [total])[-g.loss_spike_window:]
            if spike is not None:
                self._warn(f"step {step}: {spike} (guards.loss_spike_action=warn)")
        ckpt.test_kill_point(f"step-{step}")
        sample_ids = [b["sample_ids"].tolist() for b in batches if "sample_ids" in b] or indices
        ckpt.test_trace({"step": step, "sample_ids": sample_ids, "loss": float(total).hex(),
                         "skipped": result.skipped})
        return {"loss": total, "lr": lr, "grad_norm": result.grad_norm, "targets": n_targets,
                "tokens": int(sum(_real_tokens(b) for b in batches)),
                "skipped": result.skipped}

    def _loss_spike(self, loss: float) -> str | None:
        """A description of the spike when ``loss`` exceeds factor x the running median, else None."""
        g = self.recipe.guards
        window = self.state.recent_losses
        if g.loss_spike_action == "off" or len(window) < g.loss_spike_window:
            return None
        median = statistics.median(window)
        if median > 0 and loss > g.loss_spike_factor * median:
            return (f"loss spike: {loss:.4f} is {loss / median:.1f}x the median {median:.4f} of the last "
                    f"{len(window)} steps (guards.loss_spike_factor={g.loss_spike_factor})")
        return None

    def evaluate(self) -> dict[str, Any]:
        from peftlab.evaluation.evaluate import evaluate

        if self.recipe.task != "causal_lm":
            from peftlab.objectives.classification import evaluate_classifier

            return evaluate_classifier(self.model, self.eval_batches(), task=self.data.task,
                                       label_map=self.data.label_map)
        return evaluate(self.model, self.tokenizer, self.eval_batches(), self.data.eval_prompts,
                        recipe=self.recipe, settings=self.settings)

    def train(self) -> TrainResult:
        """Train to the end (or to a signal / early stop). A full or read-only disk and running out of
        memory end in a PeftlabError that names the cause, the recipe keys or steps that fix it, and the
        checkpoint to continue from — never a traceback; complete checkpoints are never touched."""
        try:
            return self._train()
        except BaseException as exc:  # re-raised below unless it is one of the two failures handled here
            memory = out_of_memory_detail(exc)
            storage = self._output_write_error(exc) if memory is None else None
            if memory is None and storage is None:
                raise
        # Outside the except block: the failed step's frames and tensors are released before the memory
        # planner runs for the message.
        with contextlib.suppress(Exception):
            self.log.close()
        if memory is not None:
            raise PeftlabError(out_of_memory_message(self.recipe, memory, f"after {self.state.step} completed steps")
                               + " " + self._resume_hint()) from None
        path, errno_value, why, fix = storage
        raise PeftlabError(
            f"training stopped after step {self.state.step}: could not write {path}: {why} (errno "
            f"{errno.errorcode.get(errno_value, errno_value)}); {fix}. {self._resume_hint()}") from None

    def _resume_hint(self) -> str:
        """Where the run can continue from after it stopped (for failure messages)."""
        last = self._last_saved[1] if self._last_saved else ckpt.latest_complete(self.ckpt_root)
        if last is None:
            return ("No checkpoint was written yet (train.save_every sets how often), so the run must start over: "
                    "rerun the same command once that is fixed")
        return (f"The last complete checkpoint {last} (step {ckpt.checkpoint_step(last)}) is intact; once that is "
                "fixed, continue with: peftlab train RECIPE --set resume=auto")

    def _output_write_error(self, exc: BaseException) -> tuple[str, int, str, str] | None:
        """(file, errno, reason, fix) when ``exc`` is the disk refusing a write of this run's output."""
        if not isinstance(exc, OSError) or exc.errno not in ckpt.STORAGE_ERRNOS:
            return None
        name = exc.filename
        if name is None or not Path(name).resolve().is_relative_to(self.out_dir.resolve()):
            return None
        why, fix = ckpt.storage_problem(exc)
        return str(name), exc.errno, why, fix

    def _train(self) -> TrainResult:
        r = self.recipe
        say = (lambda *a: None) if self.quiet else (lambda *a: print(*a, flush=True))
        trainable, total = _param_counts(self.model)
        say(f"peftlab: {r.model.name} on {self.device} ({self.loaded.dtype}), quantization={r.quantization.mode}, "
            f"LoRA r={r.adapter.r} on {len(self.loaded.lora_modules)} modules: {trainable:,} trainable / "
            f"{total:,} parameters")
        say(f"data: {len(self.data.train)} train rows, {len(self.data.eval or [])} eval rows, "
            f"{self.total_steps} optimizer steps of {r.train.micro_batch_size}x{r.train.grad_accum}")
        if self.device.type == "cpu":
            from peftlab.engine.hostmem import openmp_wait_policy

            threads, why = self.cpu_threads
            say(f"cpu: {threads} thread(s) ({why}); OpenMP wait policy: {openmp_wait_policy()}")
        before: dict[str, Any] = {}
        if r.train.eval_at_start and self.resumed_from is None:
            before = self.evaluate()
            self.log.log(0, "eval", before)
            say("eval before training: " + _fmt_metrics(before))
        losses: list[float] = []
        bar = _progress(self.total_steps, disable=self.quiet)
        t0 = time.perf_counter()
        window_tokens, window_t = 0, t0
        if self._resume_rng is not None:  # last, so nothing between here and the first step draws from them
            ckpt.restore_rng(self._resume_rng)
            self._resume_rng = None
        with self._signals_handled():
            preempted = self._loop(losses, bar, window_tokens, window_t)
        bar.close()
        if preempted:
            self.log.close()
            step, path = self._last_saved
            say(f"peftlab: stopped by {signal.Signals(self._stop_signal).name} at step {step}; checkpoint {path}. "
                "Continue with: peftlab train RECIPE --set resume=auto")
            return TrainResult(self.out_dir, path / "adapter", self.state, before, {}, losses, preempted=True,
                               checkpoint=path)
        stopped = self._last_eval is not None and self._last_eval[0] == self.state.step
        after = self._last_eval[1] if stopped else self.evaluate()  # early stop: that eval is the last one
        if not stopped:
            self._track_best(after)
        self.log.log(self.state.step, "eval", after)
        say("eval after training:  " + _fmt_metrics(after))
        for s in after.get("samples", []):
            say(f"sample: {s['prompt'].strip()!r}\n  reference:  {s['reference']!r}\n  generation: {s['prediction']!r}")
        adapter_dir = self.save_adapter(self.out_dir / "adapter")
        self.log.log_artifact(adapter_dir, "adapter")
        self.log.log_artifact(self.out_dir / "metrics.jsonl", "metrics")
        self.log.close()
        return self._finish(t0, before, after, adapter_dir, losses)

    def _loop(self, losses: list[float], bar, window_tokens: int, window_t: float) -> bool:
        """Optimizer steps until the end of training; True when a signal stopped it (after a checkpoint)."""
        r = self.recipe
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
                if self._track_best(m):
                    es = self.early_stopping
                    bar.write(f"early stopping at step {self.state.step}: {es.metric} did not improve for "
                              f"{es.patience} evals; best {es.best:.4f} at step {es.best_step} (kept in best/)")
                    self._last_eval = (self.state.step, m)
                    return False
            if r.train.save_every and self.state.step % r.train.save_every == 0:
                self._save_due = True
            # Saves happen at step boundaries only, never inside a run of non-finite steps (deferred to the
            # next clean step), and not at the last step (the final adapter follows).
            if self._save_due and self.state.nonfinite_streak == 0 and self.state.step < self.total_steps:
                self.save_checkpoint()
            if self._stop_signal is not None:
                if self._last_saved is None or self._last_saved[0] != self.state.step:
                    self.save_checkpoint()
                return True
        return False

    def _finish(self, t0: float, before: dict[str, Any], after: dict[str, Any], adapter_dir: Path,
                losses: list[float]) -> TrainResult:
        r = self.recipe
        say = (lambda *a: None) if self.quiet else (lambda *a: print(*a, flush=True))
        curve = None
        if r.output.plot and self.dist.is_main:  # drawn from metrics.jsonl: None without jsonl records
            curve = plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png")
        summary = {"steps": self.state.step, "tokens_seen": self.state.tokens_seen,
                   "skipped_steps": self.state.skipped_steps, "train_time_s": time.perf_counter() - t0,
                   "eval_before": _strip_samples(before), "eval_after": _strip_samples(after),
                   "adapter": str(adapter_dir)}
        best = None
        if self.early_stopping is not None:
            best = {**self.early_stopping.summary(), "adapter": str(self.out_dir / "best")}
            summary["early_stopping"] = best
            say(f"best {best['metric']}={best['best']} at step {best['best_step']}: {best['adapter']}")
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        # Name only the files this run wrote (output.plot: false draws no curve; no jsonl, no metrics file).
        written = [f"metrics: {self.out_dir / 'metrics.jsonl'}"] if "jsonl" in r.output.report_to else []
        if curve is not None:
            written.append(f"loss curve: {curve}")
        elif r.output.plot and "jsonl" not in r.output.report_to:
            written.append("loss curve: not drawn (it is drawn from metrics.jsonl: add jsonl to output.report_to)")
        say(f"adapter (PEFT format): {adapter_dir}" + ("\n" + "  ".join(written) if written else ""))
        return TrainResult(self.out_dir, adapter_dir, self.state, before, after, losses,
                           checkpoint=self._last_saved[1] if self._last_saved else None, best=best)

    def _track_best(self, metrics: dict[str, Any]) -> bool:
        """Early stopping: keep the adapter of a new best eval in best/; True when training should stop."""
        if self.early_stopping is None:
            return False
        decision = self.early_stopping.update(self.state.step, metrics)
        if decision.improved:
            self.save_adapter(self.out_dir / "best")
        return decision.stop

    def resolved_recipe(self):
        """The recipe with ``auto`` choices replaced by what this run used (the compute dtype), for the
        adapter's ``peftlab_recipe.yaml``: merge/eval/generate on another machine then rebuild exactly
        the base training saw (e.g. NF4 scales quantised from a bf16 load on a GPU)."""
        resolved = self.recipe.model_copy(deep=True)
        resolved.model.dtype = str(self.loaded.dtype).replace("torch.", "")
        # Relative paths were relative to the recipe file; the copy lives elsewhere, so make local ones
        # absolute (hub ids and missing paths stay as written).
        for spec in [*resolved.data.train, *resolved.data.eval]:
            local = self.recipe.resolve_path(spec.path)
            if local.exists():
                spec.path = str(local.resolve())
        resolved.output.dir = str(self.out_dir.resolve())
        if resolved.adapter.init_from:
            resolved.adapter.init_from = str(self.recipe.resolve_path(resolved.adapter.init_from).resolve())
        if resolved.deepspeed:
            resolved.deepspeed = str(self.recipe.resolve_path(resolved.deepspeed).resolve())
        return resolved

    def save_adapter(self, path: Path) -> Path:
        from peftlab.adapters.peft_format import save_adapter
        from peftlab.recipe.schema import dump_recipe

        if self.dist.world_size > 1 or self.recipe.deepspeed is not None:
            from peftlab.engine.deepspeed import save_adapter_gathered

            # Gathered from all ranks (ZeRO-3 partitions), checked non-empty, written by rank 0.
            save_adapter_gathered(self.model, path, base_model_name_or_path=self.recipe.model.name)
            if not self.dist.is_main:
                return path
        else:
            save_adapter(self.model, path, base_model_name_or_path=self.recipe.model.name)
        # What PEFT's adapter_config.json has no field for (the base's quantisation and compute dtype,
        # every training setting) travels beside it, so `peftlab eval/generate/merge DIR` rebuild the
        # exact model that was trained.
        dump_recipe(self.resolved_recipe(), path / "peftlab_recipe.yaml")
        # The chat template training rendered with travels with the adapter (eval/generate/merge/GGUF use it).
        from peftlab.adapters.chat_template import save_chat_template, training_template

        save_chat_template(path, training_template(self.tokenizer, self.recipe.data.template))
        from peftlab.adapters.freezing import save_unfrozen

        save_unfrozen(self.model, self.unfrozen, path)
        if self.recipe.task != "causal_lm":
            from peftlab.objectives.classification import save_head

            save_head(self.model, path)
        return path


def data_fingerprint(rows) -> str:
    """Content hash of the tokenized training rows: a resume onto other data is refused."""
    h = hashlib.sha256(str(len(rows)).encode())
    for row in rows:
        for key in ("input_ids", "labels"):
            if row.get(key) is not None:
                h.update(np.asarray(row[key], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _param_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 a parameter holds only an empty partition on each rank
    (``numel() == 0``); its whole size is ``ds_numel`` — counted so, or the start-up line says 0 trainable.
    4-bit weights count their logical elements (``quant_state.shape``)."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            n = int(torch.Size(quant_state.shape).numel())
        elif hasattr(p, "ds_numel"):
            n = int(p.ds_numel)
        else:
            n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory_detail(exc: BaseException) -> str | None:
    """The first line of ``exc`` when it is an allocation failure (CUDA OOM, MemoryError, torch's CPU
    allocator), else None."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(exc, RuntimeError) and any(s in str(exc) for s in _ALLOCATION_FAILURES)):
        lines = str(exc).strip().splitlines()
        return (lines[0] if lines else type(exc).__name__)[:300]
    return None


def out_of_memory_message(recipe: Any, detail: str, when: str) -> str:
    """What ran out, what ``peftlab estimate`` predicts for this recipe, and the recipe keys that lower it."""
    from peftlab.engine.planner import out_of_memory_advice

    return f"out of memory {when} ({detail}). {out_of_memory_advice(recipe)}"


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=disable, file=sys.stdout, dynamic_ncols=True)


def _fmt_metrics(m: dict[str, Any]) -> str:
    keys = [k for k in ("exact_match", "token_f1", "accuracy", "f1_macro", "mse", "eval_loss", "perplexity") if k in m]
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys) or "(no eval data)"


def _strip_samples(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "samples"}


def train(recipe: Any, *, quiet: bool = False) -> TrainResult:
    """``peftlab train``: build the run and train it; running out of memory while loading the model or the
    data is reported like running out during training (the keys that lower memory, the planner's figures)."""
    try:
        trainer = Trainer(recipe, quiet=quiet)
    except BaseException as exc:  # re-raised unless it is an allocation failure
        memory = out_of_memory_detail(exc)
        if memory is None:
            raise
    else:
        return trainer.train()
    raise PeftlabError(out_of_memory_message(recipe, memory, "while loading the model and data")
                       + " Nothing was trained or written yet.") from None
