"""The offline teacher cache: top-k teacher log-probabilities per target token, written once, read by id.

``peftlab distill-cache RECIPE`` runs the teacher over the recipe's training data and writes::

    <cache_dir>/manifest.json            what the cache is for, and where each sample's rows are
    <cache_dir>/shard-00000.safetensors  logprobs (rows, k) float16|bfloat16|float32, ids (rows, k) int32
    ...

One row per *target token* (a position whose shifted label is trained), samples in data order, a
sample's rows contiguous and never split across shards. Per token that is k * (2 + 4) bytes with
float16 (384 B at k = 64) — against 2 * V bytes for a whole bf16 logit row (256 KB for Llama-3's
128k vocabulary). Log-probs are the teacher's at temperature 1, sorted descending; the training
temperature is applied later (the top-k set does not depend on it).

The manifest records the format version, the teacher (name, adapter, quantization, a hash of the
adapter weights), the vocabulary fingerprint, the head rows the ids index, k, the storage dtype, the
data fingerprint, each shard's size and sha256, and per sample id ``[shard, first row, rows, key]``
where ``key`` hashes the sample's input ids and target labels. Training (:class:`TeacherCache`)
looks rows up by the batch's ``sample_ids`` and checks each sample's key against the batch, so a
cache from other data (or another tokenisation) can never be silently applied; shards are verified
against their sha256 the first time they are opened.

Sample keys are identical whether the data is packed or not (a sample's segment in a pack has the
same tokens and, after the shift, the same targets), so one cache serves both.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from peftlab.checkpoint.atomic import atomic_directory
from peftlab.checkpoint.store import file_sha256
from peftlab.data.collate import collate
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.metrics.console import quiet_logging
from peftlab.model.load import load_tokenizer, pick_device, resolve_model_path
from peftlab.objectives.causal_lm import IGNORE_INDEX, final_hidden_states, output_head, shifted_labels
from peftlab.objectives.teacher import (
    check_same_vocab,
    default_cache_dir,
    load_teacher,
    shared_head_rows,
    teacher_label,
    teacher_quantization,
    vocab_fingerprint,
)

logger = logging.getLogger(__name__)

FORMAT = "peftlab-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOGIT_CHUNK_ELEMENTS = 2**26  # fp32 logits per chunk while caching (256 MB): rows = this // vocab


# ---- samples inside batches ----------------------------------------------------------------------


def sample_key(input_ids: np.ndarray, targets: np.ndarray) -> str:
    """Hash of one sample's tokens and its shifted labels (what the teacher saw and what is trained)."""
    h = hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def batch_segments(batch: dict[str, torch.Tensor]) -> list[list[tuple[int, int, int]]]:
    """Per batch row, its samples as ``(sample_id, start, end)`` token spans.

    Plain examples are one sample a row (its unpadded length from the 2D attention mask); packs are
    cut where ``position_ids`` restart at 0, the k-th segment being ``sample_ids[row, k]`` (padding
    after a pack is a segment of its own with id -1, and is skipped).
    """
    sids = batch.get("sample_ids")
    if sids is None:
        raise PeftlabError("distill offline mode needs the batch's sample_ids (the data pipeline adds them)")
    if batch["labels"].dim() != 2:
        raise PeftlabError("distill works on causal-LM data (token labels), not classification/regression")
    sids = sids.cpu()
    out: list[list[tuple[int, int, int]]] = []
    if sids.dim() == 1:
        mask = batch.get("attention_mask")
        length = batch["input_ids"].shape[1]
        for b in range(sids.shape[0]):
            n = int(mask[b].sum()) if mask is not None and mask.dim() == 2 else length
            out.append([(int(sids[b]), 0, n)])
        return out
    pos = batch["position_ids"].cpu()
    for b in range(sids.shape[0]):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        row = []
        for k, (s, e) in enumerate(itertools.pairwise(starts)):
            sid = int(sids[b, k]) if k < sids.shape[1] else -1
            if sid >= 0:
                row.append((sid, s, e))
        out.append(row)
    return out


def _segment_keys(batch: dict[str, torch.Tensor]) -> Iterator[tuple[int, int, int, int, str]]:
    """(row, sample_id, start, end, key) for every sample of a batch."""
    ids = batch["input_ids"].cpu().numpy()
    targets = shifted_labels(batch["labels"]).cpu().numpy()
    for b, row in enumerate(batch_segments(batch)):
        for sid, s, e in row:
            yield b, sid, s, e, sample_key(ids[b, s:e], targets[b, s:e])


# ---- building ------------------------------------------------------------------------------------


