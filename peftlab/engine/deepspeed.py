"""Scale-out on DeepSpeed: the config merged from the recipe, the ZeRO engine, ZeRO-3 gathers.

The trainer stays one loop. Under a launcher (``peftlab launch``, ``deepspeed``, ``torchrun``) every
process runs the same :class:`~peftlab.trainer.loop.Trainer` on the process group of
:mod:`peftlab.engine.process_group`; this module supplies what changes under DeepSpeed:

- :func:`join_for_deepspeed` checks the recipe before any model is loaded, joins the process group and lets
  DeepSpeed adopt it;
- :func:`deepspeed_config` reads the recipe's DeepSpeed JSON and fills it from the recipe (batch
  sizes, accumulation, clipping, optimizer) so the two can never disagree — ``"auto"`` is filled, a
  concrete conflicting value is an error naming both;
- :class:`ZeroEngine` is the DeepSpeed engine behind :class:`peftlab.engine.interface.Engine` (its part of
  a checkpoint is DeepSpeed's own sharded checkpoint, staged by every rank and added to the atomic checkpoint
  with its ``latest`` file);
- :func:`gathered_head` / :func:`gathered_adapter_state` gather ZeRO-3 partitioned parameters for the
  fused loss and for saving; :func:`check_adapter_tensors` refuses to write an adapter that was not.

``deepspeed`` itself is imported only where it runs (CPU users and the CLI never pay for it).

Precision: peftlab keeps QLoRA's mixed precision itself — the frozen base runs in ``model.dtype``,
LoRA weights, their gradients and the optimizer state stay fp32. DeepSpeed's own ``bf16``/``fp16``
modes would cast the trainable LoRA weights to half precision, so they are filled as disabled.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.adapters.lora_inject import lora_modules
from peftlab.adapters.peft_format import lora_parameters, save_adapter
from peftlab.engine.interface import StepResult
from peftlab.engine.local import build_optimizer, lr_schedule, trainable_parameters
from peftlab.engine.process_group import (
    DistInfo,
    backend,
    barrier,
    collective_timeout,
    is_distributed,
    is_main_process,
    join_process_group,
    world_size,
)
from peftlab.errors import PeftlabError
from peftlab.recipe.shipped import shipped_deepspeed_config, shipped_deepspeed_configs

DEEPSPEED_TAG = "engine"
"""The tag (sub-directory) of DeepSpeed's checkpoint inside a peftlab checkpoint's ``deepspeed/``."""


def join_for_deepspeed(recipe: Any, compute_dtype: torch.dtype) -> DistInfo:
    """Refuse a recipe DeepSpeed cannot run (before any model is loaded), join the process group (a private one
    of size 1 in a single process) and let DeepSpeed adopt it."""
    check_recipe_for_deepspeed(recipe, compute_dtype)
    joined_before = is_distributed()
    info = join_process_group(single_process_group=True)
    if not joined_before:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend(), timeout=collective_timeout())
    return info


# ---- the DeepSpeed config -----------------------------------------------------------------------

AUTO = "auto"


def _conflict(path: str, key: str, value: Any, recipe_key: str, recipe_value: Any) -> PeftlabError:
    return PeftlabError(
        f"DeepSpeed config {path}: {key}={json.dumps(value)} conflicts with the recipe's {recipe_key}="
        f"{recipe_value!r}; set {key} to \"auto\" (or remove it) so peftlab fills it from the recipe, "
        f"or change {recipe_key}"
    )


def deepspeed_json_path(recipe: Any) -> Path:
    """The DeepSpeed config file of ``recipe.deepspeed``: a path (relative to the recipe's folder), or the bare name
    of a shipped config (``zero2``, ``zero3-offload``, ...) when no file of that name is there."""
    path = recipe.resolve_path(recipe.deepspeed)
    if not path.is_file():
        shipped = shipped_deepspeed_config(recipe.deepspeed)
        if shipped is not None:
            return shipped
        raise PeftlabError(f"deepspeed: {recipe.deepspeed}: no such file (resolved to {path}); point it at a "
                           "DeepSpeed JSON config, or name one of those shipped with peftlab: "
                           f"{', '.join(shipped_deepspeed_configs())} (e.g. deepspeed: zero2)")
    return path


def read_deepspeed_json(recipe: Any) -> tuple[Path, dict[str, Any]]:
    path = deepspeed_json_path(recipe)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PeftlabError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return path, raw


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def deepspeed_config(recipe: Any, *, world_size: int, compute_dtype: torch.dtype,
                     hidden_size: int | None = None) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with every training setting taken from the recipe.

    Filled (``"auto"`` or absent) — and refused when concrete and different:
    ``train_micro_batch_size_per_gpu`` ← train.micro_batch_size, ``gradient_accumulation_steps`` ←
    train.grad_accum, ``train_batch_size`` ← their product × world size, ``gradient_clipping`` ←
    train.max_grad_norm, ``optimizer`` (AdamW only) ← train.lr/betas/eps/weight_decay.
    HF-style ``"auto"`` bucket sizes under ``zero_optimization`` are derived from the hidden size.
    """
    path, cfg = read_deepspeed_json(recipe)
    cfg = json.loads(json.dumps(cfg))
    t = recipe.train

    def fill(key: str, value: Any, recipe_key: str, recipe_value: Any, node: dict[str, Any] = cfg,
             shown: str | None = None) -> None:
        have = node.get(key, AUTO)
        if have != AUTO and have != value:
            raise _conflict(str(path), shown or key, have, recipe_key, recipe_value)
        node[key] = value

    fill("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", t.micro_batch_size)
    fill("gradient_accumulation_steps", t.grad_accum, "train.grad_accum", t.grad_accum)
    fill("train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
         "train.micro_batch_size x train.grad_accum x world size",
         f"{t.micro_batch_size} x {t.grad_accum} x {world_size}")
    clip = cfg.get("gradient_clipping", AUTO)
    if clip != AUTO and not (t.max_grad_norm is None and clip == 0) and clip != t.max_grad_norm:
        raise _conflict(str(path), "gradient_clipping", clip, "train.max_grad_norm", t.max_grad_norm)
    cfg["gradient_clipping"] = t.max_grad_norm or 0.0

    for half in ("bf16", "fp16"):
        section = cfg.get(half)
        if section is None:
            continue
        enabled = section.get("enabled", AUTO) if isinstance(section, dict) else section
        if enabled not in (AUTO, False):
            raise PeftlabError(
                f"DeepSpeed config {path}: {half}.enabled={json.dumps(enabled)}: peftlab runs the frozen base in "
                f"model.dtype (here {str(compute_dtype).removeprefix('torch.')}) and keeps LoRA weights and "
                f"optimizer state in fp32; DeepSpeed's {half} mode would cast the trainable weights to half "
                f"precision. Set {half}.enabled to \"auto\" (or remove it) and choose the compute dtype with "
                "model.dtype"
            )
        cfg[half] = {**(section if isinstance(section, dict) else {}), "enabled": False}

    opt = cfg.pop("optimizer", None)
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if kind not in ("adamw", "adam") or t.optimizer != "adamw":
            raise _conflict(str(path), "optimizer.type", opt.get("type"), "train.optimizer", t.optimizer)
        params = opt.get("params", {}) or {}
        wanted = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
        for key, value in params.items():
            if key in wanted and value != AUTO and value != wanted[key]:
                raise _conflict(str(path), f"optimizer.params.{key}", value, f"train.{key}", wanted[key])
            if key not in wanted and key not in ("torch_adam", "adam_w_mode"):
                raise PeftlabError(f"DeepSpeed config {path}: optimizer.params.{key} is not supported; peftlab "
                                   "builds AdamW from the recipe's train section (lr, betas, eps, weight_decay)")
    if "scheduler" in cfg:
        raise PeftlabError(f"DeepSpeed config {path}: remove \"scheduler\"; the learning-rate schedule comes from "
                           "the recipe (train.scheduler, train.warmup_ratio / warmup_steps)")

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise PeftlabError(f"DeepSpeed config {path}: zero_optimization.stage={stage}; expected 0, 1, 2 or 3")
    h = hidden_size or 4096
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == AUTO:
            zero[key] = value
    for where, node in (("", cfg), ("zero_optimization.", zero)):
        for key, value in node.items():
            if value == AUTO:
                raise PeftlabError(f"DeepSpeed config {path}: {where}{key}=\"auto\" is not a value peftlab can "
                                   "fill from the recipe; give it a concrete value")
    # The optimizer is torch's AdamW built from the recipe (the same update as a single-process run);
    # with optimizer offload it runs on the CPU partitions instead of DeepSpeedCPUAdam.
    cfg["zero_allow_untested_optimizer"] = True
    cfg["zero_force_ds_cpu_optimizer"] = False
    # step() is the accumulation boundary: the trainer calls backward once per micro-batch and step
    # once per optimizer step, exactly as with the local engine.
    cfg["managed_gradient_accumulation"] = False
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def check_recipe_for_deepspeed(recipe: Any, compute_dtype: torch.dtype) -> None:
    """Refuse combinations that cannot work before any model is loaded."""
    path, raw = read_deepspeed_json(recipe)
    q = recipe.quantization
    if zero_stage(raw) == 3 and q.mode != "none":
        want = str(compute_dtype).removeprefix("torch.")
        if q.quant_storage != want:
            raise PeftlabError(
                f"quantization.quant_storage={q.quant_storage} with DeepSpeed ZeRO-3 ({path}): ZeRO-3 partitions "
                f"and gathers the packed 4-bit weights as tensors of their storage dtype, and needs it to be "
                f"the compute dtype (model.dtype resolves to {want} here); set quantization.quant_storage: {want}"
            )


# ---- ZeRO-3 gathers -----------------------------------------------------------------------------


def is_partitioned(p: torch.Tensor | None) -> bool:
    """A ZeRO-3 parameter (its data lives in per-rank partitions)."""
    return p is not None and hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered_head(weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The output head's (weight, bias), whole, for the fused loss.

    Outside ZeRO-3 they are returned as they are. Under ZeRO-3 they are gathered from all ranks and
    copied (the head is frozen under LoRA): the fused loss may keep the weight for its backward pass,
    which runs after the gather is released and the parameter re-partitioned.
    """
    if not (is_partitioned(weight) or is_partitioned(bias)):
        yield weight, bias
        return
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise PeftlabError("a trainable output head under DeepSpeed ZeRO-3 is not supported by the fused loss; "
                           "use ZeRO stage 1/2 or keep lm_head out of adapter.target_modules")
    import deepspeed

    params = [p for p in (weight, bias) if is_partitioned(p)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        w = weight.detach().clone()
        b = bias.detach().clone() if bias is not None else None
    yield w, b


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights (PEFT key names) as whole CPU tensors on every rank — gathered under ZeRO-3."""
    named = lora_parameters(model)
    partitioned = [p for p in named.values() if is_partitioned(p)]
    if not partitioned:
        return {k: p.detach().to("cpu").clone() for k, p in named.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {k: p.detach().to("cpu").clone() for k, p in named.items()}


def check_adapter_tensors(tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Refuse to write an adapter that cannot be right: no tensors, an empty tensor (a ZeRO-3 partition
    that was never gathered), or nothing but zeros (a LoRA A matrix is never zero after init)."""
    if not tensors:
        raise PeftlabError(f"refusing to save {where}: it holds no LoRA tensors (check adapter.target_modules)")
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if empty:
        raise PeftlabError(
            f"refusing to save {where}: {len(empty)} of {len(tensors)} tensors are empty (e.g. {empty[0]}); under "
            "DeepSpeed ZeRO-3 the weights are partitioned across ranks and must be gathered before saving "
            "(peftlab.engine.deepspeed.gathered_adapter_state)"
        )
    zero_a = [k for k, v in tensors.items() if "lora_A" in k and not bool(v.detach().ne(0).any())]
    if zero_a or all(not bool(v.detach().ne(0).any()) for v in tensors.values()):
        example = zero_a[0] if zero_a else next(iter(tensors))
        raise PeftlabError(
            f"refusing to save {where}: tensors are all zeros (e.g. {example}); LoRA A matrices are never zero "
            "after initialisation, so these weights were not gathered or were lost (check the ZeRO stage and "
            "that the adapter was gathered from all ranks)"
        )


def _register_lora_external_params(model: nn.Module) -> None:
    """Under ZeRO-3, gather a LoRA layer's base weight and A/B matrices whenever the layer runs.

    The fused QLoRA kernel reads them inside the LoRA layer's own forward/backward without calling
    the child modules, whose ZeRO-3 hooks would otherwise be the only ones to gather them.
    (DeepSpeed's "z3 leaf module" does the same for forward, but its backward re-gather misses the
    children's saved weights on the plain PyTorch path.)
    """
    import deepspeed

    for module in lora_modules(model).values():
        for p in (module.base_layer.weight, getattr(module.base_layer, "bias", None), module.lora_A.weight,
                  module.lora_B.weight, getattr(module, "lora_magnitude_vector", None)):
            if isinstance(p, nn.Parameter):
                deepspeed.zero.register_external_parameter(module, p)


def restore_functional_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of ``torch.nn.functional.linear``.

    ``deepspeed.initialize`` at stage 3 (``zero_optimization.memory_efficient_linear``, on by default) swaps
    ``torch.nn.functional.linear`` for its own autograd Function, which saves the partitioned weight itself for the
    backward pass instead of a view of the gathered one (so the gathered weight can be freed), and leaves it there
    "until manually reset" (its words): every later ``nn.Linear`` of the process — another run, an eval, a merge
    in a notebook — would go through it. The run needs it; nothing after the run does. Only DeepSpeed's own
    wrapper is replaced (by the function it kept): anything else found there is left alone."""
    from deepspeed.runtime.zero import partition_parameters as zp

    original = getattr(zp.InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is zp.zero3_linear_wrap:
        torch.nn.functional.linear = original


# ---- the engine ---------------------------------------------------------------------------------


class ZeroEngine:
    """DeepSpeed (ZeRO 0-3, optional CPU offload) behind :class:`peftlab.engine.interface.Engine`.

    The optimizer is torch's AdamW built by :func:`peftlab.engine.local.build_optimizer` and the schedule
    is the recipe's, so a run under DeepSpeed makes the same updates as the local engine. Losses
    arrive already divided by the *global* number of target tokens of the step; DeepSpeed averages
    gradients over ranks, so :meth:`backward` scales by the world size to turn that average back into
    the sum the token normalisation needs (and passes ``scale_wrt_gas=False``: accumulation is
    already exact).
    """

    def __init__(self, model: nn.Module, recipe: Any, total_steps: int, device: torch.device,
                 compute_dtype: torch.dtype):
        import deepspeed

        t = recipe.train
        self.world_size = world_size()
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        self.config = deepspeed_config(recipe, world_size=self.world_size, compute_dtype=compute_dtype,
                                       hidden_size=hidden)
        self.stage = zero_stage(self.config)
        offload = any(str((self.config["zero_optimization"].get(k) or {}).get("device", "none")) != "none"
                      for k in ("offload_optimizer", "offload_param"))
        params = trainable_parameters(model)
        optimizer = build_optimizer(params, t, torch.device("cpu") if offload else device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total_steps))
        try:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
            if self.stage == 3:
                _register_lora_external_params(model)
        except BaseException:
            restore_functional_linear()  # no engine is left to close
            raise
        self.model = self.ds.module
        self.params = params
        self._skipped_seen = 0

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def close(self) -> None:
        """The run is over (finished or failed): put back what DeepSpeed changed process-wide for it
        (:func:`restore_functional_linear`), so later work in this process runs as if no engine had been built.
        Safe to call more than once."""
        restore_functional_linear()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, *, skip: bool = False) -> StepResult:
        """Apply the step's accumulated gradients (DeepSpeed reduces, clips and steps); ``skip`` (a
        non-finite loss) drops them instead and only advances the schedule."""
        if skip:
            self.ds.zero_grad()
            self.scheduler.step()
            return StepResult(float("nan"), True)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm_f = float(norm) if norm is not None else float("nan")
        if isinstance(norm, torch.Tensor):
            norm_f = float(norm.item())
        skipped = bool(getattr(self.ds, "skipped_steps", 0) > self._skipped_seen)
        self._skipped_seen = getattr(self.ds, "skipped_steps", 0)
        return StepResult(norm_f if math.isfinite(norm_f) else float("nan"), skipped)

    # DeepSpeed's partitioned optimizer state is not a dict one rank can hold: state_dict() is only the
    # bookkeeping (engine.pt), the state itself travels in DeepSpeed's own sharded checkpoint (checkpoint_part).
    def state_dict(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "zero_stage": self.stage, "global_steps": int(self.ds.global_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("engine") != "deepspeed":
            raise PeftlabError("this checkpoint was written by the single-process engine; resume it without "
                               "the deepspeed recipe key, or start a new run")

    @contextlib.contextmanager
    def checkpoint_part(self, staging: Path) -> Iterator[dict[str, bytes]]:
        """DeepSpeed's sharded checkpoint (optimizer partitions, scheduler, engine counters), called on every rank.

        Every rank writes its shard into ``staging`` (``<checkpoint root>/.ds-staging-step-N``: the checkpoint
        root must be on a filesystem every rank sees — shared storage on multi-node runs). Rank 0 then gets every
        staged file as ``deepspeed/<relative path>``, plus DeepSpeed's ``latest`` naming the tag, so that the
        atomic checkpoint lists and hashes them in ``COMPLETE`` and ``deepspeed/`` is a complete DeepSpeed
        checkpoint directory (``zero_to_fp32.py <checkpoint>/deepspeed OUT`` works without ``--tag``). The
        staging directory is removed when the block ends.
        """
        main = is_main_process()
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of a crashed save
            staging.mkdir(parents=True)
        barrier()
        # Frozen (base) weights are left out: they come from the model recipe; load is non-strict. DeepSpeed
        # writes `latest` in place, so it is added to the atomic checkpoint instead (save_latest=False).
        self.ds.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        barrier()
        try:
            files: dict[str, bytes] = {}
            if main:
                for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                    files[f"deepspeed/{f.relative_to(staging).as_posix()}"] = f.read_bytes()
                files["deepspeed/latest"] = DEEPSPEED_TAG.encode()
            yield files
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)

    def restore(self, path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Every rank loads DeepSpeed's own checkpoint: LoRA weights (fp32 partitions), optimizer, scheduler and
        engine counters all come from ``deepspeed/`` (``weights``, the gathered copy, are not needed)."""
        self.load_state_dict(state)  # refuses a single-process engine's checkpoint
        ds_dir = path / "deepspeed"
        if not ds_dir.is_dir():
            raise PeftlabError(f"resume: {path} holds no deepspeed/ directory (DeepSpeed's optimizer and "
                               "scheduler state), so the run cannot continue exactly; resume from a checkpoint "
                               "written by this peftlab under DeepSpeed, or start a new run")
        loaded, _ = self.ds.load_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=True, load_module_strict=False)
        if loaded is None:
            raise PeftlabError(f"no DeepSpeed checkpoint under {ds_dir}/{DEEPSPEED_TAG}; resume from a checkpoint "
                               "that was written by a run with the same deepspeed config")

    def adapter_state(self, where: str) -> dict[str, torch.Tensor]:
        """Gathered from all ranks (ZeRO-3 partitions) and checked whole and non-empty."""
        tensors = {k: v.contiguous() for k, v in gathered_adapter_state(self.model).items()}
        check_adapter_tensors(tensors, where=where)
        return tensors

    def save_adapter(self, path: Path, *, base_model_name_or_path: str) -> None:
        """Gather the adapter from all ranks, check it, and write it in the PEFT format on rank 0 only."""
        tensors = self.adapter_state(str(path))
        if is_main_process():
            save_adapter(self.model, path, base_model_name_or_path=base_model_name_or_path, tensors=tensors)
        barrier()
