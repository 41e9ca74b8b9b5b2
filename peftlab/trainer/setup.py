"""Building a training run from its recipe: each component, in the order the run needs them.

    refusals       what train needs beyond a valid recipe          check_streaming
    process group  (launched runs; DeepSpeed adopts it)           join
    output.dir     refused before any work when unusable           prepare_output_dir
    CPU threads, seed                                              use_cpu_threads, seed_everything
    model          base (+4-bit, +LoRA), or backbone + LoRA         load_model
    data           tokenized, cached                               load_data
    batches        indices -> batch; augment: per epoch            batch_builder
    data order     seeded per epoch, or stream order               sampler
    schedule       optimizer steps of the run                      total_steps
    engine         local PyTorch or DeepSpeed ZeRO                  build_engine
    resume         a checkpoint's weights, optimizer and state      resume_state
    metrics.jsonl  continued on resume, new for a fresh run        continue_metrics

The objective is :func:`peftlab.objectives.objective.build_objective`; resuming, :mod:`peftlab.checkpoint.resume`.
:class:`peftlab.trainer.loop.Trainer` calls these in its constructor and :func:`log_start` when training starts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.adapters.freezing import optimizer_param_groups, resolve_layers
from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.checkpoint.resume import resume
from peftlab.checkpoint.store import (
    checkpoint_dirs,
    probe_writable,
    remove_checkpoints,
    safe_subpath,
    storage_problem,
)
from peftlab.data.augment import build_augmenter, describe
from peftlab.data.build import DataBundle
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import is_stream
from peftlab.engine.deepspeed import ZeroEngine, join_for_deepspeed
from peftlab.engine.hostmem import choose_cpu_threads, openmp_wait_policy, prepare_host_allocator
from peftlab.engine.interface import Engine
from peftlab.engine.local import LocalEngine
from peftlab.engine.memory_fit import apply_auto_fit
from peftlab.engine.process_group import DistInfo, env_dist_info, join_process_group, restore_launcher_env
from peftlab.errors import PeftlabError
from peftlab.model.classifier import build_classifier_model
from peftlab.model.domain_head import separate_domain_head_group
from peftlab.model.load import LoadedModel, build_model, count_parameters, pick_device, pick_dtype
from peftlab.trainer.state import (
    BatchBuilder,
    EpochSampler,
    RunInputs,
    StreamSampler,
    TrainState,
    build_sampler,
)

logger = logging.getLogger(__name__)


def join(recipe: Any) -> DistInfo:
    """Join the process group of a launched run (first: the data cache and DeepSpeed need it); a no-op in a
    single process without DeepSpeed. A ``deepspeed`` recipe is checked here, before any model is loaded."""
    if recipe.deepspeed is None:
        launched = env_dist_info().world_size
        if launched > 1:  # the local engine never averages gradients: N processes would train N diverging copies
            raise PeftlabError(
                f"this run was launched as {launched} processes (WORLD_SIZE={launched}) but the recipe has no "
                "deepspeed key: peftlab trains across processes through DeepSpeed, which averages the gradients. "
                "Add deepspeed: zero1 (or zero2 / zero3: the shipped configs, or a DeepSpeed JSON of yours), or run one "
                "process")
        return join_process_group()
    return join_for_deepspeed(recipe, pick_dtype(recipe.model.dtype, pick_device(recipe.train.device)))


def leave(engine: Any) -> None:
    """Put back what the run changed process-wide, whether it finished, failed or failed while it was built: ZeRO-3's
    ``F.linear`` (the engine's close) and the launcher variables a one-process DeepSpeed run set when it joined
    (:func:`restore_launcher_env`)."""
    try:
        if engine is not None:
            engine.close()
    finally:
        restore_launcher_env()


def streaming_problem(recipe: Any) -> str | None:
    """Why ``peftlab train`` would refuse this ``data.streaming`` recipe (None: it would not). Not recipe
    validation: ``peftlab data`` previews such recipes and ``peftlab estimate`` sizes them as they are."""
    if not recipe.data.streaming:
        return None
    if recipe.train.max_steps is None:
        return (f"data.streaming: true needs train.max_steps: a streamed data set's length is unknown until it has "
                f"been read, so train.epochs ({recipe.train.epochs:g}) cannot be turned into optimizer steps. Set "
                "train.max_steps (e.g. --set train.max_steps=1000; the stream starts a new pass when it runs out), "
                "or set data.streaming: false")
    if recipe.task != "causal_lm":
        return (f"data.streaming: true with task={recipe.task}: classification/regression rows are read in memory; "
                "set data.streaming: false")
    if recipe.distill is not None and recipe.distill.mode == "offline":
        return ("data.streaming: true with distill.mode: offline: the teacher cache is indexed by training row, and "
                "a stream has no row indices; set distill.mode: online or data.streaming: false")
    return None


def check_streaming(recipe: Any) -> None:
    """Refuse a ``data.streaming`` recipe ``peftlab train`` cannot run (:func:`streaming_problem`): the Trainer's
    first step, and ``peftlab launch``'s before it starts any process — nothing loaded or written yet."""
    problem = streaming_problem(recipe)
    if problem is not None:
        raise PeftlabError(problem)


def prepare_output_dir(recipe: Any, is_main: bool) -> Path:
    """Refuse an output.dir the run cannot use (a file, not writable) or would mix with an earlier run's
    checkpoints — before anything in it is changed; then clear what a fresh run replaces. Returns the
    checkpoint root (``output.dir/checkpoint.dir``)."""
    out = recipe.output_dir
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
        raise PeftlabError(f"output.dir {out} {where}, not a directory; set output.dir to a directory "
                           "(peftlab creates it when missing), or move that file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as exc:
        why, fix = storage_problem(exc)
        raise PeftlabError(f"output.dir {out} is not writable ({why}): {fix}. The run writes its checkpoints, "
                           "metrics and adapter there; nothing was trained") from None
    fresh = recipe.resume is None
    if (out / "adapter" / "adapter_config.json").exists() and not recipe.output.overwrite and fresh:
        raise PeftlabError(
            f"output.dir {out} already holds a finished run; choose another output.dir, set "
            "output.overwrite: true, or resume it"
        )
    ckpt_root = safe_subpath(out, recipe.checkpoint.dir, what="checkpoint.dir")
    earlier = checkpoint_dirs(ckpt_root)
    if fresh and earlier and not recipe.output.overwrite:
        # Their steps would interleave with this run's: rotation could keep theirs and drop ours, and a
        # later resume: auto would continue the OTHER run.
        raise PeftlabError(
            f"output.dir {out} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[-3:])}"
            f"{', ...' if len(earlier) > 3 else ''} in {ckpt_root}); continue that run with resume: auto, start "
            "over with output.overwrite: true (deletes them), or choose another output.dir"
        )
    if fresh and is_main:  # every rank checked; one removes what the fresh run replaces
        (out / "metrics.jsonl").unlink(missing_ok=True)
        remove_checkpoints(ckpt_root)
    return ckpt_root


def use_cpu_threads(recipe: Any) -> tuple[int, str]:
    """train.threads, else torch's pool capped at the CPUs this process may use: (threads, why), reported at
    start-up."""
    threads = choose_cpu_threads(recipe.train.threads, torch.get_num_threads())
    if threads[0] != torch.get_num_threads():
        torch.set_num_threads(threads[0])
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(recipe: Any) -> LoadedModel:
    """The model the recipe trains: the base (+4-bit, +LoRA) for causal LM, the backbone + LoRA for
    classification / regression (its head comes with the objective, once the data's labels are known)."""
    resolve_layers(recipe)  # adapter.layers: top:k -> explicit indices
    if pick_device(recipe.train.device).type == "cpu":  # before loading (peftlab/engine/hostmem.py)
        prepare_host_allocator(recipe.train.host_allocator)  # as the planner's baseline probe does
    if recipe.task != "causal_lm":
        return build_classifier_model(recipe)
    if recipe.train.auto_fit:  # shrink micro-batch / max_seq_len to what the memory planner says fits
        apply_auto_fit(recipe)
    return build_model(recipe)


def load_data(recipe: Any, tokenizer: Any) -> DataBundle:
    """The tokenized train/eval data, cached in ``output.dir/.data-cache`` (``PEFTLAB_DATA_CACHE`` elsewhere)."""
    cache_dir = Path(os.environ.get("PEFTLAB_DATA_CACHE", recipe.output_dir / ".data-cache"))
    return build_data(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir,
                      base_dir=Path(recipe.base_dir))


def batch_builder(recipe: Any, data: DataBundle, tokenizer: Any, device: torch.device) -> BatchBuilder:
    """Row indices -> a batch on the device; with an ``augment:`` section, train rows are augmented per epoch."""
    augmenter = build_augmenter(recipe.augment, recipe.data, tokenizer, seed=recipe.train.seed,
                                base_dir=Path(recipe.base_dir))
    if augmenter is not None:
        logger.info(f"augmenting the training inputs at every epoch: {describe(recipe.augment)}")
    return BatchBuilder(data, device, recipe.model.attn_implementation, augmenter)


def sampler(recipe: Any, data: DataBundle) -> EpochSampler | StreamSampler:
    """The order of the training rows: a seeded permutation per epoch, or for ``data.streaming`` the stream's
    own order (:func:`peftlab.trainer.state.build_sampler`)."""
    return build_sampler(data.train, recipe.train.micro_batch_size, recipe.train.seed)


def total_steps(recipe: Any, sampler: EpochSampler | StreamSampler, world_size: int) -> int:
    """``train.max_steps``, else the optimizer steps of ``train.epochs`` (every rank takes its share of a step;
    a stream has no epoch length: :func:`check_streaming` asks for max_steps)."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    steps_per_epoch = math.ceil(sampler.micro_batches_per_epoch / (t.grad_accum * world_size))
    return max(1, math.ceil(t.epochs * steps_per_epoch))


def build_engine(recipe: Any, loaded: LoadedModel, unfrozen: dict[str, torch.nn.Module], steps: int) -> Engine:
    """DeepSpeed ZeRO when the recipe names a DeepSpeed config, else the local PyTorch engine (LoRA+ and
    unfrozen modules get their own learning rates)."""
    if recipe.deepspeed is not None:
        return ZeroEngine(loaded.model, recipe, steps, loaded.device, loaded.dtype)
    groups = optimizer_param_groups(loaded.model, recipe.adapter, recipe.train.lr, unfrozen)
    groups = separate_domain_head_group(loaded.model, groups, recipe.train.lr)  # dann.head.lr
    return LocalEngine(loaded.model, recipe.train, steps, loaded.device, param_groups=groups)


def resume_state(recipe: Any, resume_from: Path | None, model: torch.nn.Module, engine: Engine,
                 inputs: RunInputs) -> tuple[TrainState, dict[str, Any] | None]:
    """Where the run continues: a fresh state (and no RNG state) without a checkpoint; else the checkpoint's
    trainer state and RNG state, after :func:`~peftlab.checkpoint.resume.resume` restored the weights and optimizer
    and checked that the data (and what the objective reads: DANN target rows) are the ones it was trained on."""
    if resume_from is None:
        return TrainState(), None
    resumed = resume(resume_from, recipe=recipe, model=model, engine=engine,
                     data_fingerprint=inputs.data_fingerprint, n_train=inputs.n_train)
    inputs.check(resumed.trainer_state, resume_from)
    state = TrainState.from_json(resumed.trainer_state)
    logger.info(f"peftlab: resuming from {resume_from} (step {state.step}, epoch {state.epoch})")
    return state, resumed.rng


def continue_metrics(path: Path, resumed_step: int | None, is_main: bool) -> None:
    """metrics.jsonl of a resumed run keeps its records up to the checkpoint's step (later ones are
    recomputed, so no step appears twice); a fresh run (``resumed_step`` None) starts a new file."""
    if not is_main or not path.exists():
        return
    if resumed_step is None:
        path.unlink(missing_ok=True)
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(record, dict) and record.get("step", 0) <= resumed_step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def resolved_recipe(recipe: Any, loaded: LoadedModel) -> Any:
    """The recipe with ``auto`` choices replaced by what this run used (the compute dtype), for the
    adapter's ``peftlab_recipe.yaml``: merge/eval/generate on another machine then rebuild exactly
    the base training saw (e.g. NF4 scales quantised from a bf16 load on a GPU). Its local paths are
    absolute (:meth:`~peftlab.recipe.schema.Recipe.with_local_paths_absolute`): the copy lives in the
    adapter's folder, not the recipe's."""
    resolved = recipe.with_local_paths_absolute()  # the copy lives elsewhere: its paths must not move with it
    resolved.model.dtype = str(loaded.dtype).replace("torch.", "")
    return resolved


def log_start(recipe: Any, loaded: LoadedModel, data: DataBundle, steps: int, cpu_threads: tuple[int, str]) -> None:
    """The start-up lines: model, device, dtype, quantization, LoRA, parameter counts; data and steps; CPU threads."""
    r = recipe
    trainable, total = count_parameters(loaded.model)
    logger.info(f"peftlab: {r.model.name} on {loaded.device} ({loaded.dtype}), quantization={r.quantization.mode}, "
                f"LoRA r={r.adapter.r} on {len(loaded.lora_modules)} modules: {trainable:,} trainable / "
                f"{total:,} parameters")
    n_train = "streamed" if is_stream(data.train) else len(data.train)
    logger.info(f"data: {n_train} train rows, {len(data.eval or [])} eval rows, "
                f"{steps} optimizer steps of {r.train.micro_batch_size}x{r.train.grad_accum}")
    if loaded.device.type == "cpu":
        threads, why = cpu_threads
        logger.info(f"cpu: {threads} thread(s) ({why}); OpenMP wait policy: {openmp_wait_policy()}")
