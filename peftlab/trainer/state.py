"""Where a run is: the loop position and counters (:class:`TrainState`), the data order (:class:`EpochSampler`)
and the fingerprint of the training data — all a checkpoint needs to continue exactly where a run stopped —,
how indices become a batch (:class:`BatchBuilder`) and what a finished run returns (:class:`TrainResult`)."""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.data.augment import Augmenter
from peftlab.data.build import DataBundle
from peftlab.data.collate import collate
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    micro_index: int = 0          # next micro-batch within the epoch order
    tokens_seen: int = 0          # trained tokens so far (the objective's trained_tokens; classification: rows)
    skipped_steps: int = 0        # steps with a non-finite loss or gradient (update not applied)
    nonfinite_streak: int = 0     # of those, how many in a row up to now
    recent_losses: list[float] = field(default_factory=list)  # loss-spike watchdog window (finite losses)
    history: list[dict[str, Any]] = field(default_factory=list)

    _SAVED = ("step", "epoch", "micro_index", "tokens_seen", "skipped_steps", "nonfinite_streak", "recent_losses")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls._SAVED})


class EpochSlice(list):
    """A micro-batch's training-row indices (a plain list to everything else) that knows its epoch."""

    def __init__(self, indices: list[int], epoch: int):
        super().__init__(indices)
        self.epoch = epoch


class EpochSampler:
    """Micro-batches of example indices: a permutation seeded by (seed, epoch), cut into slices.

    Its position is (epoch, index of the next micro-batch) — kept in :class:`TrainState`, all a resume needs
    to continue with exactly the same data order.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int):
        if n_examples == 0:
            raise PeftlabError("the training set is empty after tokenisation (check data.train and max_seq_len)")
        self.n = n_examples
        self.mbs = micro_batch_size
        self.seed = seed

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.mbs)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return [perm[i:i + self.mbs] for i in range(0, self.n, self.mbs)]

    def next_step(self, state: TrainState, grad_accum: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This rank's micro-batches of the next optimizer step (may cross an epoch boundary); advances ``state``.

        A step takes grad_accum x world_size micro-batches of the global order; rank r trains micro-batches
        r, r + world_size, ... (one process with grad_accum x world_size sees them all).
        """
        out = []
        while len(out) < grad_accum * world_size:
            order = self.epoch_order(state.epoch)
            if state.micro_index >= len(order):
                state.epoch += 1
                state.micro_index = 0
                continue
            out.append(EpochSlice(order[state.micro_index], state.epoch))
            state.micro_index += 1
        return out[rank::world_size]


class BatchBuilder:
    """Row indices -> a collated batch on the device: ``builder(indices, split="train" | "eval")``.

    With an ``augment:`` section, train micro-batches from the sampler (an :class:`EpochSlice`) are augmented
    for their epoch (:mod:`peftlab.data.augment`); eval batches and plain index lists (e.g. an objective's
    ``prepare``) get the rows as tokenized.
    """

    def __init__(self, data: DataBundle, device: torch.device | str, attn_implementation: str = "sdpa",
                 augmenter: Augmenter | None = None):
        self.data, self.device, self.attn_implementation = data, device, attn_implementation
        self.augmenter = augmenter

    def examples(self, indices: list[int], split: str = "train") -> list[dict[str, Any]]:
        rows = self.data.train if split == "train" else self.data.eval
        examples = [rows[i] for i in indices]
        epoch = getattr(indices, "epoch", None)
        if split == "train" and self.augmenter is not None and epoch is not None:
            examples = self.augmenter.augment(examples, list(indices), epoch)
        return examples

    def __call__(self, indices: list[int], split: str = "train") -> dict[str, torch.Tensor]:
        b = collate(self.examples(indices, split), pad_token_id=self.data.pad_token_id,
                    attn_implementation=self.attn_implementation)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


# preference examples (peftlab.data.preference_rows) hold their tokens under these keys instead of input_ids/labels
PREFERENCE_KEYS = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "completion_ids",
                   "completion_labels")


def data_fingerprint(rows) -> str:
    """Content hash of the tokenized training rows: a resume onto other data is refused."""
    h = hashlib.sha256(str(len(rows)).encode())
    for row in rows:
        for key in ("input_ids", "labels", *PREFERENCE_KEYS):
            if row.get(key) is not None:
                h.update(np.asarray(row[key], dtype=np.int64).tobytes())
        if row.get("label") is not None:  # classification id or regression target (float64: 2.2 != 2.7)
            h.update(np.asarray(row["label"], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def input_fingerprints(objective: Any) -> dict[str, dict[str, Any]]:
    """``{recipe key: {"path", "rows", "fingerprint"}}`` of the data an objective reads besides data.train (its
    optional ``fingerprints()``; a DANN run's target rows), kept in every checkpoint's trainer state."""
    fingerprints = getattr(objective, "fingerprints", None)
    return fingerprints() if fingerprints is not None else {}


def check_input_fingerprints(saved_state: dict[str, Any], current: dict[str, dict[str, Any]], checkpoint: Path
                             ) -> None:
    """Refuse a resume whose objective data (see :func:`input_fingerprints`) differ from what the checkpoint was
    trained on: PeftlabError naming the recipe key, its file and the fix. A checkpoint written before these
    were kept cannot be checked: a warning says so."""
    saved = saved_state.get("input_fingerprints")
    if saved is None:
        if current:
            logger.warning(f"resume: {checkpoint} does not record the content of {', '.join(sorted(current))}; "
                           "this run cannot check that those files are unchanged since it was written")
        return
    for key, now in sorted(current.items()):
        then = saved.get(key) or {}
        if then.get("fingerprint") != now["fingerprint"]:
            raise PeftlabError(
                f"resume: the rows of {key} ({now['path']}) differ from those the checkpoint {checkpoint} was "
                f"trained on ({then.get('rows', 'no')} rows then, {now['rows']} now; fingerprint "
                f"{then.get('fingerprint')} then, {now['fingerprint']} now). Restore that file as it was, or "
                "start a fresh run (another output.dir, or no resume key)")


@dataclass
class RunInputs:
    """What a run trains on, as its checkpoints record it and a resume compares: the training rows (content
    fingerprint, count) and the data its objective reads besides them (:func:`input_fingerprints`)."""

    data_fingerprint: str
    n_train: int
    objective: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, train_rows: Any, objective: Any) -> RunInputs:
        return cls(data_fingerprint(train_rows), len(train_rows), input_fingerprints(objective))

    def saved(self) -> dict[str, Any]:
        """The keys a checkpoint's trainer state keeps."""
        return {"data_fingerprint": self.data_fingerprint, "n_train": self.n_train,
                "input_fingerprints": self.objective}

    def check(self, saved_state: dict[str, Any], checkpoint: Path) -> None:
        """Refuse to resume onto changed objective data (the training rows are checked by
        :func:`peftlab.checkpoint.resume.resume`)."""
        check_input_fingerprints(saved_state, self.objective, checkpoint)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch (packs under sdpa/eager carry a 4D mask, so not its sum)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: TrainState
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    losses: list[float]
    preempted: bool = False           # stopped by SIGTERM/SIGINT after saving a checkpoint
    checkpoint: Path | None = None    # the newest checkpoint of the run
    best: dict[str, Any] | None = None  # early stopping: best metric, step and its adapter dir (best/)