def teacher_identity(recipe: Any) -> dict[str, Any]:
    """What identifies the teacher in a manifest: its label, quantization and adapter weights' hash."""
    t = recipe.distill.teacher
    ident: dict[str, Any] = {"label": teacher_label(recipe), "revision": t.revision,
                             "quantization": teacher_quantization(recipe).model_dump(mode="json"),
                             "dtype": t.dtype or recipe.model.dtype, "adapter_sha256": None}
    if t.adapter:
        weights = recipe.resolve_path(t.adapter) / "adapter_model.safetensors"
        if weights.is_file():
            ident["adapter_sha256"] = file_sha256(weights)
    return ident


def _student_head_rows(recipe: Any) -> int | None:
    """The student's output-head rows from its config (without loading its weights)."""
    try:
        cfg = AutoConfig.from_pretrained(resolve_model_path(recipe.model.name, revision=recipe.model.revision),
                                         revision=recipe.model.revision,
                                         trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)


def build_teacher_cache(recipe: Any, *, force: bool = False, shard_mb: int = 256, batch_size: int | None = None,
                        quiet: bool = False) -> Path:
    """Run the teacher of ``recipe.distill`` over the training data and write the cache (see module doc).

    Returns the cache directory. An existing cache whose manifest matches the teacher, vocabulary,
    k, dtype and data is kept unless ``force``. The new cache is written beside the old one and
    renamed into place, so an interrupted build never leaves a half-written cache behind. ``quiet``: warnings
    only while it builds (:func:`peftlab.metrics.console.quiet_logging`; the console's level is restored after).
    """
    with quiet_logging(quiet):
        return _build_teacher_cache(recipe, force=force, shard_mb=shard_mb, batch_size=batch_size)


