"""Where a run is: the loop position and counters (:class:`TrainState`), the data order (:class:`EpochSampler`;
:class:`StreamSampler` for ``data.streaming``) and the fingerprint of the training data — all a checkpoint needs to continue exactly where a run stopped —,
how indices become a batch (:class:`BatchBuilder`) and what a finished run returns (:class:`TrainResult`)."""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.data.augment import Augmenter
from peftlab.data.build import DataBundle
from peftlab.data.collate import collate
from peftlab.data.streaming import is_stream
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    micro_index: int = 0          # next micro-batch within the epoch order
    tokens_seen: int = 0          # trained tokens so far (the objective's trained_tokens; classification: input tokens)
    skipped_steps: int = 0        # steps with a non-finite loss or gradient (update not applied)
    nonfinite_streak: int = 0     # of those, how many in a row up to now
    recent_losses: list[float] = field(default_factory=list)  # loss-spike watchdog window (finite losses)
    stream_rows: list[int] = field(default_factory=list)  # data.streaming: StreamingExamples.known_rows so far
    history: list[dict[str, Any]] = field(default_factory=list)

    _SAVED = ("step", "epoch", "micro_index", "tokens_seen", "skipped_steps", "nonfinite_streak", "recent_losses",
              "stream_rows")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        # stream_rows came later: a checkpoint written before has none (a resume then tokenizes what it skips)
        return cls(**{k: d[k] for k in cls._SAVED if k in d or k != "stream_rows"})


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


class StreamSlice(EpochSlice):
    """A micro-batch drawn from a stream: its positions in the pass (what a trace records) and, in
    ``examples``, the rows themselves (a stream cannot be indexed)."""

    def __init__(self, start: int, examples: list[dict[str, Any]], epoch: int):
        super().__init__(list(range(start, start + len(examples))), epoch)
        self.examples = examples


class StreamSampler:
    """:class:`EpochSampler`'s interface over ``data.streaming`` examples: micro-batches in stream order (the
    stream shuffles within its buffer), a new pass (``iter_pass(epoch)``) when one runs out.

    The position is the same (epoch, index of the next micro-batch) in :class:`TrainState`: a resumed run reads
    the pass from its start and skips the ``micro_index x micro_batch_size`` examples already consumed (every
    micro-batch but a pass's last one is full) — counting, not tokenizing, the rows the stream knows make one
    example each (``known_rows``, kept in ``TrainState.stream_rows``). Every rank reads the whole stream and keeps
    its share of a step, as with :class:`EpochSampler`.
    """

    def __init__(self, stream: Any, micro_batch_size: int):
        self.stream, self.mbs = stream, micro_batch_size
        self._rows: Iterator[dict[str, Any]] | None = None
        self._at: tuple[int, int] | None = None  # the (epoch, micro_index) self._rows stands at

    def _micro_batch(self, state: TrainState) -> StreamSlice | None:
        """The micro-batch at ``state``'s position, None when that pass has ended (does not advance ``state``)."""
        if self._at != (state.epoch, state.micro_index):  # first call, or a resume moved the position
            known = self.stream.known_rows  # what the checkpoint's run had learned, and this one since
            known[:] = [max(a, b) for a, b in itertools.zip_longest(known, state.stream_rows, fillvalue=0)]
            self._rows = self.stream.iter_pass(state.epoch, state.micro_index * self.mbs)  # empty if it ended there
        rows = list(itertools.islice(self._rows, self.mbs))
        self._at = (state.epoch, state.micro_index + 1)
        return StreamSlice(state.micro_index * self.mbs, rows, state.epoch) if rows else None

    def next_step(self, state: TrainState, grad_accum: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This rank's micro-batches of the next optimizer step (may cross into the next pass); advances ``state``."""
        out: list[list[int]] = []
        while len(out) < grad_accum * world_size:
            micro = self._micro_batch(state)
            if micro is None:
                if state.micro_index == 0:
                    raise PeftlabError("the streamed training set is empty after tokenisation (check data.train "
                                       "and max_seq_len)")
                state.epoch, state.micro_index = state.epoch + 1, 0
                continue
            out.append(micro)
            state.micro_index += 1
        state.stream_rows = list(self.stream.known_rows)
        return out[rank::world_size]


def build_sampler(train_rows: Any, micro_batch_size: int, seed: int) -> EpochSampler | StreamSampler:
    """The sampler of a run's training rows: a seeded permutation per epoch of rows in memory, stream order for
    ``data.streaming`` (:func:`peftlab.data.streaming.is_stream`)."""
    if is_stream(train_rows):
        return StreamSampler(train_rows, micro_batch_size)
    return EpochSampler(len(train_rows), micro_batch_size, seed)


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
        drawn = getattr(indices, "examples", None)  # a StreamSlice carries its rows
        examples = list(drawn) if drawn is not None else [rows[i] for i in indices]
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
    """Content hash of the tokenized training rows: a resume onto other data is refused. A stream stands for
    its rows with its own ``fingerprint()`` (sources' content, tokenizer, data settings, seed)."""
    if is_stream(rows):
        return rows.fingerprint()
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
    n_train: int | None  # None: streamed, not counted before it is read
    objective: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, train_rows: Any, objective: Any) -> RunInputs:
        n = None if is_stream(train_rows) else len(train_rows)
        return cls(data_fingerprint(train_rows), n, input_fingerprints(objective))

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
