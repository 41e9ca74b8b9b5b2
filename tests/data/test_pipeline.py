"""peftlab.data.pipeline: build_data takes the three roads to one bundle — built in memory, from the cache
(built once, then read back), streamed — and they give the same examples."""
from __future__ import annotations

import json
from pathlib import Path

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import StreamingExamples
from peftlab.model.builtin import build_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "b" * (k + 2)}]}
        for k in range(10)]


def test_in_memory_cached_and_streamed_data_are_the_same_examples(tmp_path: Path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = build_tokenizer()
    cfg = {"train": ["chat.jsonl"], "max_seq_len": 64, "shuffle": False}
    built = build_data(DataConfig(**cfg), tok, seed=0, base_dir=tmp_path)  # a relative path: from base_dir
    assert not built.from_cache and built.cache_path is None and len(built.train) == len(ROWS)
    cached = [build_data(DataConfig(**cfg), tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "c")
              for _ in range(2)]
    assert [c.from_cache for c in cached] == [False, True] and cached[0].cache_path == cached[1].cache_path
    streamed = build_data(DataConfig(**cfg, streaming=True), tok, seed=0, base_dir=tmp_path)
    assert isinstance(streamed.train, StreamingExamples) and not hasattr(streamed.train, "__len__")
    assert list(streamed.train) == list(built.train) == list(cached[1].train)
    assert streamed.pad_token_id == built.pad_token_id == tok.pad_token_id
