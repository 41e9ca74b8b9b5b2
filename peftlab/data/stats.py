"""What the data pipeline produced: counts per dataset, padding waste, packing efficiency."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DatasetStats:
    """Counts for one dataset (train side unless ``split == "eval"``)."""

    name: str
    split: str = "train"
    rows: int = 0               # rows read from the source
    bad_rows: int = 0           # rows skipped by on_bad_rows: skip
    samples: int = 0            # examples produced (after overlength handling, before mixture sampling)
    tokens: int = 0
    trained_tokens: int = 0     # what the loss trains (build.trained_tokens): labels != -100; class rows: inputs
    truncated: int = 0
    dropped: int = 0            # over-length dropped, or nothing left to train on after truncation
    split_extra: int = 0        # extra examples created by overlength: split
    drawn: int = 0              # examples in the train mixture after weighting
    longest: int = 0            # tokens of the longest sample before over-length handling


@dataclass
class DataStats:
    """Everything ``format_stats`` prints; ``to_dict`` is JSON-ready for logs."""

    max_seq_len: int
    datasets: list[DatasetStats] = field(default_factory=list)
    train_samples: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    eval_samples: int = 0
    packed: bool = False
    packs: int = 0
    packing_efficiency: float | None = None       # tokens / (packs * max_seq_len)
    padding_waste_fixed: float = 0.0              # pad every sample to max_seq_len
    padding_waste_dynamic: float = 0.0            # pad to the longest in each batch, unpacked
    padding_batch_size: int = 8
    label_map: dict[str, int] | None = None

    @property
    def bad_rows(self) -> int:
        return sum(d.bad_rows for d in self.datasets)

    @property
    def truncated(self) -> int:
        return sum(d.truncated for d in self.datasets)

    @property
    def dropped(self) -> int:
        return sum(d.dropped for d in self.datasets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bad_rows=self.bad_rows, truncated=self.truncated, dropped=self.dropped)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        d = {k: v for k, v in d.items() if k not in ("bad_rows", "truncated", "dropped")}
        d["datasets"] = [DatasetStats(**x) for x in d.get("datasets", [])]
        return cls(**d)


def padding_waste(lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of slots that are padding when consecutive ``batch_size`` examples are padded together."""
    total = slots = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        total += sum(chunk)
        slots += max(chunk) * len(chunk)
    return 1.0 - total / slots if slots else 0.0


def format_stats(stats: DataStats) -> str:
    """A plain-text report for ``peftlab data RECIPE`` and the training log."""
    lines = [(f"{'dataset':<24} {'split':<5} {'rows':>8} {'bad':>5} {'samples':>8} {'drawn':>8} "
             f"{'tokens':>11} {'trained':>11} {'trunc':>6} {'drop':>6}")]
    for d in stats.datasets:
        lines.append(f"{d.name[:24]:<24} {d.split:<5} {d.rows:>8} {d.bad_rows:>5} {d.samples:>8} {d.drawn:>8} "
                     f"{d.tokens:>11} {d.trained_tokens:>11} {d.truncated:>6} {d.dropped:>6}")
    trained = stats.train_trained_tokens / stats.train_tokens if stats.train_tokens else 0.0
    lines += [
        "",
        (f"train: {stats.train_samples} samples, {stats.train_tokens} tokens, {stats.train_trained_tokens} "
        f"trained ({trained:.1%}); eval: {stats.eval_samples} samples; max_seq_len {stats.max_seq_len}"),
        f"over-length: {stats.truncated} truncated, {stats.dropped} dropped; bad rows skipped: {stats.bad_rows}",
        (f"padding waste without packing: {stats.padding_waste_fixed:.1%} padded to max_seq_len, "
        f"{stats.padding_waste_dynamic:.1%} padded per batch of {stats.padding_batch_size}"),
    ]
    if stats.packed and stats.packing_efficiency is not None:
        lines.append(f"packing: {stats.packs} packs of {stats.max_seq_len}, efficiency "
                     f"{stats.packing_efficiency:.2%} of slots used")
    if stats.label_map:
        lines.append(f"labels: {stats.label_map}")
    return "\n".join(lines)
