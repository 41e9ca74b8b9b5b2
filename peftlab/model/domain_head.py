"""The domain classifier of a DANN run (``dann:``), and its files.

A small fp32 MLP on the SAME pooled hidden state the classification head reads (pooled -> hidden -> ReLU -> one
logit: "is this row from the target domain?"), registered on the model instance (never on its class) beside the
classification head (:mod:`peftlab.model.classifier`). It trains in its own optimizer group at ``dann.head.lr``
(:func:`separate_domain_head_group`). Files, beside the classifier head and NOT in the PEFT adapter file:
``domain_head.safetensors`` (``net.0.*``, ``net.2.*``) and ``domain_head_config.json``
(:mod:`peftlab.model.head_files`). The gradient reversal between the features and this head is
:mod:`peftlab.objectives.domain_adversarial`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.model.head_files import load_module_files, save_module_files

DOMAIN_HEAD_ATTR = "peftlab_domain_head"
DOMAIN_HEAD_FILE = "domain_head.safetensors"
DOMAIN_CONFIG_FILE = "domain_head_config.json"


class DomainHead(nn.Module):
    """Pooled features (B, H) -> domain logits (B,): > 0 means "target domain"."""

    def __init__(self, hidden_size: int, width: int, *, lr: float | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width, dtype=torch.float32), nn.ReLU(),
                                 nn.Linear(width, 1, dtype=torch.float32))
        self.lr = lr  # its optimizer group's learning rate (None: train.lr)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.float()).squeeze(-1)


def attach_domain_head(model: nn.Module, hidden_size: int, width: int, *, lr: float | None) -> DomainHead:
    """Create the domain head and register it on this model instance (the engine trains it, ``model.to`` moves
    it); call after the classification head so the optimizer's parameter order stays stable."""
    head = DomainHead(hidden_size, width, lr=lr)
    model.add_module(DOMAIN_HEAD_ATTR, head.to(next(model.parameters()).device))
    return head


def domain_head_of(model: nn.Module) -> DomainHead:
    head = getattr(model, DOMAIN_HEAD_ATTR, None)
    if head is None:
        raise PeftlabError("this model has no domain head (the recipe has no dann section)")
    return head


def separate_domain_head_group(model: nn.Module, groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """The optimizer groups with the domain head's parameters moved into a group of their own at its learning
    rate (``lr_scale`` = its lr / ``lr``, so the run's schedule applies to it too); unchanged without one."""
    head = getattr(model, DOMAIN_HEAD_ATTR, None)
    if head is None:
        return groups
    ids = {id(p) for p in head.parameters()}
    out = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    head_lr = head.lr or lr
    out.append({"params": list(head.parameters()), "lr": head_lr, "lr_scale": head_lr / lr, "name": "domain_head"})
    return [g for g in out if g["params"]]


def save_domain_head(model: nn.Module, adapter_dir: Path) -> None:
    """Write the domain head's weights and config beside the adapter (each file atomically)."""
    head = domain_head_of(model)
    first = head.net[0]
    cfg = {"hidden_size": first.in_features, "width": first.out_features, "lr": head.lr}
    save_module_files(head, adapter_dir, weights_file=DOMAIN_HEAD_FILE, config_file=DOMAIN_CONFIG_FILE, config=cfg)


def load_domain_head(model: nn.Module, adapter_dir: Path, device: torch.device) -> DomainHead:
    """Rebuild the head written by :func:`save_domain_head` and register it on ``model``."""
    return load_module_files(model, adapter_dir, attr=DOMAIN_HEAD_ATTR, weights_file=DOMAIN_HEAD_FILE,
                             config_file=DOMAIN_CONFIG_FILE, device=device, what="DANN domain head",
                             build=lambda cfg: DomainHead(cfg["hidden_size"], cfg["width"], lr=cfg.get("lr")))
