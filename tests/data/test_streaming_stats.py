"""Statistics of streamed data count what the in-memory build counts, trained tokens included (they read 0)."""
from __future__ import annotations

import json

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.stats import format_stats
from peftlab.model.builtin import build_tokenizer


def test_a_streamed_pass_counts_the_in_memory_builds_samples_tokens_and_trained_tokens(tmp_path):
    rows = [{"instruction": f"say {k}", "input": "", "output": "ok " * (1 + k % 4)} for k in range(37)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer()

    def build(streaming: bool):
        cfg = DataConfig(train=[{"path": "t.jsonl"}], streaming=streaming, shuffle_buffer=8, max_seq_len=64)
        return build_data(cfg, tok, seed=0, base_dir=tmp_path)

    memory, stream = build(False), build(True)
    assert sum(1 for _ in stream.train) == len(memory.train)  # one full pass
    for key in ("train_samples", "train_tokens", "train_trained_tokens"):
        assert getattr(stream.stats, key) == getattr(memory.stats, key) > 0, key
    assert f"{memory.stats.train_trained_tokens} trained" in format_stats(stream.stats)
