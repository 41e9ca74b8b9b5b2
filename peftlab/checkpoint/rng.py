"""The random generators a training step draws from, saved in every checkpoint (``rng.pt``) and put back on
resume, so dropout masks and sampling continue exactly where an interrupted run stopped.

Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's. The state is
tensors and plain values only, so ``rng.pt`` is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, sampling), as tensors and plain values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (CUDA states of the devices this machine has)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning(f"checkpoint has CUDA RNG states of {len(state['cuda'])} devices, this machine has "
                           f"{torch.cuda.device_count()}; dropout masks will differ from the original run")
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
