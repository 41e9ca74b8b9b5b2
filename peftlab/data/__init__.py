"""The data pipeline: recipe ``data:`` section -> examples/packs -> batches.

Public API (what the trainer and the CLI use)::

    bundle = build_data(cfg, tokenizer, seed=0, cache_dir=..., base_dir=recipe_dir)
    batch = collate(bundle.train[:8], pad_token_id=bundle.pad_token_id)
    print(preview(bundle, tokenizer), format_stats(bundle.stats))

Module map: ``config`` (recipe schema) -> ``sources`` (files, hub, rows with locations) ->
``formats`` (canonical records) -> ``templates`` (chat rendering, trained spans) -> ``tokenize``
(ids + labels from offsets) -> ``build`` (eval split, overlength, mixture) -> ``packing`` ->
``collate``; ``cache``, ``stats``, ``preview`` and ``streaming`` around them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Imported eagerly: the submodule `preview` shares its name with the function below, and importing it
# later (lazily) would rebind the package attribute `peftlab.data.preview` to the module.
from peftlab.data import preview as _preview_module
from peftlab.data.build import DataBundle, pad_token_id_for
from peftlab.data.collate import collate
from peftlab.data.config import DataConfig, DatasetSpec
from peftlab.data.stats import DatasetStats, DataStats, format_stats

__all__ = [
    "DataBundle", "DataConfig", "DataStats", "DatasetSpec", "DatasetStats", "build_data", "collate",
    "format_stats", "pad_token_id_for", "preview",
]


def build_data(cfg: DataConfig, tokenizer: Any, *, seed: int, cache_dir: Path | None = None,
               base_dir: Path | None = None) -> DataBundle:
    """Build the train/eval data of a recipe (see :mod:`peftlab.data.build` for the steps).

    ``base_dir`` is what relative ``path``s are resolved against (the recipe file's directory).
    With ``cache_dir`` the tokenized result is cached under a key covering the data files' content,
    the tokenizer and every data setting, and built once across processes.
    """
    from peftlab.data.build import build_bundle, open_sources

    if cfg.streaming:
        from peftlab.data.streaming import build_streaming

        return build_streaming(cfg, tokenizer, seed=seed, base_dir=base_dir)
    train_sources, eval_sources = open_sources(cfg, base_dir)

    def build() -> DataBundle:
        return build_bundle(cfg, tokenizer, seed=seed, train_sources=train_sources, eval_sources=eval_sources)

    if cache_dir is None:
        return build()
    from peftlab.data.cache import cache_key, load_or_build

    key = cache_key(cfg, tokenizer, seed, [s.fingerprint() for s in [*train_sources, *eval_sources]])
    return load_or_build(Path(cache_dir), key, build)


def preview(bundle: DataBundle, tokenizer: Any, n: int = 3, *, color: bool = False) -> str:
    """The first ``n`` training items decoded, trained tokens inside ``[[...]]`` (or green with ANSI)."""
    return _preview_module.render_preview(bundle, tokenizer, n=n, color=color)
