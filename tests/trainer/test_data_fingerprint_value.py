"""The in-memory data fingerprint is the value checkpoints already hold: a resume compares it as a string
(peftlab.checkpoint.resume), so a faster way to compute it must give the same digest for the same rows."""
from __future__ import annotations

import hashlib

import numpy as np

from peftlab.trainer.state import data_fingerprint

LM = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "sample_id": 0, "loss_weight": 1.0},
      {"input_ids": [4, 5], "labels": [-100, 5]}]
PAIR = [{"prompt_ids": [1, 2], "chosen_ids": [3], "chosen_labels": [3], "rejected_ids": [4], "rejected_labels": [4]}]
CLASS = [{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 2.5}]


def test_the_fingerprint_checkpoints_hold():
    # computed by the implementation that wrote the checkpoints so far (np.asarray per row and key)
    assert data_fingerprint(LM) == "766dbd748fcff9e8"
    assert data_fingerprint(PAIR) == "789bc261745877d8"
    assert data_fingerprint(CLASS) == "1ea0fa547b1b6164"


def test_its_definition():
    """sha256 over the row count, then per row its token lists in a fixed key order as int64 and a class / regression
    label as float64; the first 16 hex digits."""
    h = hashlib.sha256(b"2")
    h.update(np.array([1, 2], dtype=np.int64).tobytes() + np.float64(1).tobytes())
    h.update(np.array([3], dtype=np.int64).tobytes() + np.float64(2.5).tobytes())
    assert data_fingerprint(CLASS) == h.hexdigest()[:16]
    assert data_fingerprint([{k: tuple(v) for k, v in r.items() if isinstance(v, list)} for r in LM]) \
        == data_fingerprint(LM)  # sequences of any kind, not only lists
