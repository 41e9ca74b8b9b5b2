"""The local engine: plain PyTorch on one device — backward, gradient clipping, optimizer and scheduler steps.

It implements :class:`peftlab.engine.interface.Engine`, as the DeepSpeed engine (:mod:`peftlab.engine.deepspeed`,
ZeRO 1/2/3) does, so the loop runs either without asking which. The optimizer builder and the schedule here are
shared by both engines (a run under DeepSpeed makes the same updates).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.adapters.peft_format import lora_state_dict, save_adapter
from peftlab.engine.hostmem import release_if_worthwhile
from peftlab.engine.interface import StepResult
from peftlab.engine.process_group import barrier, is_main_process
from peftlab.errors import PeftlabError


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params: list[nn.Parameter], train: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit / paged AdamW (``train.optimizer``)."""
    if not params:
        raise PeftlabError("nothing to train: no parameter requires grad (check adapter.target_modules)")
    kw = {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}
    if train.optimizer == "adamw":
        # foreach kernels on CPU, fused on CUDA; both are exact AdamW.
        fused = device.type == "cuda"
        return torch.optim.AdamW(params, fused=fused, **kw)
    if device.type != "cuda":
        raise PeftlabError(
            f"train.optimizer={train.optimizer} needs a CUDA GPU (bitsandbytes' 8-bit and paged optimizers "
            "have no CPU implementation); use train.optimizer: adamw on the CPU"
        )
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[train.optimizer]
    return cls(params, **kw)


def lr_lambda(kind: str, warmup: int, total: int, start: str = "update"):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based; applied after step s).

    Warmup ``start`` (``train.warmup_start``): ``update`` — step s of the warmup runs at (s+1)/warmup, so the first
    step already moves the weights; ``zero`` — s/warmup, the first step at lr 0 (Adam's moments see one gradient
    before any update), as transformers' ``get_*_schedule_with_warmup`` and so TRL, Axolotl, Unsloth and torchtune
    do. After the warmup both are the same schedule. The difference is one warmup step's worth of updates, enough to
    send a sensitive run elsewhere (README, "KTO against TRL end to end")."""
    if start not in ("update", "zero"):
        raise ValueError(f"warmup start {start!r}: expected 'update' or 'zero'")
    offset = 1 if start == "update" else 0

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + offset) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def warmup_steps(train: Any, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * total_steps)


def lr_schedule(train: Any, total_steps: int):
    """The recipe's lr multiplier per optimizer step (``train.scheduler``, warmup steps/ratio and start): the one
    schedule of both engines."""
    return lr_lambda(train.scheduler, warmup_steps(train, total_steps), total_steps,
                     train.warmup_start)


class LocalEngine:
    """One process, one device: plain PyTorch autograd + optimizer (an :class:`~peftlab.engine.interface.Engine`)."""

    def __init__(self, model: nn.Module, train: Any, total_steps: int, device: torch.device,
                 param_groups: list[dict[str, Any]] | None = None):
        """``param_groups`` (peftlab.adapters.freezing.optimizer_param_groups): per-group learning rates (LoRA+,
        unfrozen modules), each with ``lr_scale`` = its lr / train.lr; None: one group at train.lr."""
        self.model = model
        self.train = train
        # Mixed-precision loss scaling (fp16) would live here; fp32/bf16 training needs none. Checkpoints
        # save and restore it whenever it is set.
        self.scaler: torch.amp.GradScaler | None = None
        self.params = trainable_parameters(model)
        self.optimizer = build_optimizer(param_groups if param_groups else self.params, train, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(train, total_steps))
        self.max_grad_norm = train.max_grad_norm
        # train.host_allocator: auto on the CPU — the heap's free pages go back after each micro-batch's backward
        # (peftlab/engine/hostmem.py), so one micro-batch's fragmentation is not carried into the next
        self.release_host = device.type == "cpu" and getattr(train, "host_allocator", "default") == "auto"

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        """Nothing process-wide to undo."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.release_host:
            release_if_worthwhile()

    def step(self, *, skip: bool = False) -> StepResult:
        """Clip and apply the accumulated gradients — unless their norm is not finite or the caller says
        ``skip`` (a non-finite loss): then the update is dropped (weights and optimizer moments untouched),
        the schedule still advances, and the result says ``skipped``."""
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        if not grads:
            norm_f = 0.0
        elif self.max_grad_norm is not None and not skip:
            norm_f = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm_f = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        skipped = skip or not math.isfinite(norm_f)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm_f, skipped)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimizer moments, schedule position and loss scale from a checkpoint.

        The hyperparameters come from the *current* recipe (a resumed run may lower ``train.lr`` after a
        loss spike, or extend ``max_steps``): the learning rate is recomputed exactly as the scheduler
        would — peak lr x schedule(step) — so an unchanged recipe continues bit for bit.
        """
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        t = self.train
        self.scheduler.base_lrs = [t.lr * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        for group, lam, base_lr in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas,
                                       self.scheduler.base_lrs):
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * lam(self.scheduler.last_epoch)
            for key, value in (("betas", tuple(t.betas)), ("eps", t.eps), ("weight_decay", t.weight_decay)):
                if key in group:
                    group[key] = value
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---- checkpoints and the adapter: the model holds everything; nothing is sharded ----------------------
    def checkpoint_part(self, staging: Path) -> contextlib.AbstractContextManager[dict[str, bytes]]:
        """No files of its own: ``engine.pt`` (:meth:`state_dict`) and the adapter hold this engine's state."""
        return contextlib.nullcontext({})

    def restore(self, path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Copy the checkpoint's adapter weights into the model and restore optimizer, schedule and loss scale."""
        if (path / "deepspeed").is_dir():
            raise PeftlabError(f"resume: {path} was written under DeepSpeed (it holds deepspeed/); resume it with "
                               "the same deepspeed recipe key, or start a new run")
        with torch.no_grad():
            for k, p in lora_state_dict(self.model).items():  # detached tensors sharing the parameters' storage
                p.copy_(weights[k].to(device=p.device, dtype=p.dtype))
        self.load_state_dict(state)

    def adapter_state(self, where: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(self.model).items()}

    def save_adapter(self, path: Path, *, base_model_name_or_path: str) -> None:
        if is_main_process():
            save_adapter(self.model, path, base_model_name_or_path=base_model_name_or_path)
        barrier()
