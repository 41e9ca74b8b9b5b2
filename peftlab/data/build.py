"""``build_data``: recipe ``data:`` section + tokenizer -> train/eval examples ready for ``collate``.

Steps, in order (each in its own module):
sources (rows with locations) -> formats (canonical records; bad rows reported or skipped) ->
eval split (held-out fraction per dataset) -> tokenize (one string per record, labels from
character spans) -> overlength (truncate | drop | split) -> mixture (sampling weights, loss weights)
-> shuffle -> packing (best-fit decreasing) -> stats. ``cache`` wraps the whole thing.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.data.config import DataConfig, DatasetSpec
from peftlab.data.formats import BadRow, detect_format, refuse_preference_data, row_weight, to_record
from peftlab.data.packing import pack
from peftlab.data.sources import Source, UnreadableRow
from peftlab.data.stats import DatasetStats, DataStats, padding_waste
from peftlab.data.tokenize import IGNORE_INDEX, Encoded, EncodedClass, Encoder
from peftlab.errors import PeftlabError

ENCODE_CHUNK = 512  # records per tokenizer call: big enough for the Rust batch path, small for memory
IN_FLIGHT_PER_WORKER = 2  # num_proc > 1: chunks submitted ahead per worker (keeps workers busy, bounds memory)


@dataclass
class DataBundle:
    """What the trainer consumes. ``train``/``eval`` items are examples or packs (see ``collate``)."""

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]] | None
    eval_prompts: list[dict[str, Any]]
    stats: DataStats
    dataset_names: list[str]
    label_map: dict[str, int] | None = None   # classification: class name -> id
    task: str = "causal_lm"                   # "causal_lm" | "classification" | "regression"
    pad_token_id: int = 0
    from_cache: bool = False
    cache_path: str | None = None


def sample_id(dataset: int, row: int) -> int:
    """Stable id of a source row, unique across the mixture: dataset index in the high 32 bits."""
    return (dataset << 32) | row


def pad_token_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding is never a label, so sharing eos is safe)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def unique_names(specs: Sequence[DatasetSpec]) -> list[str]:
    names: list[str] = []
    for s in specs:
        base = name = s.display_name()
        k = 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


@dataclass
class SourceRecord:
    """One row of a dataset as a canonical record, with where it came from (for messages about it)."""

    row: int
    where: str
    record: dict[str, Any]
    fmt: str = "auto"  # the dataset's format (as detected), for messages about the row


def read_records(source: Source, spec: DatasetSpec, name: str, cfg: DataConfig, st: DatasetStats,
                 key: str) -> Iterator[SourceRecord]:
    """Canonical records of one dataset; bad rows raise (naming file:row and field) or are counted.

    Preference data (DPO pairs, KTO rows) is refused, whatever ``on_bad_rows`` says: it is the whole
    dataset that does not fit SFT, not a row.
    """
    fmt = spec.format
    for row in source:
        if isinstance(row.data, UnreadableRow):
            st.rows += 1
            if cfg.on_bad_rows == "skip":
                st.bad_rows += 1
                continue
            raise PeftlabError(f"{row.where}: unreadable row in dataset {name!r} ({key}): {row.data.problem}. "
                               f"{row.data.fix[0].upper()}{row.data.fix[1:]}, or set data.on_bad_rows: skip to "
                               "leave such rows out (they are counted).")
        if fmt == "auto":
            refuse_preference_data(row.data, fmt, spec.fields, row.where, name, key)  # pairs fit no format
            fmt = detect_format(row.data, spec.fields, row.where, name)
        refuse_preference_data(row.data, fmt, spec.fields, row.where, name, key)
        st.rows += 1
        try:
            rec = to_record(row.data, fmt, spec.fields)
            weight = row_weight(row.data, spec.fields)
            if weight != 1.0:  # per-row sample weight (scales the row's loss)
                rec["weight"] = weight
        except BadRow as e:
            _bad(e, row.where, name, fmt, cfg, st, key)
            continue
        yield SourceRecord(row.index, row.where, rec, fmt)
        if cfg.max_samples is not None and st.rows >= cfg.max_samples:
            break


def _bad(e: BadRow, where: str, name: str, fmt: str, cfg: DataConfig, st: DatasetStats, key: str) -> None:
    if cfg.on_bad_rows == "skip":
        st.bad_rows += 1
        return
    raise PeftlabError(
        f"{where}: bad row in dataset {name!r} ({key}, format {fmt}): field {e.field!r} {e.expected}. "
        "Fix the row, or set data.on_bad_rows: skip to leave such rows out (they are counted)."
    ) from None


def fit_length(ids: list[int], labels: list[int], cfg: DataConfig, st: DatasetStats) -> list[tuple[list[int], list[int]]]:
    """Apply ``overlength`` to one tokenized sample; pieces with nothing to train on are dropped."""
    n = cfg.max_seq_len
    st.longest = max(st.longest, len(ids))
    if len(ids) <= n:
        return [(ids, labels)]
    if cfg.overlength == "drop":
        st.dropped += 1
        return []
    if cfg.overlength == "truncate":
        st.truncated += 1
        pieces = [(ids[:n], labels[:n])]
    else:
        pieces = [(ids[i:i + n], labels[i:i + n]) for i in range(0, len(ids), n)]
    kept = [(a, b) for a, b in pieces if any(x != IGNORE_INDEX for x in b[1:])]
    if not kept:
        st.dropped += 1
    elif cfg.overlength == "split":
        st.split_extra += len(kept) - 1
    return kept


_WORKER_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(records: list[dict[str, Any]]) -> list[Encoded | EncodedClass | BadRow]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_batch(records)


def _chunks(items: Iterable[SourceRecord], size: int) -> Iterator[list[SourceRecord]]:
    chunk: list[SourceRecord] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encoded_chunks(items: Iterable[SourceRecord], encoder: Encoder, num_proc: int
                   ) -> Iterator[tuple[list[SourceRecord], list[Encoded | EncodedClass | BadRow]]]:
    """(items, encodings) chunk by chunk, in input order; ``num_proc > 1`` encodes in worker processes.

    Workers are forked where the platform allows it (the encoder, tokenizer included, is inherited,
    not pickled per task). ``items`` is read lazily, in this thread: at most ``IN_FLIGHT_PER_WORKER * num_proc``
    chunks are being encoded at a time, the next one submitted as the oldest comes back, so a stream bigger
    than memory stays a stream (``Pool.imap`` would not do: its feeder thread drains the whole input at once).
    Results come back in submission order, so the output is identical to ``num_proc: 1``.

    Input known to fit one chunk (a list or other sized collection of at most ``ENCODE_CHUNK`` items, such as the
    rows a resume's skip still holds) is encoded in this process: one chunk is one task for one worker, and starting
    ``num_proc`` processes for it costs more than encoding it. The encoding is the same either way.
    """
    if num_proc <= 1 or (isinstance(items, Sized) and len(items) <= ENCODE_CHUNK):
        for chunk in _chunks(items, ENCODE_CHUNK):
            yield chunk, encoder.encode_batch([c.record for c in chunk])
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ahead = IN_FLIGHT_PER_WORKER * num_proc
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(encoder,)) as pool:
        pending: deque[tuple[list[SourceRecord], Any]] = deque()
        for chunk in _chunks(items, ENCODE_CHUNK):
            pending.append((chunk, pool.apply_async(_encode_in_worker, ([c.record for c in chunk],))))
            if len(pending) >= ahead:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def encode_items(items: Iterable[SourceRecord], encoder: Encoder, cfg: DataConfig, ds_index: int, spec: DatasetSpec,
                 name: str, st: DatasetStats, key: str, fmt_hint: str) -> Iterator[dict[str, Any]]:
    """Tokenize records in chunks and yield examples (classification labels stay raw here)."""
    for chunk, encs in encoded_chunks(items, encoder, cfg.num_proc):
        for it, enc in zip(chunk, encs):
            if isinstance(enc, BadRow):
                _bad(enc, it.where, name, it.fmt if fmt_hint == "auto" else fmt_hint, cfg, st, key)
                continue
            base = {"sample_id": sample_id(ds_index, it.row), "dataset": ds_index,
                    "loss_weight": float(spec.loss_weight) * float(it.record.get("weight", 1.0))}
            if isinstance(enc, EncodedClass):
                ids = enc.input_ids
                st.longest = max(st.longest, len(ids))
                if len(ids) > cfg.max_seq_len:
                    if cfg.overlength == "drop":
                        st.dropped += 1
                        continue
                    st.truncated += 1
                    ids = ids[:cfg.max_seq_len]
                yield _counted({"input_ids": ids, "label": enc.label, **base}, st)
                continue
            for ids, labels in fit_length(enc.input_ids, enc.labels, cfg, st):
                yield _counted({"input_ids": ids, "labels": labels, **base}, st)


def _counted(example: dict[str, Any], st: DatasetStats) -> dict[str, Any]:
    st.samples += 1
    st.tokens += len(example["input_ids"])
    st.trained_tokens += trained_tokens(example)
    return example


def split_eval(items: list[SourceRecord], fraction: float, rng: random.Random) -> tuple[list[SourceRecord], list[SourceRecord]]:
    """(train, eval): a seeded random ``fraction`` of the rows held out, both kept in source order."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(rng.sample(range(len(items)), n_eval))
    return ([it for k, it in enumerate(items) if k not in held], [it for k, it in enumerate(items) if k in held])


def mix(parts: list[list[dict[str, Any]]], specs: Sequence[DatasetSpec], cfg: DataConfig,
        rng: random.Random) -> list[list[dict[str, Any]]]:
    """Draw each dataset's share of the mixture: whole repeats plus a seeded sample of the rest."""
    sizes = [len(p) for p in parts]
    weights = [s.weight for s in specs]
    if cfg.mixture == "scale":
        targets = [round(w * n) for w, n in zip(weights, sizes)]
    else:
        total, wsum = sum(sizes), sum(weights)
        if wsum <= 0:
            raise PeftlabError("data.train: every dataset has weight 0; give at least one a positive weight")
        targets = [round(total * w / wsum) if n else 0 for w, n in zip(weights, sizes)]
    out = []
    for p, t in zip(parts, targets):
        if t == len(p):
            out.append(list(p))
            continue
        reps, rest = divmod(t, len(p)) if p else (0, 0)
        picked = [k for _ in range(reps) for k in range(len(p))] + sorted(rng.sample(range(len(p)), rest))
        out.append([p[k] for k in picked])
    return out


def trained_tokens(example: dict[str, Any]) -> int:
    """Tokens of one example the loss trains, as the run's ``tokens_seen`` counts them: labels after the shift (the
    first token is never predicted); a classification / regression row (one ``label``): all its input tokens, which
    all feed the pooled state its loss trains (the objective counts a batch's non-padding input tokens)."""
    if "label" in example:
        return len(example["input_ids"])
    return sum(1 for x in example.get("labels", [])[1:] if x != IGNORE_INDEX)


def draw_train(parts: list[list[dict[str, Any]]], cfg: DataConfig, stats: DataStats,
               seed: int) -> list[dict[str, Any]]:
    """The training examples of the run: each dataset's share of the mixture (its count in ``stats``), then the
    seeded shuffle."""
    drawn = mix(parts, cfg.train, cfg, random.Random(f"mixture:{seed}"))
    for st, p in zip([d for d in stats.datasets if d.split == "train"], drawn):
        st.drawn = len(p)
    train = [e for p in drawn for e in p]
    if not train:
        raise PeftlabError("data.train: the mixture is empty (all weights 0?)")
    if cfg.shuffle:
        random.Random(f"shuffle:{seed}").shuffle(train)
    return train


def _class_labels(examples: list[dict[str, Any]], cfg: DataConfig) -> tuple[str, dict[str, int] | None]:
    labels = [e["label"] for e in examples]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in labels)
    if cfg.label_type == "regression" or (cfg.label_type == "auto" and numeric):
        if not numeric:
            bad = next(x for x in labels if not isinstance(x, (int, float)) or isinstance(x, bool))
            raise PeftlabError(f"data.label_type: regression needs numeric labels, found {bad!r}; "
                               "set data.label_type: class")
        for e in examples:
            e["label"] = float(e["label"])
        return "regression", None
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        label_map = {str(x): int(x) for x in sorted(set(labels))}
    else:
        label_map = {s: i for i, s in enumerate(sorted({str(x) for x in labels}))}
    for e in examples:
        e["label"] = label_map[str(e["label"])]
    return "classification", label_map


