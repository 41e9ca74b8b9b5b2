"""The training loop of ``peftlab train``: one readable loop from a built run to its adapter.

    setup   recipe -> process group -> seed -> model -> data -> objective -> engine (:mod:`.setup`); ``resume:``
            restores a checkpoint (:mod:`peftlab.checkpoint.resume`)
    loop    per optimizer step: micro-batches from a seeded per-epoch order; targets counted first, so every
            micro-batch loss is Σ target losses / (targets of the whole step); backward; step; log; eval every
            ``eval_every``; an atomic checkpoint every ``save_every`` (:mod:`peftlab.checkpoint.save`)
    finish  eval, PEFT-format adapter, metrics, loss curve, summary.json (:mod:`.summary`)

A batch's loss is the objective's (:mod:`peftlab.objectives.objective`), the step the engine's
(:mod:`peftlab.engine.interface`). Guards (:mod:`.guards`), SIGTERM/SIGINT (:mod:`.preemption`), running out of
memory or disk (:mod:`.failures`) each have their module.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from peftlab.adapters.chat_template import save_chat_template, training_template
from peftlab.adapters.freezing import save_unfrozen, unfreeze_modules
from peftlab.checkpoint.resume import checkpoint_to_resume
from peftlab.checkpoint.rng import restore_rng
from peftlab.checkpoint.save import run_files, save_checkpoint
from peftlab.checkpoint.store import latest_complete
from peftlab.engine.process_group import all_reduce_sum
from peftlab.errors import PeftlabError
from peftlab.metrics.console import progress, quiet_logging
from peftlab.metrics.runlog import RunLog
from peftlab.objectives.objective import Objective, build_objective, train_figures, trained_tokens
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME
from peftlab.recipe.parse import dump_recipe
from peftlab.trainer import setup, summary
from peftlab.trainer.early_stopping import EarlyStopping
from peftlab.trainer.failures import diagnose, failure_message, setup_failure_message
from peftlab.trainer.fault_injection import kill_point, trace_step
from peftlab.trainer.guards import Guards
from peftlab.trainer.preemption import Preemption
from peftlab.trainer.state import RunInputs, TrainResult, real_tokens

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def accumulate_gradients(model: torch.nn.Module, batches: list[Batch], objective: Objective,
                         backward=lambda loss: loss.backward()) -> tuple[float, int]:
    """Forward/backward the micro-batches of one optimizer step; returns (step loss, targets).

    Targets are counted over *all* micro-batches (and ranks) first and every summed micro-batch loss is divided
    by their total, so the accumulated gradient is that of the whole step's mean loss, however it is split (a
    mean of per-micro-batch means would weight short micro-batches more); with loss weights, Σ w·ℓ / Σ w.
    """
    n_targets = all_reduce_sum(sum(objective.targets(b) for b in batches))
    normalizer = all_reduce_sum(sum(objective.normalizer(b) for b in batches))
    if n_targets == 0:
        return 0.0, 0
    if normalizer <= 0:  # every target of the step has weight 0: nothing to learn from
        return 0.0, n_targets
    total = 0.0
    for b in batches:
        loss = objective.loss(model, b, normalizer=normalizer)
        backward(loss)
        total += float(loss.detach())
    return all_reduce_sum(total), n_targets


class Trainer:
    def __init__(self, recipe: Any, *, quiet: bool = False):
        """Build the run (``quiet``: warnings only while it builds and trains; only rank 0 speaks)."""
        self.engine: Any = None
        with quiet_logging(quiet):
            try:
                self._build(recipe, quiet)
            except BaseException:  # a half-built run too puts back what its engine and joining changed
                setup.leave(self.engine)
                raise

    def _build(self, recipe: Any, quiet: bool) -> None:
        self.recipe, t, self.quiet = recipe, recipe.train, quiet
        setup.check_streaming(recipe)  # what train refuses of a streaming recipe: before anything loads or is written
        self.dist = setup.join(recipe)
        self.out_dir = recipe.output_dir
        self.ckpt_root = setup.prepare_output_dir(recipe, self.dist.is_main)
        resume_from = checkpoint_to_resume(recipe, self.ckpt_root)
        self.cpu_threads = setup.use_cpu_threads(recipe)
        setup.seed_everything(t.seed)
        self.loaded = setup.load_model(recipe)
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.data = setup.load_data(recipe, self.tokenizer)
        self.batch = setup.batch_builder(recipe, self.data, self.tokenizer, self.device)  # indices -> batch
        self.objective = build_objective(recipe, self.loaded, self.data)
        self.unfrozen = unfreeze_modules(self.model, recipe.adapter.unfreeze)
        self.sampler = setup.sampler(recipe, self.data)  # seeded per epoch, or stream order
        self.total_steps = setup.total_steps(recipe, self.sampler, self.dist.world_size)
        self.engine = setup.build_engine(recipe, self.loaded, self.unfrozen, self.total_steps)
        self.early_stopping = EarlyStopping.from_recipe(recipe)
        self.guards, self.preemption = Guards(recipe.guards), Preemption()
        self.inputs, self.resumed_from = RunInputs.of(self.data.train, self.objective), resume_from
        self.state, self._resume_rng = setup.resume_state(recipe, resume_from, self.model, self.engine, self.inputs)
        self._last_saved: tuple[int, Path] | None = (self.state.step, resume_from) if resume_from else None
        self._last_eval: tuple[int, dict[str, Any]] | None = None
        self._save_due = False
        resumed_step = self.state.step if self.resumed_from is not None else None
        setup.continue_metrics(self.out_dir / "metrics.jsonl", resumed_step, self.dist.is_main)
        self.log = RunLog(self.out_dir, recipe.output.report_to if self.dist.is_main else [],
                          params=recipe.to_dict(), run_name=self.out_dir.name, resumed_step=resumed_step)

    def eval_batches(self) -> list[Batch] | None:
        if not self.data.eval:
            return None
        bs, n = self.recipe.train.micro_batch_size, len(self.data.eval)
        batches = [self.batch(list(range(i, min(n, i + bs))), split="eval") for i in range(0, n, bs)]
        for b in batches:
            b.pop("loss_weights", None)  # the eval loss is the plain mean
        return batches

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's figures. A guard that stops
        the run raises PeftlabError before anything is applied or saved."""
        indices = self.sampler.next_step(self.state, self.recipe.train.grad_accum, self.dist.rank,
                                         self.dist.world_size)
        batches = [self.batch(ix) for ix in indices]
        self.model.train()
        self.objective.begin_step(self.state.step + 1, self.total_steps)
        loss, n_targets = accumulate_gradients(self.model, batches, self.objective, self.engine.backward)
        step = self.state.step + 1
        kill_point(f"step-{step}-backward")
        verdict = self.guards.judge(self.state, step, loss)
        lr = self.engine.lr
        result = self.engine.step(skip=verdict.skip)
        if verdict.abort:
            raise self._abort(verdict.abort)
        self.state.step = step
        self.state.tokens_seen += trained_tokens(self.objective, batches, n_targets)
        stop = self.guards.record(self.state, step, loss, n_targets, verdict, result)
        if stop:
            raise self._abort(stop)
        kill_point(f"step-{step}")
        sample_ids = [b["sample_ids"].tolist() for b in batches if "sample_ids" in b] or indices
        trace_step({"step": step, "sample_ids": sample_ids, "loss": float(loss).hex(), "skipped": result.skipped})
        return {"loss": loss, "lr": lr, "grad_norm": result.grad_norm, "targets": n_targets,
                "tokens": sum(real_tokens(b) for b in batches), "skipped": result.skipped}

    def evaluate(self) -> dict[str, Any]:
        return self.objective.evaluate(self.model, self.eval_batches())

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of the current step boundary (atomic; every rank takes part)."""
        path = save_checkpoint(self.ckpt_root, self.state.step, model=self.model, engine=self.engine,
                               base_model_name_or_path=self.recipe.model.name, files=self._checkpoint_files,
                               keep_last=self.recipe.checkpoint.keep_last)
        self._last_saved, self._save_due = (self.state.step, path), False
        return path

    def _checkpoint_files(self) -> dict[str, bytes]:  # rank 0 only
        state = {**self.state.to_json(), **self.inputs.saved(), "total_steps": self.total_steps}
        return run_files(resolved_recipe=setup.resolved_recipe(self.recipe, self.loaded).to_dict(),
                         recipe=self.recipe.to_dict(), engine_state=self.engine.state_dict(), trainer_state=state)

    def save_adapter(self, path: Path) -> Path:
        """The PEFT-format adapter, plus what its config has no field for: the resolved recipe (eval/generate/
        merge rebuild the exact model trained), the chat template, unfrozen modules, the objective's files."""
        self.engine.save_adapter(path, base_model_name_or_path=self.recipe.model.name)
        if self.dist.is_main:
            dump_recipe(setup.resolved_recipe(self.recipe, self.loaded), path / ADAPTER_RECIPE_NAME)
            save_chat_template(path, training_template(self.tokenizer, self.recipe.data.template))
            save_unfrozen(self.model, self.unfrozen, path)
            self.objective.save(self.model, path)
        return path

    def train(self) -> TrainResult:
        """Train to the end (or to a signal / early stop). A full or read-only disk and running out of memory end
        in a PeftlabError naming the cause, the fix and the checkpoint to continue from; checkpoints stay intact."""
        try:
            with quiet_logging(self.quiet):
                return self._train()
        except BaseException as exc:  # re-raised below unless it is one of the failures the run explains
            failure = diagnose(exc, self.out_dir)
            if failure is None:
                raise
        finally:  # whatever happened: the trackers' runs end, what the run changed process-wide goes back
            with contextlib.suppress(Exception):
                self.log.close()
            setup.leave(self.engine)
        # outside the except: the failed step's frames are freed before the planner runs for the message
        raise failure_message(failure, recipe=self.recipe, step=self.state.step,
                              last=self._last_checkpoint()) from None

    def _train(self) -> TrainResult:
        setup.log_start(self.recipe, self.loaded, self.data, self.total_steps, self.cpu_threads)
        before: dict[str, Any] = {}
        if self.recipe.train.eval_at_start and self.resumed_from is None:
            before = self.evaluate()
            self.log.log(0, "eval", before)
            logger.info("eval before training: " + summary.format_metrics(before))
        self.objective.prepare(self.model, self.batch)  # e.g. reference log-probs, once, before any step
        losses: list[float] = []
        t0 = time.perf_counter()
        if self._resume_rng is not None:  # last, so nothing between here and the first step draws from them
            restore_rng(self._resume_rng)
            self._resume_rng = None
        with progress(self.total_steps, desc="train") as bar, self.preemption.handled():
            preempted = self._loop(losses, bar)
        if preempted:
            self.log.close()
            step, path = self._last_saved
            logger.info(f"peftlab: stopped by {self.preemption.name} at step {step}; checkpoint {path}. "
                        "Continue with: peftlab train RECIPE --set resume=auto")
            return TrainResult(self.out_dir, path / "adapter", self.state, before, {}, losses, preempted=True,
                               checkpoint=path)
        stopped = self._last_eval is not None and self._last_eval[0] == self.state.step
        after = self._last_eval[1] if stopped else self.evaluate()  # early stop: that eval is the last one
        if not stopped:
            self._track_best(after)
        self.log.log(self.state.step, "eval", after)
        logger.info("eval after training:  " + summary.format_metrics(after))
        summary.log_samples(after)
        adapter_dir = self.save_adapter(self.out_dir / "adapter")
        self.log.log_artifact(adapter_dir, "adapter")
        self.log.log_artifact(self.out_dir / "metrics.jsonl", "metrics")
        self.log.close()
        best = summary.finish(self.recipe, self.state, before=before, after=after, adapter_dir=adapter_dir,
                              train_time_s=time.perf_counter() - t0, early_stopping=self.early_stopping,
                              is_main=self.dist.is_main)
        return TrainResult(self.out_dir, adapter_dir, self.state, before, after, losses,
                           checkpoint=self._last_saved[1] if self._last_saved else None, best=best)

    def _loop(self, losses: list[float], bar: Any) -> bool:
        """Optimizer steps until the end of training; True when a signal stopped it (after a checkpoint)."""
        t = self.recipe.train
        window_tokens, window_t = 0, time.perf_counter()
        while self.state.step < self.total_steps:
            figs = self.train_step()
            losses.append(figs["loss"])
            window_tokens += figs["tokens"]
            now = time.perf_counter()
            figs["tokens_per_s"] = window_tokens / max(now - window_t, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{figs['loss']:.4f}", lr=f"{figs['lr']:.2e}", tok_s=f"{figs['tokens_per_s']:.0f}")
            step = self.state.step
            if step % t.log_every == 0 or step == self.total_steps:
                self.log.log(step, "train", {**figs, **train_figures(self.objective)})
                window_tokens, window_t = 0, now
            if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                m = self.evaluate()
                self.log.log(step, "eval", m)
                summary.say_beside(bar, f"step {step}: " + summary.format_metrics(m))
                if self._track_best(m):
                    es = self.early_stopping
                    summary.say_beside(bar, f"early stopping at step {step}: {es.metric} did not improve for {es.patience} "
                                            f"evals; best {es.best:.4f} at step {es.best_step} (kept in best/)")
                    self._last_eval = (step, m)
                    return False
            self._save_due = self._save_due or bool(t.save_every and step % t.save_every == 0)
            # Saves happen at step boundaries only, never inside a run of non-finite steps (deferred to the
            # next clean step), and not at the last step (the final adapter follows).
            if self._save_due and self.state.nonfinite_streak == 0 and step < self.total_steps:
                self.save_checkpoint()
            if self.preemption.requested:
                if self._last_saved is None or self._last_saved[0] != step:
                    self.save_checkpoint()
                return True
        return False

    def _track_best(self, metrics: dict[str, Any]) -> bool:
        """Early stopping: keep the adapter of a new best eval in best/; True when training should stop."""
        if self.early_stopping is None:
            return False
        decision = self.early_stopping.update(self.state.step, metrics)
        if decision.improved:
            self.save_adapter(self.out_dir / "best")
        return decision.stop

    def _last_checkpoint(self) -> Path | None:
        return self._last_saved[1] if self._last_saved else latest_complete(self.ckpt_root)

    def _abort(self, msg: str) -> PeftlabError:
        last = self._last_checkpoint()
        self.log.close()
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        return PeftlabError(f"{msg}; no checkpoint was written for it and {where}")


def train(recipe: Any, *, quiet: bool = False) -> TrainResult:
    """``peftlab train``: build the run and train it (running out of memory while loading is explained too)."""
    try:
        trainer = Trainer(recipe, quiet=quiet)
    except BaseException as exc:  # re-raised unless it is an allocation failure or a refused write of the output
        failure = diagnose(exc, recipe.output_dir)
        if failure is None:
            raise
    else:
        return trainer.train()
    raise setup_failure_message(failure, recipe) from None
