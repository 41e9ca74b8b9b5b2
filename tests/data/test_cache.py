"""Cache: unchanged settings reuse the entry; the template, any data setting, the data, the tokenizer
and the seed invalidate it; concurrent builders build once."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.config import DataConfig as _DC
from peftlab.data.pipeline import build_data
from peftlab.model.builtin import build_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a" * (k + 1)}]}
        for k in range(12)]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def base_cfg(path: Path, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 64)
    return DataConfig(train=[str(path)], **kw)


def test_reuse_and_result_identical(tmp_path, data):
    tok = build_tokenizer()
    cache = tmp_path / "cache"
    a = build_data(base_cfg(data), tok, seed=0, cache_dir=cache)
    b = build_data(base_cfg(data), tok, seed=0, cache_dir=cache)
    assert not a.from_cache and b.from_cache and a.cache_path == b.cache_path
    assert list(b.train) == list(a.train) and b.stats == a.stats and b.dataset_names == a.dataset_names
    assert len(list(cache.glob("data-*.pt"))) == 1


# one change per data setting (num_proc is excluded from the key: it cannot change the result)
CHANGES = {
    "template": "chatml", "train_on": "all", "max_seq_len": 32, "packing": True, "overlength": "drop",
    "on_bad_rows": "skip", "system_prompt": "S", "max_samples": 5, "eval_split": 0.25, "mixture": "proportional",
    "shuffle": False, "label_type": "class", "eval_prompts": 3, "shuffle_buffer": 7, "streaming": None,
    "train": None, "eval": None, "num_proc": None, "cache_max_gb": None,
    "preference": None,  # set from the recipe's preference: section; its own cache entry is tested with pair data in
}                        # tests/data/test_preference_build.py (pairs vs KTO rows of one file)


def test_every_setting_is_covered():
    assert set(CHANGES) == set(_DC.model_fields), "a new DataConfig field needs a case here"


@pytest.mark.parametrize("key", [k for k, v in CHANGES.items() if v is not None])
def test_any_setting_invalidates(tmp_path, data, key):
    tok = build_tokenizer()
    cache = tmp_path / "cache"
    build_data(base_cfg(data), tok, seed=0, cache_dir=cache)
    changed = build_data(base_cfg(data, **{key: CHANGES[key]}), tok, seed=0, cache_dir=cache)
    assert not changed.from_cache
    assert len(list(cache.glob("data-*.pt"))) == 2


def test_spec_data_seed_and_tokenizer_invalidate(tmp_path, data):
    tok = build_tokenizer()
    cache = tmp_path / "cache"
    build_data(base_cfg(data), tok, seed=0, cache_dir=cache)
    cfg = DataConfig(train=[{"path": str(data), "loss_weight": 2.0}], max_seq_len=64)
    assert not build_data(cfg, tok, seed=0, cache_dir=cache).from_cache
    assert not build_data(base_cfg(data), tok, seed=1, cache_dir=cache).from_cache
    tok2 = build_tokenizer()
    tok2.chat_template = tok2.chat_template.replace("<|eot_id|>", "<|end_of_text|>")
    assert not build_data(base_cfg(data), tok2, seed=0, cache_dir=cache).from_cache
    data.write_text(data.read_text() + json.dumps(ROWS[0]) + "\n")
    fresh = build_data(base_cfg(data), tok, seed=0, cache_dir=cache)
    assert not fresh.from_cache and len(fresh.train) == 13
    assert build_data(base_cfg(data), tok, seed=0, cache_dir=cache).from_cache


def _worker(args: tuple[str, str, str]) -> bool:
    data, cache, _ = args
    tok = build_tokenizer()
    return build_data(base_cfg(Path(data)), tok, seed=0, cache_dir=Path(cache)).from_cache


def test_concurrent_processes_build_once(tmp_path, data):
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        hits = pool.map(_worker, [(str(data), str(cache), str(k)) for k in range(2)], chunksize=1)
    assert sorted(hits) == [False, True]  # one built under the lock, the others loaded its file


def _dist_worker(rank: int, data: str, cache: str, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        b = build_data(base_cfg(Path(data)), build_tokenizer(), seed=0, cache_dir=Path(cache))
        Path(out, f"{rank}.json").write_text(json.dumps({"from_cache": b.from_cache, "n": len(b.train)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~10 s on 2 cores
def test_distributed_rank0_builds_others_load(tmp_path, data):
    import torch.multiprocessing as tmp_mp

    init = f"file://{tmp_path / 'pg'}"
    tmp_mp.spawn(_dist_worker, args=(str(data), str(tmp_path / "cache"), init, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got == [{"from_cache": False, "n": 12}, {"from_cache": True, "n": 12}]
