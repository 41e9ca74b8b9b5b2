"""Data statistics (peftlab/data/stats.py): padding waste as defined, totals summed over datasets, a JSON round
trip (the cache stores them), and the exact report ``peftlab data`` prints."""
from __future__ import annotations

import json

import pytest

from peftlab.data.stats import DatasetStats, DataStats, format_stats, padding_waste


def test_padding_waste():
    # batches of 2: [2, 4] pads to 2 x 4, [4, 1] to 2 x 4: 11 real tokens in 16 slots
    assert padding_waste([2, 4, 4, 1], 2) == pytest.approx(1 - 11 / 16)
    assert padding_waste([2, 4, 4, 1], 4) == pytest.approx(1 - 11 / 16)
    assert padding_waste([3, 3, 3], 2) == 0.0
    assert padding_waste([5], 8) == 0.0 and padding_waste([], 8) == 0.0


def _stats(**kw) -> DataStats:
    return DataStats(max_seq_len=128, datasets=[
        DatasetStats("alpaca", rows=100, bad_rows=2, samples=97, tokens=5000, trained_tokens=1500, truncated=3,
                     dropped=1, drawn=97, longest=300),
        DatasetStats("chat", rows=50, samples=50, tokens=2000, trained_tokens=900, truncated=1, drawn=25),
        DatasetStats("chat", split="eval", rows=10, bad_rows=1, samples=9, tokens=300, trained_tokens=100),
    ], train_samples=122, train_tokens=6000, train_trained_tokens=2100, eval_samples=9,
        padding_waste_fixed=0.5, padding_waste_dynamic=0.125, **kw)


def test_totals_are_summed_over_datasets_and_survive_json():
    stats = _stats(packed=True, packs=50, packing_efficiency=0.9375, label_map={"neg": 0, "pos": 1})
    assert (stats.bad_rows, stats.truncated, stats.dropped) == (3, 4, 1)
    d = json.loads(json.dumps(stats.to_dict()))
    assert (d["bad_rows"], d["truncated"], d["dropped"]) == (3, 4, 1)
    assert DataStats.from_dict(d) == stats


REPORT = [
    "dataset                  split     rows   bad  samples    drawn      tokens     trained  trunc   drop",
    "alpaca                   train      100     2       97       97        5000        1500      3      1",
    "chat                     train       50     0       50       25        2000         900      1      0",
    "chat                     eval        10     1        9        0         300         100      0      0",
    "",
    "train: 122 samples, 6000 tokens, 2100 trained (35.0%); eval: 9 samples; max_seq_len 128",
    "over-length: 4 truncated, 1 dropped; bad rows skipped: 3",
    "padding waste without packing: 50.0% padded to max_seq_len, 12.5% padded per batch of 8",
]


def test_the_report():
    assert format_stats(_stats()).splitlines() == REPORT
    packed = format_stats(_stats(packed=True, packs=50, packing_efficiency=0.9375, label_map={"neg": 0}))
    assert packed.endswith("\npacking: 50 packs of 128, efficiency 93.75% of slots used\nlabels: {'neg': 0}")
    assert "trained (0.0%)" in format_stats(DataStats(max_seq_len=8))  # nothing read: no division by zero