def _build_teacher_cache(recipe: Any, *, force: bool, shard_mb: int, batch_size: int | None) -> Path:
    d = recipe.distill
    if d is None:
        raise PeftlabError("distill-cache: the recipe has no distill section")
    if recipe.data.streaming:
        raise PeftlabError("distill-cache: data.streaming: true has no row indices for the cache to be keyed by; "
                           "set data.streaming: false (or train with distill.mode: online)")
    cache_dir = default_cache_dir(recipe)
    student_tok = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                                 trust_remote_code=recipe.model.trust_remote_code)
    data_cache = Path(os.environ.get("PEFTLAB_DATA_CACHE", recipe.output_dir / ".data-cache"))
    data = build_data(recipe.data, student_tok, seed=recipe.train.seed, cache_dir=data_cache,
                      base_dir=Path(recipe.base_dir))
    if not data.train:
        raise PeftlabError("distill-cache: the training set is empty after tokenisation")
    bs = batch_size or recipe.train.micro_batch_size
    batches = [list(range(i, min(len(data.train), i + bs))) for i in range(0, len(data.train), bs)]

    def collated(ix: list[int]) -> dict[str, torch.Tensor]:
        return collate([data.train[i] for i in ix], pad_token_id=data.pad_token_id,
                       attn_implementation=recipe.model.attn_implementation)

    keys: dict[int, str] = {}
    for ix in batches:
        for _, sid, _, _, key in _segment_keys(collated(ix)):
            if keys.setdefault(sid, key) != key:
                raise PeftlabError(f"distill-cache: sample id {sid} occurs twice with different tokens")
    data_fp = hashlib.sha256(json.dumps(sorted(keys.items())).encode()).hexdigest()[:32]
    identity = teacher_identity(recipe)
    wanted = {"teacher": identity, "vocab_fingerprint": vocab_fingerprint(student_tok), "requested_top_k": d.top_k,
              "dtype": d.cache_dtype, "data_fingerprint": data_fp}
    manifest_path = cache_dir / MANIFEST
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if {key: old.get(key) for key in wanted} == wanted and old.get("version") == VERSION:
            logger.info(f"teacher cache {cache_dir} is up to date ({old.get('rows')} rows); --force rebuilds it")
            return cache_dir

    device = pick_device(recipe.train.device)
    teacher = load_teacher(recipe, device)
    check_same_vocab(student_tok, teacher.tokenizer, student=recipe.model.name, teacher=teacher.label)
    head = output_head(teacher.model)
    rows_v = head.weight.shape[0]
    student_rows = _student_head_rows(recipe)
    if student_rows is not None:
        rows_v = shared_head_rows(torch.empty(student_rows, 0), head.weight, len(student_tok),
                                  student=recipe.model.name, teacher=teacher.label)
    k = min(d.top_k, rows_v)
    if k < d.top_k:
        logger.info(f"distill.top_k={d.top_k} is more than the {rows_v} vocabulary rows: storing all {k}")
    store = STORE_DTYPES[d.cache_dtype]
    row_bytes = k * (store.itemsize + 4)
    rows_per_shard = max(1, shard_mb * 2**20 // row_bytes)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // rows_v)
    w = head.weight[:rows_v]
    bias = head.bias[:rows_v] if head.bias is not None else None

    shards: list[dict[str, Any]] = []
    samples: dict[str, list[Any]] = {}
    buf_lp: list[torch.Tensor] = []
    buf_ids: list[torch.Tensor] = []
    buf_rows = 0

    def flush(tmp: Path) -> None:
        nonlocal buf_lp, buf_ids, buf_rows
        if not buf_rows:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({"logprobs": torch.cat(buf_lp).contiguous(), "ids": torch.cat(buf_ids).contiguous()},
                  str(tmp / name), metadata={"format": FORMAT, "version": str(VERSION)})
        shards.append({"file": name, "rows": buf_rows, "bytes": (tmp / name).stat().st_size,
                       "sha256": file_sha256(tmp / name)})
        buf_lp, buf_ids, buf_rows = [], [], 0

    t0 = time.perf_counter()
    total_rows = 0
    # Written beside the old cache (if any) and renamed into place when complete (checkpoint.atomic).
    with atomic_directory(cache_dir, overwrite=True) as tmp, torch.no_grad():
        for n_batch, ix in enumerate(batches):
            batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in collated(ix).items()}
            hidden = final_hidden_states(teacher.model, batch)
            targets = shifted_labels(batch["labels"])
            for b, sid, s, e, key in _segment_keys(batch):
                if str(sid) in samples:
                    continue  # a repeated sample (up-sampled mixture): stored once
                pos = (targets[b, s:e] != IGNORE_INDEX).nonzero().flatten() + s
                lps, idss = [], []
                for c in range(0, pos.numel(), chunk):
                    h = hidden[b, pos[c:c + chunk]]
                    logits = (h.to(w.dtype) @ w.t()).float()
                    if bias is not None:
                        logits = logits + bias.float()
                    top = torch.log_softmax(logits, -1).topk(k, dim=-1)
                    lps.append(top.values.to(store).cpu())
                    idss.append(top.indices.to(torch.int32).cpu())
                n = int(pos.numel())
                if buf_rows and buf_rows + n > rows_per_shard:
                    flush(tmp)
                samples[str(sid)] = [len(shards), buf_rows, n, key]
                if n:
                    buf_lp += lps
                    buf_ids += idss
                buf_rows += n
                total_rows += n
            if (n_batch + 1) % 50 == 0:
                logger.info(f"distill-cache: {n_batch + 1}/{len(batches)} batches, {total_rows} rows, "
                            f"{time.perf_counter() - t0:.0f}s")
        flush(tmp)
        manifest = {"format": FORMAT, "version": VERSION, **wanted, "top_k": k,
                    "vocab_rows": rows_v, "vocab_size": len(student_tok), "rows": total_rows,
                    "n_samples": len(samples), "shards": shards, "samples": samples,
                    "created_s": round(time.time())}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    size = sum(s["bytes"] for s in shards)
    logger.info(f"teacher cache: {cache_dir} ({total_rows} target tokens of {len(samples)} samples, k={k}, "
                f"{d.cache_dtype}, {len(shards)} shard(s), {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return cache_dir


# ---- reading -------------------------------------------------------------------------------------


class TeacherCache:
    """A validated teacher cache; :meth:`lookup` gives the teacher rows of a training batch."""

    def __init__(self, path: Path, manifest: dict[str, Any], top_k: int | None = None):
        self.path = path
        self.manifest = manifest
        self.k = manifest["top_k"] if top_k is None else min(top_k, manifest["top_k"])
        self.samples: dict[str, list[Any]] = manifest["samples"]
        self._open: dict[int, Any] = {}

    @classmethod
    def open(cls, path: str | Path, *, student_tokenizer: Any = None, student: str = "student",
             vocab_rows: int | None = None, top_k: int | None = None) -> TeacherCache:
        """Open and validate the cache at ``path`` against the student (vocabulary, head rows, k)."""
        path = Path(path)
        mpath = path / MANIFEST
        rerun = "run `peftlab distill-cache RECIPE` (with the training recipe) to write it"
        if not mpath.is_file():
            raise PeftlabError(f"distill.mode=offline: no teacher cache at {path} ({MANIFEST} missing); {rerun}")
        try:
            manifest = json.loads(mpath.read_text())
            ok = manifest.get("format") == FORMAT and isinstance(manifest.get("samples"), dict) and all(
                key in manifest for key in ("top_k", "shards", "vocab_fingerprint", "vocab_rows", "teacher"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise PeftlabError(f"teacher cache {mpath} is corrupt ({exc}); delete {path} and {rerun}") from None
        if not ok:
            raise PeftlabError(f"teacher cache {mpath} is corrupt or not a peftlab teacher cache; delete {path} "
                               f"and {rerun}")
        if manifest.get("version") != VERSION:
            raise PeftlabError(f"teacher cache {path} has format version {manifest.get('version')}, this peftlab "
                               f"reads version {VERSION}; {rerun}")
        teacher = manifest["teacher"].get("label", "?")
        if student_tokenizer is not None and manifest["vocab_fingerprint"] != vocab_fingerprint(student_tokenizer):
            raise PeftlabError(
                f"distill: the teacher cache {path} was written by teacher {teacher!r} with a vocabulary "
                f"({manifest.get('vocab_size')} tokens) that differs from the student model.name {student!r} "
                f"({len(student_tokenizer)} tokens). Distillation needs a shared tokenizer; use a teacher of the "
                "student's family and rerun `peftlab distill-cache`"
            )
        if vocab_rows is not None and manifest["vocab_rows"] > vocab_rows:
            raise PeftlabError(f"teacher cache {path} indexes {manifest['vocab_rows']} vocabulary rows but the "
                               f"student {student!r} head has {vocab_rows}; {rerun}")
        if top_k is not None and top_k > manifest["top_k"]:
            raise PeftlabError(f"teacher cache {path} holds top-{manifest['top_k']} teacher log-probs but "
                               f"distill.top_k={top_k}; {rerun} with this top_k")
        return cls(path, manifest, top_k)

    @property
    def teacher(self) -> str:
        return self.manifest["teacher"].get("label", "?")

    def _shard(self, i: int):
        if i not in self._open:
            shards = self.manifest["shards"]
            if not 0 <= i < len(shards):
                raise PeftlabError(f"teacher cache {self.path} is corrupt: a sample points at shard {i} of "
                                   f"{len(shards)}; rerun `peftlab distill-cache --force RECIPE`")
            info = shards[i]
            f = self.path / info["file"]
            fix = f"delete {self.path} and rerun `peftlab distill-cache RECIPE`"
            if not f.is_file():
                raise PeftlabError(f"teacher cache {self.path}: shard {info['file']} is missing; {fix}")
            if f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
                raise PeftlabError(f"teacher cache {self.path}: shard {info['file']} is corrupt (size or sha256 "
                                   f"differs from {MANIFEST}); {fix}")
            try:
                self._open[i] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise PeftlabError(f"teacher cache {self.path}: shard {info['file']} is unreadable ({exc}); "
                                   f"{fix}") from None
        return self._open[i]

    def rows(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(logprobs (n, k) fp32, ids (n, k) int64, key) of one sample."""
        entry = self.samples.get(str(sample_id))
        if entry is None:
            raise PeftlabError(
                f"teacher cache {self.path} has no rows for training sample id {sample_id}: it was written for "
                "other training data; rerun `peftlab distill-cache RECIPE`"
            )
        shard, start, n, key = entry
        if n == 0:
            empty = torch.zeros(0, self.k)
            return empty, empty.long(), key
        f = self._shard(shard)
        lp = f.get_slice("logprobs")[start:start + n][:, :self.k].float()
        ids = f.get_slice("ids")[start:start + n][:, :self.k].long()
        return lp, ids, key

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k (logprobs, ids), each (B, T, k), aligned with ``shifted_labels(batch["labels"])``.

        Positions that are not targets hold log-prob 0 / id 0 (finite; the loss ignores them). Each
        sample's key must equal the one stored: same tokens and targets as when the cache was written.
        """
        labels = shifted_labels(batch["labels"]).cpu()
        bsz, length = labels.shape
        logprobs = torch.zeros(bsz, length, self.k)
        ids = torch.zeros(bsz, length, self.k, dtype=torch.long)
        for b, sid, s, e, key in _segment_keys(batch):
            lp, ix, stored = self.rows(sid)
            if stored != key:
                raise PeftlabError(
                    f"teacher cache {self.path} does not match the training data: sample id {sid} has other "
                    "tokens or targets than when the cache was written (data, template or max_seq_len changed?); "
                    "rerun `peftlab distill-cache RECIPE`"
                )
            pos = (labels[b, s:e] != IGNORE_INDEX).nonzero().flatten() + s
            if pos.numel() != lp.shape[0]:  # cannot happen with a matching key unless the shard is damaged
                raise PeftlabError(f"teacher cache {self.path}: sample id {sid} has {lp.shape[0]} rows for "
                                   f"{pos.numel()} target tokens; rerun `peftlab distill-cache --force RECIPE`")
            logprobs[b, pos] = lp
            ids[b, pos] = ix
        return logprobs, ids
