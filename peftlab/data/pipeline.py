"""The data pipeline's entry point: a recipe's ``data:`` section -> a :class:`~peftlab.data.build.DataBundle`.

    bundle = build_data(cfg, tokenizer, seed=0, cache_dir=..., base_dir=recipe_dir)
    batch = collate(bundle.train[:8], pad_token_id=bundle.pad_token_id)   # peftlab.data.collate

Three ways to the same bundle: ``data.streaming: true`` reads the sources lazily
(:mod:`peftlab.data.streaming`); with a ``cache_dir`` the tokenized result is cached under a key covering
the data files' content, the tokenizer and every data setting, built once across processes
(:mod:`peftlab.data.cache`); otherwise it is built in memory (:mod:`peftlab.data.build`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.data.build import DataBundle, build_bundle, open_sources
from peftlab.data.cache import cache_key, load_or_build
from peftlab.data.config import DataConfig
from peftlab.data.preference_build import build_preference_bundle
from peftlab.data.streaming import build_streaming


def build_data(cfg: DataConfig, tokenizer: Any, *, seed: int, cache_dir: Path | None = None,
               base_dir: Path | None = None) -> DataBundle:
    """Build the train/eval data of a recipe (see :mod:`peftlab.data.build` for the steps).

    ``base_dir`` is what relative ``path``s are resolved against (the recipe file's directory).
    With ``cache_dir`` the tokenized result is cached under a key covering the data files' content,
    the tokenizer and every data setting, and built once across processes; the files' digests are remembered
    there too (``file-hashes.json``), so that unchanged files are not read again to compute that key (a stream's
    fingerprint likewise).
    """
    if cfg.streaming:
        # its fingerprint() runs at every start: the digests are remembered in the cache dir
        return build_streaming(cfg, tokenizer, seed=seed, base_dir=base_dir,
                               hash_memo=None if cache_dir is None else Path(cache_dir))
    train_sources, eval_sources = open_sources(cfg, base_dir, None if cache_dir is None else Path(cache_dir))
    builder = build_bundle if cfg.preference is None else build_preference_bundle  # preference: pairs / KTO rows

    def build() -> DataBundle:
        return builder(cfg, tokenizer, seed=seed, train_sources=train_sources, eval_sources=eval_sources)

    if cache_dir is None:
        return build()
    preference = [json.dumps(cfg.preference, sort_keys=True)] if cfg.preference is not None else []
    key = cache_key(cfg, tokenizer, seed, [s.fingerprint() for s in [*train_sources, *eval_sources]] + preference)
    return load_or_build(Path(cache_dir), key, build, max_gb=cfg.cache_max_gb)
