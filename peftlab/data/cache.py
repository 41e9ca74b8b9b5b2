"""Tokenized-data cache: build once, share with every process of the run and with later runs.

The key is a sha256 over: the cache format version, every ``data:`` setting (except ``num_proc``,
which cannot change the result), the seed, each source's content hash (file bytes, not mtimes), and
the tokenizer (its full ``tokenizer.json``, special tokens and chat template). A named template is
part of the settings; the tokenizer's own template is part of the tokenizer. The content hashes are
remembered in the cache directory (``file-hashes.json``, :func:`peftlab.data.sources.hash_files`) and
the files read again only when their size, mtime, ctime, inode or device changed.

Who builds: under ``torch.distributed`` rank 0 builds and the others wait at a barrier; otherwise
(several independent processes, e.g. test workers or a second run) an exclusive file lock
serialises builders and late comers find the finished file. Files are written through
:mod:`peftlab.checkpoint.atomic`, so a crash never leaves a half-written cache entry.

The entry is saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, which only
admits plain containers and numbers: a tampered cache file cannot execute code.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from peftlab.checkpoint.atomic import atomic_write, file_lock
from peftlab.data.build import DataBundle
from peftlab.data.config import DataConfig
from peftlab.data.stats import DataStats

# The cache entry's format: bump it when what an entry holds for the same inputs changes (its rows, its fields), so
# that older entries are missed and built again. It is part of the entry's key only: a stream's resume fingerprint
# (:meth:`peftlab.data.streaming.StreamingExamples.fingerprint`) uses :func:`examples_key` with its own version, and
# an in-memory run's hashes its rows, so a bump refuses no resume.
CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # pragma: no cover - slow tokenizers are refused by the encoder anyway
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    return h.hexdigest()


def examples_key(cfg: DataConfig, tokenizer: Any, seed: int, fingerprints: list[str], *, version: int) -> str:
    """sha256 over what defines the examples — every data setting but ``num_proc``, the seed, the sources' content
    ``fingerprints`` and the tokenizer — and ``version``: the format of what the caller keys with it."""
    settings = cfg.model_dump(mode="json", exclude={"num_proc"})
    blob = json.dumps({"version": version, "settings": settings, "seed": seed,
                       "sources": fingerprints, "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int, fingerprints: list[str]) -> str:
    """The cache entry's key: :func:`examples_key` in the entry format :data:`CACHE_VERSION`."""
    return examples_key(cfg, tokenizer, seed, fingerprints, version=CACHE_VERSION)


def _to_state(bundle: DataBundle) -> dict[str, Any]:
    state = asdict(bundle)
    state["stats"] = bundle.stats.to_dict()
    state["train"] = list(bundle.train)
    state["eval"] = list(bundle.eval) if bundle.eval is not None else None
    return state


def _from_state(state: dict[str, Any], path: Path) -> DataBundle:
    state = dict(state)
    state["stats"] = _class_trained_tokens(DataStats.from_dict(state["stats"]), state.get("task", "causal_lm"))
    state.update(from_cache=True, cache_path=str(path))
    return DataBundle(**state)


def _class_trained_tokens(stats: DataStats, task: str) -> DataStats:
    """A classification / regression entry's trained tokens are its input tokens (every row has one ``label``:
    :func:`peftlab.data.build.trained_tokens`), which the entry counts in ``tokens``. Entries written before that
    rule (commit 3e8f7eb) counted 0; setting them here repairs those exactly, where bumping :data:`CACHE_VERSION`
    would re-tokenize every cached dataset (language-modelling ones too, whose entries are right) and leave the old
    entries on disk."""
    if task in ("classification", "regression"):
        for st in stats.datasets:
            st.trained_tokens = st.tokens
        stats.train_trained_tokens = stats.train_tokens
    return stats


def _save(bundle: DataBundle, path: Path) -> None:
    state = _to_state(bundle)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load(path: Path) -> DataBundle:
    return _from_state(torch.load(path, weights_only=True), path)


def load_or_build(cache_dir: Path, key: str, build: Callable[[], DataBundle]) -> DataBundle:
    """The cached bundle for ``key``, building (once across processes) on a miss."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"data-{key[:32]}.pt"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        built = None
        if dist.get_rank() == 0 and not path.is_file():
            built = build()
            _save(built, path)
            built.cache_path = str(path)
        dist.barrier()  # everyone past here sees the finished file
        return built if built is not None else _load(path)
    if path.is_file():
        return _load(path)
    with file_lock(cache_dir / f"data-{key[:32]}.lock"):
        if path.is_file():  # another process built it while we waited
            return _load(path)
        bundle = build()
        _save(bundle, path)
    bundle.cache_path = str(path)
    return bundle
