"""``data.streaming: true`` draws the ``mixture: scale`` counts of the in-memory build (peftlab/data/streaming.py):
weight 2 = every example twice, 0.5 = half of them (exactly ``round(w * n)``, whatever the block size), the same
picks on every pass and for a seed; ``mixture: proportional`` over several streamed datasets is refused."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import extra_rows
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

SIZES = {"a": 13, "b": 11, "c": 9, "d": 7}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mix")
    for name, n in SIZES.items():
        (base / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"{name}{k} ", "completion": "ok"}) + "\n" for k in range(n)))
    return base


def _cfg(weights: dict[str, float], **settings) -> DataConfig:
    return DataConfig(train=[{"path": f"{n}.jsonl", "weight": w} for n, w in weights.items()], **settings)


WEIGHTS = {"a": 2.0, "b": 0.5, "c": 1.0, "d": 1.5}


@pytest.mark.parametrize("block", [4, 100])  # several blocks per dataset, and one
def test_streamed_counts_equal_the_in_memory_scale_mixture(files, tok, block):
    memory = build_data(_cfg(WEIGHTS), tok, seed=0, base_dir=files)
    stream = build_data(_cfg(WEIGHTS, streaming=True, shuffle_buffer=block), tok, seed=0, base_dir=files)
    rows = list(stream.train)
    counts = Counter(e["dataset"] for e in rows)
    assert counts == Counter(e["dataset"] for e in memory.train) == {0: 26, 1: 6, 2: 9, 3: 10}  # round(w * n)
    assert [d.drawn for d in stream.stats.datasets] == [26, 6, 9, 10]
    assert [d.samples for d in stream.stats.datasets] == list(SIZES.values())  # each dataset counted once
    ids = Counter(e["sample_id"] for e in rows)
    assert {ids[(0 << 32) + k] for k in range(13)} == {2} and {ids[(2 << 32) + k] for k in range(9)} == {1}
    assert sorted(ids[(3 << 32) + k] for k in range(7)) == [1, 1, 1, 1, 2, 2, 2]  # 1.5: one pass + 3 again
    assert all(ids[(1 << 32) + k] <= 1 for k in range(11))  # 0.5: distinct rows
    assert stream.stats.train_samples == len(rows) == 51


def test_the_picks_repeat_on_every_pass_and_follow_the_seed(files, tok):
    def picks(seed: int) -> tuple[list[int], list[int]]:
        stream = build_data(_cfg({"b": 0.5, "d": 1.5}, streaming=True, shuffle_buffer=4), tok, seed=seed,
                            base_dir=files)
        return [e["sample_id"] for e in stream.train], [e["sample_id"] for e in stream.train]

    first, again = picks(0)
    assert first == again  # a resumed run skips exactly what it consumed
    assert picks(0)[0] == first
    assert any(sorted(picks(seed)[0]) != sorted(first) for seed in (1, 2, 3))  # other rows drawn, not only reordered


def test_the_fraction_adds_round_w_m_over_any_prefix():
    for w in (0.5, 1.5, 2.25, 0.1, 3.7):
        steps = [extra_rows(w, m + 1) - extra_rows(w, m) for m in range(200)]
        assert set(steps) <= {0, 1}
        assert all(extra_rows(w, m) + int(w) * m == round(w * m) for m in range(200))


def test_proportional_over_several_streamed_datasets_is_refused(files, tok):
    """By the recipe (so `peftlab validate` says it), and by the stream should a config change after validation."""
    message = (r"data.mixture: proportional gives each dataset a share of the total row count, which data.streaming: "
               r"true does not know .*set data.mixture: scale .* or data.streaming: false")
    with pytest.raises(ValueError, match=message):
        _cfg({"a": 1.0, "b": 3.0}, streaming=True, mixture="proportional")
    changed = _cfg({"a": 1.0, "b": 3.0}, streaming=True)
    changed.mixture = "proportional"  # assignment is not re-validated
    with pytest.raises(PeftlabError, match=f"^{message}$"):
        build_data(changed, tok, seed=0, base_dir=files)
    one = build_data(_cfg({"b": 3.0}, streaming=True, mixture="proportional"), tok, seed=0, base_dir=files)
    assert len(list(one.train)) == 11  # one dataset: its whole size, as in memory
    with pytest.raises(PeftlabError, match="every dataset has weight 0"):
        build_data(_cfg({"a": 0.0}, streaming=True), tok, seed=0, base_dir=files)
