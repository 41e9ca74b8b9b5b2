"""Scale-out on DeepSpeed: process group, config merging, the ZeRO engine, ZeRO-3 gathers, saving.

The trainer stays one loop. Under a launcher (``peftlab launch``, ``deepspeed``, ``torchrun``) every
process runs the same :class:`~peftlab.trainer.Trainer`; this module supplies what changes:

- :func:`init_distributed` joins the process group (gloo on CPU, NCCL on GPUs) with a timeout, naming
  the ranks that never arrived instead of hanging;
- :func:`deepspeed_config` reads the recipe's DeepSpeed JSON and fills it from the recipe (batch
  sizes, accumulation, clipping, optimizer) so the two can never disagree — ``"auto"`` is filled, a
  concrete conflicting value is an error naming both;
- :class:`ZeroEngine` is the DeepSpeed engine behind the trainer's four calls (``backward``, ``step``,
  ``state_dict``/``load_state_dict``, plus ``save_checkpoint``/``load_checkpoint`` for DeepSpeed's own
  sharded checkpoints);
- :func:`gathered_head` / :func:`gathered_adapter_state` gather ZeRO-3 partitioned parameters for the
  fused loss and for saving; :func:`check_adapter_tensors` refuses to write an adapter that was not.

Precision: peftlab keeps QLoRA's mixed precision itself — the frozen base runs in ``model.dtype``,
LoRA weights, their gradients and the optimizer state stay fp32. DeepSpeed's own ``bf16``/``fp16``
modes would cast the trainable LoRA weights to half precision, so they are filled as disabled.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.errors import PeftlabError

if TYPE_CHECKING:
    from peftlab.engine.local import StepResult

DEEPSPEED_TAG = "engine"
"""The tag (sub-directory) of DeepSpeed's checkpoint inside a peftlab checkpoint's ``deepspeed/``."""
DEFAULT_JOIN_TIMEOUT_S = 300.0
"""How long a rank waits for the others to join (``PEFTLAB_JOIN_TIMEOUT``)."""
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
"""Timeout of every collective once joined (``PEFTLAB_COLLECTIVE_TIMEOUT``)."""


# ---- ranks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank/world size as a launcher (deepspeed, torchrun, SLURM via our sbatch) exports them."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def shutdown_distributed(*, synchronize: bool = True) -> None:
    """Leave the process group before the interpreter exits (after a barrier when the run succeeded).
    Left to interpreter teardown, gloo's worker threads can be destroyed while still joinable: a rank
    then aborts with "terminate called without an active exception" after a finished run (seen under
    load in the ZeRO-3 test)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if synchronize and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def all_reduce_sum(value: float) -> float:
    """Σ over ranks of a Python number (fp64, so token counts stay exact); identity in one process."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    out = float(t.item())
    return int(out) if isinstance(value, int) else out


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise PeftlabError(f"{name}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise PeftlabError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


def init_distributed(recipe: Any = None, *, join_timeout_s: float | None = None) -> DistInfo:
    """Join the process group of a launched run; a no-op in a single process without DeepSpeed.

    Every rank first checks in on a key-value store hosted by rank 0 at MASTER_ADDR:MASTER_PORT and
    waits at most ``join_timeout_s`` for the others; a missing rank is reported by number (a plain
    ``init_process_group`` would wait and then fail with a bare store timeout). The same store then
    backs the gloo/NCCL group, and DeepSpeed adopts that group. A recipe with a ``deepspeed`` key is
    checked here, before any model is loaded.
    """
    info = env_dist_info()
    uses_deepspeed = recipe is not None and getattr(recipe, "deepspeed", None) is not None
    if uses_deepspeed:
        from peftlab.model.load import pick_device, pick_dtype

        check_recipe_for_deepspeed(recipe, pick_dtype(recipe.model.dtype, pick_device(recipe.train.device)))
    if is_distributed():
        return DistInfo(rank(), world_size(), info.local_rank)
    if info.world_size <= 1 and not uses_deepspeed:
        return info
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=_env_seconds("PEFTLAB_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT_S))
    if info.world_size <= 1:
        # DeepSpeed in one process still wants a process group (a private one of size 1) and the
        # launcher's variables.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1, timeout=timeout)
    else:
        store = _join_store(info, join_timeout_s or _env_seconds("PEFTLAB_JOIN_TIMEOUT", DEFAULT_JOIN_TIMEOUT_S))
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore("pg", store),
                                             rank=info.rank, world_size=info.world_size, timeout=timeout)
    if uses_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above
    return info


def _join_store(info: DistInfo, join_timeout_s: float) -> Any:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise PeftlabError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number") from None
    try:
        store = torch.distributed.TCPStore(addr, port, info.world_size, is_master=info.rank == 0,
                                           timeout=timedelta(seconds=join_timeout_s), wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for an unreachable master
        raise PeftlabError(
            f"rank {info.rank}: cannot reach the rendezvous at MASTER_ADDR={addr} MASTER_PORT={port} within "
            f"{join_timeout_s:.0f}s ({type(exc).__name__}: {exc}); check that node rank 0 is running, that "
            "the address resolves from this node and that the port is open (PEFTLAB_JOIN_TIMEOUT raises the wait)"
        ) from None
    _wait_for_ranks(store, info, join_timeout_s)
    return store


def _wait_for_ranks(store: Any, info: DistInfo, timeout_s: float) -> None:
    store.set(f"peftlab/joined/{info.rank}", socket.gethostname())
    deadline = time.monotonic() + timeout_s
    missing = list(range(info.world_size))
    while True:
        missing = [r for r in missing if not store.check([f"peftlab/joined/{r}"])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise PeftlabError(
                f"rank {info.rank}: rank(s) {', '.join(map(str, missing))} of {info.world_size} did not join "
                f"within {timeout_s:.0f}s (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                f"{os.environ.get('MASTER_PORT')}); start every node (peftlab launch ... --node-rank N), "
                "or raise PEFTLAB_JOIN_TIMEOUT"
            )
        time.sleep(0.05)


# ---- the DeepSpeed config -----------------------------------------------------------------------

AUTO = "auto"


def _conflict(path: str, key: str, value: Any, recipe_key: str, recipe_value: Any) -> PeftlabError:
    return PeftlabError(
        f"DeepSpeed config {path}: {key}={json.dumps(value)} conflicts with the recipe's {recipe_key}="
        f"{recipe_value!r}; set {key} to \"auto\" (or remove it) so peftlab fills it from the recipe, "
        f"or change {recipe_key}"
    )


def read_deepspeed_json(recipe: Any) -> tuple[Path, dict[str, Any]]:
    path = recipe.resolve_path(recipe.deepspeed)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
        raise PeftlabError(f"deepspeed: {recipe.deepspeed}: no such file (resolved to {path}); point it at a "
                           f"DeepSpeed JSON config, e.g. one of {shipped}/zero{{1,2,2-offload,3,3-offload}}.json")
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
    from peftlab.adapters.peft_format import lora_parameters

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
            "(peftlab.distributed.gathered_adapter_state)"
        )
    zero_a = [k for k, v in tensors.items() if "lora_A" in k and not bool(v.detach().ne(0).any())]
    if zero_a or all(not bool(v.detach().ne(0).any()) for v in tensors.values()):
        example = zero_a[0] if zero_a else next(iter(tensors))
        raise PeftlabError(
            f"refusing to save {where}: tensors are all zeros (e.g. {example}); LoRA A matrices are never zero "
            "after initialisation, so these weights were not gathered or were lost (check the ZeRO stage and "
            "that the adapter was gathered from all ranks)"
        )


def save_adapter_gathered(model: nn.Module, out_dir: Path, *, base_model_name_or_path: str) -> Path:
    """Gather the adapter from all ranks, check it, and write it in the PEFT format on rank 0 only."""
    from peftlab.adapters.peft_format import save_adapter

    tensors = {k: v.contiguous() for k, v in gathered_adapter_state(model).items()}
    check_adapter_tensors(tensors, where=str(out_dir))
    if is_main_process():
        save_adapter(model, out_dir, base_model_name_or_path=base_model_name_or_path, tensors=tensors)
    barrier()
    return out_dir


def _register_lora_external_params(model: nn.Module) -> None:
    """Under ZeRO-3, gather a LoRA layer's base weight and A/B matrices whenever the layer runs.

    The fused QLoRA kernel reads them inside the LoRA layer's own forward/backward without calling
    the child modules, whose ZeRO-3 hooks would otherwise be the only ones to gather them.
    (DeepSpeed's "z3 leaf module" does the same for forward, but its backward re-gather misses the
    children's saved weights on the plain PyTorch path.)
    """
    import deepspeed

    from peftlab.adapters.lora_inject import lora_modules

    for module in lora_modules(model).values():
        for p in (module.base_layer.weight, getattr(module.base_layer, "bias", None), module.lora_A.weight,
                  module.lora_B.weight, getattr(module, "lora_magnitude_vector", None)):
            if isinstance(p, nn.Parameter):
                deepspeed.zero.register_external_parameter(module, p)


# ---- the engine ---------------------------------------------------------------------------------


class ZeroEngine:
    """DeepSpeed (ZeRO 0-3, optional CPU offload) behind the trainer's engine interface.

    The optimizer is torch's AdamW built by :func:`peftlab.engine.build_optimizer` and the schedule
    is the recipe's, so a run under DeepSpeed makes the same updates as the local engine. Losses
    arrive already divided by the *global* number of target tokens of the step; DeepSpeed averages
    gradients over ranks, so :meth:`backward` scales by the world size to turn that average back into
    the sum the token normalisation needs (and passes ``scale_wrt_gas=False``: accumulation is
    already exact).
    """

    def __init__(self, model: nn.Module, recipe: Any, total_steps: int, device: torch.device,
                 compute_dtype: torch.dtype):
        import deepspeed

        from peftlab.engine.local import build_optimizer, lr_lambda, trainable_parameters, warmup_steps

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t.scheduler, warmup_steps(t, total_steps), total_steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        if self.stage == 3:
            _register_lora_external_params(model)
        self.model = self.ds.module
        self.params = params

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, *, skip: bool = False) -> StepResult:
        """Apply the step's accumulated gradients (DeepSpeed reduces, clips and steps); ``skip`` (a
        non-finite loss) drops them instead and only advances the schedule."""
        from peftlab.engine.local import StepResult

        if skip:
            self.ds.zero_grad()
            self.scheduler.step()
            return StepResult(float("nan"), True)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm_f = float(norm) if norm is not None else float("nan")
        if isinstance(norm, torch.Tensor):
            norm_f = float(norm.item())
        skipped = bool(getattr(self.ds, "skipped_steps", 0) > getattr(self, "_skipped_seen", 0))
        self._skipped_seen = getattr(self.ds, "skipped_steps", 0)
        return StepResult(norm_f if math.isfinite(norm_f) else float("nan"), skipped)

    # The trainer's checkpoint hooks. DeepSpeed's partitioned optimizer state is not a dict one rank
    # can hold, so state_dict() returns only the bookkeeping and the state itself goes through
    # DeepSpeed's own sharded checkpoint (save_checkpoint / load_checkpoint, called on every rank).
    def state_dict(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "zero_stage": self.stage, "global_steps": int(self.ds.global_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("engine") != "deepspeed":
            raise PeftlabError("this checkpoint was written by the single-process engine; resume it without "
                               "the deepspeed recipe key, or start a new run")

    def save_checkpoint(self, directory: Path, tag: str = DEEPSPEED_TAG) -> None:
        """DeepSpeed's sharded checkpoint (every rank writes its partition) into ``directory/tag``."""
        # Frozen (base) weights are left out: they come from the model recipe; load is non-strict. DeepSpeed's
        # `latest` is written by the trainer into the atomic checkpoint instead (DeepSpeed writes it in place).
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, directory: Path, tag: str = DEEPSPEED_TAG) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=False)
        if path is None:
            raise PeftlabError(f"no DeepSpeed checkpoint under {directory}/{tag}; resume from a checkpoint that "
                               "was written by a run with the same deepspeed config")

