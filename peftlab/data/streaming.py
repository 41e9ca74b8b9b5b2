"""``data.streaming: true``: data larger than memory.

Nothing is materialised: ``bundle.train`` is an iterable that reads the sources lazily (JSONL and CSV
line by line, Parquet batch by batch, hub datasets with ``streaming=True``; a JSON array is one
document and is parsed whole, so convert big ones to JSONL), tokenizes in chunks, shuffles
within a buffer of ``shuffle_buffer`` examples, and (with packing) packs each buffer with best-fit
decreasing. Every ``iter()`` restarts from the beginning with the same order (deterministic for a
seed), so a resumed run can skip the examples it has already consumed. The trainer reads pass ``e`` with
``iter_pass(e)``: later passes shuffle and interleave with other seeded orders (pass 0 is ``iter()``'s), as
the in-memory sampler draws a new permutation per epoch; :meth:`StreamingExamples.fingerprint` stands for
the content a resume must find unchanged (it cannot hash rows it has not read).

A resumed run reads its pass from the start to where it stopped (``iter_pass(e, skip)``). Whole shuffle buffers
before that point are skipped without tokenizing their rows when the stream knows how many examples those rows
make: while reading, it learns per dataset a row bound below which every row made exactly one example
(:attr:`StreamingExamples.known_rows`; a row dropped as overlength or untrainable, or split, ends it), and the
checkpoint keeps it. Counting is then all a skipped buffer needs — the mixture's draws and the shuffle's random
numbers depend on counts only — and rows of the buffers that are trained are tokenized when they are reached, as
they would have been. Packed streams re-tokenize the skipped rows: how many packs a buffer makes depends on tokens.

Mixtures draw what the in-memory ``mixture: scale`` draws: a dataset of weight ``w`` is read ``floor(w)``
times in full, then once more for a fraction ``w - floor(w)`` of its examples: a seeded sample of each block of
``shuffle_buffer`` examples (so a subsampled dataset holds one block beside the shuffle buffer), sized so that
its first ``m`` examples contribute ``round(w * m)`` in all. An epoch thus holds exactly ``round(w * n)``
examples of a dataset of ``n``, as the in-memory build does (weight 2 = every example twice, 0.5 = half of them,
0 = none), the same ones on every pass. The datasets are interleaved: each next example comes from a dataset
drawn with probability proportional to its weight among those not yet drained. ``mixture: proportional`` needs
every dataset's size before the first draw and is refused when streaming more than one dataset.

The eval split holds out, among the first ``shuffle_buffer`` rows of each dataset (which bounds the memory they
take), the rows whose seeded hash falls below ``eval_split``; a row's fate does not depend on what else was read,
so train and eval never overlap. Statistics count what has been produced so far.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.data.build import (
    DataBundle,
    SourceRecord,
    encode_items,
    open_sources,
    pad_token_id_for,
    read_records,
    trained_tokens,
    unique_names,
)
from peftlab.data.cache import examples_key
from peftlab.data.config import PROPORTIONAL_STREAMING, DataConfig
from peftlab.data.packing import pack
from peftlab.data.sources import Source
from peftlab.data.stats import DatasetStats, DataStats
from peftlab.data.tokenize import Encoder
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)


def held_out(seed: int, dataset: int, row: int, fraction: float, window: int) -> bool:
    """Seeded, order-independent eval membership of one row among the first ``window`` rows."""
    if fraction <= 0 or row >= window:
        return False
    h = hashlib.blake2b(f"{seed}:{dataset}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def mixture_weights(cfg: DataConfig) -> list[float]:
    """The ``scale`` weights a stream draws with; ``proportional`` is refused unless one dataset makes it moot."""
    if cfg.mixture == "proportional" and len(cfg.train) > 1:
        raise PeftlabError(PROPORTIONAL_STREAMING)
    if all(s.weight <= 0 for s in cfg.train):
        raise PeftlabError("data.train: every dataset has weight 0; give at least one a positive weight")
    if cfg.mixture == "proportional":  # one dataset: its whole size, whatever its weight
        return [1.0]
    return [s.weight for s in cfg.train]


def extra_rows(w: float, m: int) -> int:
    """How many of the first ``m`` examples the fractional pass of weight ``w`` draws: the in-memory
    ``round(w * m)`` less the ``floor(w)`` full passes (steps of 0 or 1 as ``m`` grows, for a non-integer ``w``)."""
    return round(w * m) - math.floor(w) * m


def scale_pick(chunk: list[dict[str, Any]], w: float, start: int, rng: random.Random) -> list[dict[str, Any]]:
    """The fractional pass's picks among examples ``start .. start + len(chunk)``, in source order: as many as
    :func:`extra_rows` adds over that block, a seeded sample of it."""
    k = extra_rows(w, start + len(chunk)) - extra_rows(w, start)
    return [chunk[j] for j in sorted(rng.sample(range(len(chunk)), k))]


# The format of StreamingExamples.fingerprint. Checkpoints written while it was the data cache's key (with the cache
# format, then 1) hold exactly this value, so they keep resuming; bump it only when the same sources, tokenizer,
# settings and seed come to make other examples (a resume across that change must be refused).
STREAM_FINGERPRINT_VERSION = 1

ALL_ROWS = 1 << 32  # a known_rows bound past every row (sample ids keep a row in 32 bits)


@dataclass
class Skipping:
    """Whether a pass is still in the buffers a resume skips (its records of known count are then not encoded)."""

    active: bool


class Pending:
    """A record known to make exactly one example, not tokenized yet: a skipped buffer only counts these; a trained
    one becomes its example (:func:`realize`), the same as reading it would have made."""

    __slots__ = ("encode", "item")

    def __init__(self, item: SourceRecord, encode: Callable[[Iterable[SourceRecord]], Iterator[dict[str, Any]]]):
        self.item, self.encode = item, encode


def realize(buf: list[dict[str, Any] | Pending]) -> list[dict[str, Any]]:
    """``buf`` with its :class:`Pending` records tokenized: one encoder call per dataset (not one per row)."""
    out = list(buf)
    by_dataset: dict[Any, list[int]] = {}
    for k, ex in enumerate(buf):
        if isinstance(ex, Pending):
            by_dataset.setdefault(ex.encode, []).append(k)
    for encode, ks in by_dataset.items():
        items = [buf[k].item for k in ks]  # type: ignore[union-attr]
        made = list(encode(items))
        if [ex["sample_id"] & (ALL_ROWS - 1) for ex in made] != [it.row for it in items]:
            # unreachable while the fingerprint check keeps sources, tokenizer and settings as they were learned
            raise PeftlabError(f"{items[0].where}: rows the stream had learned make one example each made "
                               f"{len(made)} for {len(items)}; the data changed during the run. Start a fresh run")
        for k, ex in zip(ks, made):
            out[k] = ex
    return out  # type: ignore[return-value]


class StreamingExamples:
    """Iterable of examples (or packs); see the module docstring. Has no ``len``."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seed: int, sources: list[Source], names: list[str],
                 stats: DataStats):
        self.cfg, self.tok, self.seed, self.sources, self.names, self.stats = cfg, tokenizer, seed, sources, names, stats
        # per dataset: every row below this bound (that reaches tokenization) makes exactly one example; learned
        # while reading, kept in checkpoints, lets a resume count rows instead of tokenizing them
        self.known_rows = [0] * len(cfg.train)

    def _dataset_stream(self, i: int, st: DatasetStats, skipping: Skipping | None = None
                        ) -> Iterator[dict[str, Any] | Pending]:
        cfg, spec = self.cfg, self.cfg.train[i]
        key = f"data.train[{i}]"
        encoder = Encoder(self.tok, template=cfg.template, train_on=cfg.train_on, system_prompt=cfg.system_prompt)
        frac = cfg.eval_split if not cfg.eval else 0.0
        items: Iterator[SourceRecord] = (it for it in read_records(self.sources[i], spec, self.names[i], cfg, st, key)
                                         if not held_out(self.seed, i, it.row, frac, cfg.shuffle_buffer))

        def encode(records: Iterable[SourceRecord]) -> Iterator[dict[str, Any]]:
            return encode_items(records, encoder, cfg, i, spec, self.names[i], st, key, spec.format)

        while skipping is not None and skipping.active:  # checked again after every yield
            it = next(items, None)
            if it is None:
                return
            if it.row >= self.known_rows[i]:  # its count is not known: tokenize from here on
                items = itertools.chain([it], items)
                break
            yield Pending(it, encode)
        yield from self._learning(i, items, encode)

    def _learning(self, i: int, items: Iterator[SourceRecord],
                  encode: Callable[[Iterable[SourceRecord]], Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """``items`` encoded, raising ``known_rows[i]`` on the way while every row read makes one example.

        Every row before the first of ``items`` is below the bound already (the dataset's start, or rows a
        skipped buffer counted). An example of row r, with each row read before it having made one, shows every
        row below r made one; a row that made none (dropped) or a second example of the same row ends the lesson.
        """
        read: deque[int] = deque()  # rows handed to the encoder, not yet seen come out
        learning = True

        def tapped() -> Iterator[SourceRecord]:
            for it in items:
                if learning:
                    read.append(it.row)
                yield it

        last = -1
        for ex in encode(tapped()):
            if learning:
                row = ex["sample_id"] & (ALL_ROWS - 1)
                if row == last:  # a second example of one row: the bound stays below it
                    learning = False
                else:
                    front = read.popleft()  # == row, unless ``front`` made no example: the bound stops there
                    self.known_rows[i] = max(self.known_rows[i], front)
                    learning = front == row
                last = row
                if not learning:
                    read.clear()
            yield ex
        if learning:  # the dataset ended: rows still waiting made no example
            self.known_rows[i] = max(self.known_rows[i], read[0] if read else ALL_ROWS)
            read.clear()

    def _scaled_stream(self, i: int, st: DatasetStats, skipping: Skipping | None = None
                       ) -> Iterator[dict[str, Any] | Pending]:
        """Dataset ``i`` as the ``scale`` mixture draws it: ``floor(w)`` full passes, then the seeded fraction.

        Only the first pass counts in ``st`` (the dataset's rows, tokens, ... once, as in memory); ``drawn``
        counts every example yielded.
        """
        w = mixture_weights(self.cfg)[i]
        reps = math.floor(w)
        for p in range(reps):
            yield from self._dataset_stream(i, st if p == 0 else DatasetStats(st.name), skipping)
        if w == reps:
            return
        block, seen = self.cfg.shuffle_buffer, 0
        stream = self._dataset_stream(i, st if reps == 0 else DatasetStats(st.name), skipping)
        while chunk := list(itertools.islice(stream, block)):
            yield from scale_pick(chunk, w, seen, random.Random(f"scale:{self.seed}:{i}:{seen}"))
            seen += len(chunk)

    def _examples(self, epoch: int, skipping: Skipping | None = None) -> Iterator[dict[str, Any] | Pending]:
        self.stats.datasets = [DatasetStats(n) for n in self.names[:len(self.cfg.train)]]
        streams = {i: self._scaled_stream(i, st, skipping) for i, st in enumerate(self.stats.datasets)}
        weights = {i: w for i, w in enumerate(mixture_weights(self.cfg)) if w > 0}
        rng = random.Random(f"interleave:{self.seed}" + (f":{epoch}" if epoch else ""))
        while weights:
            keys = sorted(weights)
            i = rng.choices(keys, [weights[k] for k in keys])[0]
            ex = next(streams[i], None)
            if ex is None:
                del weights[i]
                continue
            self.stats.datasets[i].drawn += 1
            yield ex

    def fingerprint(self) -> str:
        """What a resume compares instead of the rows: the sources' content hashes (file bytes; a hub dataset's
        id and split), the tokenizer, every data setting and the seed (:func:`~peftlab.data.cache.examples_key` in
        :data:`STREAM_FINGERPRINT_VERSION`) — not the data cache's format, which a stream does not use."""
        return "stream-" + examples_key(self.cfg, self.tok, self.seed, [s.fingerprint() for s in self.sources],
                                        version=STREAM_FINGERPRINT_VERSION)[:16]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_pass(0)

    def iter_pass(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Pass ``epoch`` over the data, the same for a seed every time it is read (pass 0: ``iter()``), from its
        ``skip``-th example on (a resume's consumed ones; the module docstring says which are not tokenized).
        Its statistics count what was tokenized."""
        whole = skip // self.cfg.shuffle_buffer if not self.cfg.packing else 0
        return itertools.islice(self._pass(epoch, whole), skip - whole * self.cfg.shuffle_buffer, None)

    def _pass(self, epoch: int, whole: int) -> Iterator[dict[str, Any]]:
        """The pass less its first ``whole`` buffers, whose examples are drawn and shuffled (the same random
        numbers) but neither yielded nor, where their count is known, tokenized."""
        rng = random.Random(f"shuffle:{self.seed}" + (f":{epoch}" if epoch else ""))
        self.stats.train_samples = self.stats.train_tokens = self.stats.train_trained_tokens = 0  # of this pass
        self.stats.packs = 0
        skipping = Skipping(whole > 0)
        buf: list[dict[str, Any] | Pending] = []
        for ex in self._examples(epoch, skipping):
            buf.append(ex)
            if len(buf) >= self.cfg.shuffle_buffer:
                if whole:
                    whole -= 1
                    skipping.active = whole > 0
                    if self.cfg.shuffle:
                        rng.shuffle(buf)  # the numbers a shuffle draws depend on the length, not the items
                else:
                    yield from self._flush(buf, rng)
                buf = []
        if not whole:  # else the pass ended within the skipped part
            yield from self._flush(buf, rng)

    def _flush(self, pending: list[dict[str, Any] | Pending], rng: random.Random) -> list[dict[str, Any]]:
        if not pending:
            return []
        buf = realize(pending)
        if "label" in buf[0]:
            raise PeftlabError("data.streaming: classification data is not supported when streaming; "
                               "set data.streaming: false")
        self.stats.train_samples += len(buf)
        self.stats.train_tokens += sum(len(e["input_ids"]) for e in buf)
        self.stats.train_trained_tokens += sum(trained_tokens(e) for e in buf)
        if self.cfg.packing:
            buf = pack(buf, self.cfg.max_seq_len)
            self.stats.packs += len(buf)
            self.stats.packing_efficiency = self.stats.train_tokens / (self.stats.packs * self.cfg.max_seq_len)
        if self.cfg.shuffle:
            rng.shuffle(buf)
        return buf


def is_stream(rows: Any) -> bool:
    """Whether a bundle's training rows are a ``data.streaming`` stream (no ``len``, read pass by pass with
    ``iter_pass``, fingerprinted by its sources) rather than rows in memory: the one test the trainer asks."""
    return isinstance(rows, StreamingExamples)


def build_streaming(cfg: DataConfig, tokenizer: Any, *, seed: int, base_dir: Path | None = None,
                    hash_memo: Path | None = None) -> DataBundle:
    """``hash_memo``: where the sources' fingerprints remember the files' digests (the data cache dir)."""
    mixture_weights(cfg)  # a refused mixture says so before anything is read
    train_sources, eval_sources = open_sources(cfg, base_dir, hash_memo)
    names = unique_names([*cfg.train, *cfg.eval])
    stats = DataStats(max_seq_len=cfg.max_seq_len, packed=cfg.packing)
    encoder = Encoder(tokenizer, template=cfg.template, train_on=cfg.train_on, system_prompt=cfg.system_prompt)

    eval_examples: list[dict[str, Any]] = []
    eval_items: list[tuple[int, SourceRecord]] = []
    held: list[tuple[int, list[SourceRecord]]] = []
    if cfg.eval:
        for j, (spec, src) in enumerate(zip(cfg.eval, eval_sources)):
            i = len(cfg.train) + j
            est = DatasetStats(names[i], split="eval")
            held.append((i, list(read_records(src, spec, names[i], cfg, est, f"data.eval[{j}]"))))
    elif cfg.eval_split > 0:
        for i, (spec, src) in enumerate(zip(cfg.train, train_sources)):
            est = DatasetStats(names[i], split="eval")
            items: list[SourceRecord] = []
            for k, it in enumerate(read_records(src, spec, names[i], cfg, est, f"data.train[{i}]")):
                if k >= cfg.shuffle_buffer:
                    break
                if held_out(seed, i, it.row, cfg.eval_split, cfg.shuffle_buffer):
                    items.append(it)
            held.append((i, items))
    for i, items in held:
        spec = [*cfg.train, *cfg.eval][i]
        est = DatasetStats(names[i], split="eval")
        eval_examples += encode_items(items, encoder, cfg, i, spec, names[i], est, f"data[{i}]", spec.format)
        eval_items += [(i, it) for it in items]
    stats.eval_samples = len(eval_examples)
    if not cfg.eval and cfg.eval_split > 0:  # unlike in memory, where the fraction is drawn from every row
        logger.info(f"data: eval_split {cfg.eval_split:g} with streaming holds out {len(eval_examples)} eval rows among "
                    f"the first {cfg.shuffle_buffer} rows (data.shuffle_buffer) of each dataset only; every later row "
                    "is trained. For an eval set drawn from the whole data, give data.eval files")
    prompts = []
    for i, it in eval_items[:cfg.eval_prompts * 4]:
        pt = encoder.prompt_text(it.record) if it.record["kind"] in ("chat", "completion") else None
        if pt is not None and len(prompts) < cfg.eval_prompts:
            prompts.append({"prompt_ids": encoder.encode_prompt(pt[0]), "reference": pt[1], "dataset": names[i]})
    train = StreamingExamples(cfg, tokenizer, seed, train_sources, names, stats)
    return DataBundle(train=train, eval=eval_examples or None, eval_prompts=prompts,  # type: ignore[arg-type]
                      stats=stats, dataset_names=names, pad_token_id=pad_token_id_for(tokenizer))
