"""RNG states: captured, saved as tensors and plain values (read back weights_only), restored — every
generator a training step draws from then continues with exactly the same numbers."""
from __future__ import annotations

import random

import numpy as np
import torch

from peftlab.checkpoint.rng import capture_rng, restore_rng
from peftlab.checkpoint.store import load_torch_file, torch_bytes


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), float(np.random.rand()), float(np.random.randn()),
            torch.rand(4).tolist(), torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())


def test_restored_generators_repeat_their_numbers(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # advance every generator, including numpy's cached gaussian
    np.random.randn()
    state = capture_rng()
    want = _draws()
    path = tmp_path / "rng.pt"
    path.write_bytes(torch_bytes(state))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != want
    restore_rng(load_torch_file(path))  # through the file, as a resume reads it (weights_only)
    assert _draws() == want
    assert state["cuda"] == [] or not torch.cuda.is_available()