def build_bundle(cfg: DataConfig, tokenizer: Any, *, seed: int, train_sources: list[Source],
                 eval_sources: list[Source]) -> DataBundle:
    """The non-streaming pipeline (see the module docstring); ``cache`` calls it on a miss."""
    all_specs = [*cfg.train, *cfg.eval]
    names = unique_names(all_specs)
    encoder = Encoder(tokenizer, template=cfg.template, train_on=cfg.train_on, system_prompt=cfg.system_prompt)
    stats = DataStats(max_seq_len=cfg.max_seq_len, packed=cfg.packing)
    parts: list[list[dict[str, Any]]] = []
    eval_examples: list[dict[str, Any]] = []
    eval_items: list[tuple[int, SourceRecord]] = []

    for i, (spec, src) in enumerate(zip(cfg.train, train_sources)):
        key = f"data.train[{i}]"
        st = DatasetStats(names[i])
        items = list(read_records(src, spec, names[i], cfg, st, key))
        _check_nonempty(items, st, names[i], spec, key)
        train_items, held = split_eval(items, cfg.eval_split if not cfg.eval else 0.0,
                                       random.Random(f"eval-split:{seed}:{i}"))
        parts.append(list(encode_items(train_items, encoder, cfg, i, spec, names[i], st, key, spec.format)))
        if not parts[-1]:
            raise PeftlabError(f"{key} ({spec.path}): no training samples left after over-length handling "
                               f"({st.dropped} dropped): {overlength_hint(cfg, st)}")
        stats.datasets.append(st)
        if held:
            est = DatasetStats(names[i], split="eval")
            est.rows = len(held)
            eval_examples += encode_items(held, encoder, cfg, i, spec, names[i], est, key, spec.format)
            eval_items += [(i, it) for it in held]
            stats.datasets.append(est)
    for j, (spec, src) in enumerate(zip(cfg.eval, eval_sources)):
        i = len(cfg.train) + j
        key = f"data.eval[{j}]"
        est = DatasetStats(names[i], split="eval")
        items = list(read_records(src, spec, names[i], cfg, est, key))
        _check_nonempty(items, est, names[i], spec, key)
        eval_examples += encode_items(items, encoder, cfg, i, spec, names[i], est, key, spec.format)
        eval_items += [(i, it) for it in items]
        stats.datasets.append(est)

    # classification: one label space over train and eval
    kinds = {("label" in e) for p in parts for e in p[:1]}
    if len(kinds) > 1:
        raise PeftlabError("data.train: classification datasets cannot be mixed with language-modelling ones")
    task, label_map = "causal_lm", None
    if True in kinds:
        task, label_map = _class_labels([e for p in parts for e in p] + eval_examples, cfg)

    train = draw_train(parts, cfg, stats, seed)

    lengths = [len(e["input_ids"]) for e in train]
    stats.train_samples = len(train)
    stats.train_tokens = sum(lengths)
    stats.train_trained_tokens = sum(trained_tokens(e) for e in train)
    stats.padding_waste_fixed = 1.0 - stats.train_tokens / (len(train) * cfg.max_seq_len)
    stats.padding_waste_dynamic = padding_waste(lengths, stats.padding_batch_size)
    stats.eval_samples = len(eval_examples)
    stats.label_map = label_map
    if cfg.packing:
        if task != "causal_lm":
            raise PeftlabError("data.packing: packing applies to language modelling, not classification; "
                               "set data.packing: false")
        packs = pack(train, cfg.max_seq_len)
        random.Random(f"packs:{seed}").shuffle(packs)
        stats.packs = len(packs)
        stats.packing_efficiency = stats.train_tokens / (len(packs) * cfg.max_seq_len)
        train = packs

    prompts = []
    for i, it in eval_items:
        if len(prompts) >= cfg.eval_prompts:
            break
        pt = encoder.prompt_text(it.record) if it.record["kind"] in ("chat", "completion") else None
        if pt is not None:
            prompts.append({"prompt_ids": encoder.encode_prompt(pt[0]), "reference": pt[1], "dataset": names[i]})

    return DataBundle(train=train, eval=eval_examples or None, eval_prompts=prompts, stats=stats,
                      dataset_names=names, label_map=label_map, task=task,
                      pad_token_id=pad_token_id_for(tokenizer))


