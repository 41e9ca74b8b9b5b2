"""What ``peftlab estimate`` prints and reads: the :class:`Estimate` the planner (:mod:`peftlab.engine.planner`)
returns, its text report, the "does not fit" message that ``peftlab estimate``, ``train.auto_fit`` and the advice
after running out of memory share, and the sizes a budget is given in."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError

GiB = 1 << 30
MiB = 1 << 20


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '500MiB', '1.5T', '123456' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise PeftlabError(f"--device-memory {text!r}: expected a size such as 24GiB, 80GB or 16000MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(value * ((1024 if binary or not unit else 1000) ** power))


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 4 else f"{n / MiB:.1f} MiB"


@dataclass
class Estimate:
    """Predicted peak memory of one process (rank) of a run, by component (bytes)."""

    components: dict[str, int]
    device: str
    micro_batch_size: int
    seq_len: int
    budget: int | None = None
    per_rank: dict[str, int] = field(default_factory=dict)
    max_seq_len: int | None = None           # at the recipe's micro-batch size
    max_micro_batch_size: int | None = None  # at the recipe's max_seq_len
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {"components": self.components, "total": self.total, "device": self.device,
                "micro_batch_size": self.micro_batch_size, "seq_len": self.seq_len, "budget": self.budget,
                "fits": self.fits, "per_rank": self.per_rank, "max_seq_len": self.max_seq_len,
                "max_micro_batch_size": self.max_micro_batch_size, "notes": self.notes}


def does_not_fit_message(est: Estimate) -> str:
    hints = []
    if est.max_micro_batch_size:
        hints.append(f"train.micro_batch_size: {est.max_micro_batch_size} (raise grad_accum to keep the batch)")
    if est.max_seq_len:
        hints.append(f"data.max_seq_len: {est.max_seq_len}")
    hints.append("model.gradient_checkpointing: true, kernels: auto (fused loss), or a ZeRO config with --gpus")
    return (f"does not fit: the run needs {fmt(est.total)} on the {est.device}, the budget is {fmt(est.budget or 0)} "
            f"(short by {fmt(est.total - (est.budget or 0))}). Try " + "; or ".join(hints))


def format_estimate(est: Estimate, gpus: int = 1) -> str:
    where = "host RSS (CPU)" if est.device == "cpu" else "GPU memory"
    lines = [f"predicted peak {where} per rank, micro_batch_size={est.micro_batch_size} seq_len={est.seq_len}:"]
    for k, v in est.components.items():
        lines.append(f"  {k:<20} {fmt(v):>12}")
    lines.append(f"  {'total':<20} {fmt(est.total):>12}")
    if est.per_rank:
        lines.append(f"per rank with {gpus} rank(s):")
        lines += [f"  {k:<32} {fmt(v):>12}" for k, v in est.per_rank.items()]
    if est.budget is not None:
        lines.append(f"budget {fmt(est.budget)}: " + ("fits" if est.fits else "DOES NOT FIT"))
        lines.append(f"  largest seq_len at micro_batch_size={est.micro_batch_size}: {est.max_seq_len or 'none'}")
        lines.append(f"  largest micro_batch_size at seq_len={est.seq_len}: {est.max_micro_batch_size or 'none'}")
        if not est.fits:
            lines.append(does_not_fit_message(est))
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