def overlength_hint(cfg: DataConfig, st: DatasetStats) -> str:
    """Why over-length handling left nothing, and the fix that fits the current ``data.overlength``."""
    n, longest = cfg.max_seq_len, f"the longest sample has {st.longest} tokens"
    if cfg.overlength == "drop":
        return (f"every sample is longer than data.max_seq_len ({n}) and overlength: drop leaves them out. Raise "
                f"data.max_seq_len ({longest}), or set data.overlength: truncate (keep the first max_seq_len "
                "tokens) or split (cut into pieces of max_seq_len tokens)")
    if cfg.overlength == "truncate":
        return (f"overlength: truncate keeps the first {n} tokens (data.max_seq_len) of each sample, and in these "
                "samples they hold nothing to train on (the prompt alone is longer). Raise data.max_seq_len "
                f"({longest}), shorten the prompts, or set data.overlength: split (the trained tokens are kept in "
                "later pieces, without the start of their prompt)")
    return (f"overlength: split cut the samples into pieces of {n} tokens (data.max_seq_len) and no piece holds "
            f"a trained token after its first position. Raise data.max_seq_len ({longest})")


def _check_nonempty(items: list[SourceRecord], st: DatasetStats, name: str, spec: DatasetSpec, key: str) -> None:
    if items:
        return
    if st.rows == 0:
        raise PeftlabError(f"{key}: dataset {name!r} ({spec.path}) is empty: it has no rows")
    raise PeftlabError(f"{key}: dataset {name!r} ({spec.path}): all {st.rows} rows were bad and skipped; "
                       "see data.on_bad_rows: error for the first problem")


def open_sources(cfg: DataConfig, base_dir: Path | None, hash_memo: Path | None = None
                 ) -> tuple[list[Source], list[Source]]:
    """The train and eval sources of ``cfg``; ``hash_memo`` is where their fingerprints remember the files' digest
    (the data cache directory; see :func:`peftlab.data.sources.hash_files`)."""
    return ([Source(s, base_dir, streaming=cfg.streaming, hash_memo=hash_memo) for s in cfg.train],
            [Source(s, base_dir, streaming=cfg.streaming, hash_memo=hash_memo) for s in cfg.eval])
