"""An entry written as a list of rows (before the columns) is rewritten as columns by whoever reads it and may write:
a single process whether it finds the entry at once or after waiting on the builders' lock, and rank 0 of a launched
run (the other ranks only read); a rewrite never brings back an entry removed (evicted) since it was read. Under
``torch.distributed`` only rank 0, which writes the entry, evicts."""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from peftlab.data import cache
from peftlab.data.build import DataBundle
from peftlab.data.cache import load_or_build
from peftlab.data.stats import DataStats

KEY = "0123456789abcdef" * 4
NEW_KEY = "fedcba9876543210" * 4
STALE_KEY = "a" * 64
ROWS = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "sample_id": k, "dataset": 0, "loss_weight": 1.0}
        for k in range(5)]


def bundle() -> DataBundle:
    return DataBundle(train=list(ROWS), eval=None, eval_prompts=[], stats=DataStats(max_seq_len=8, train_samples=5),
                      dataset_names=["d"])


def write_as_rows(cache_dir: Path) -> Path:
    """The entry for KEY as peftlab wrote it before the columns: a list of rows."""
    old = bundle()
    state = asdict(old)
    state["stats"] = old.stats.to_dict()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"data-{KEY[:32]}.pt"
    torch.save(state, path)
    return path


def in_columns(path: Path) -> bool:
    return isinstance(torch.load(path, weights_only=True)["train"], dict)


def never():
    raise AssertionError("rebuilt")


pytestmark = pytest.mark.usefixtures("fresh_cache_process")  # tests/data/conftest.py


def test_an_entry_found_after_waiting_on_the_lock_is_rewritten_by_the_lock_holder(tmp_path, monkeypatch):
    real_lock = cache.file_lock
    entry = tmp_path / f"data-{KEY[:32]}.pt"

    @contextlib.contextmanager
    def built_while_waiting(path):
        if Path(path).name == f"data-{KEY[:32]}.lock" and not entry.exists():
            write_as_rows(tmp_path)  # an older peftlab finished building it while this process waited on the lock
        with real_lock(path):
            yield

    monkeypatch.setattr(cache, "file_lock", built_while_waiting)
    read = load_or_build(tmp_path, KEY, never)
    assert read.from_cache and read.train == ROWS
    assert in_columns(entry)


def test_a_rewrite_does_not_bring_back_an_entry_removed_since_it_was_read(tmp_path, monkeypatch):
    entry = write_as_rows(tmp_path)
    real = cache._from_state

    def then_evicted(state, path):
        bundle = real(state, path)
        path.unlink()  # another run's eviction, between this read and the rewrite
        return bundle

    monkeypatch.setattr(cache, "_from_state", then_evicted)
    assert load_or_build(tmp_path, KEY, never).train == ROWS
    assert not entry.exists()


def _dist_worker(rank: int, cache_dir: str, init: str, out: str) -> None:
    import torch.distributed as dist

    log = logging.getLogger("peftlab.data.cache")
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(Path(out, f"{rank}.log")))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        old = load_or_build(Path(cache_dir), KEY, never)
        dist.barrier()  # rank 0's rewrite is done (it happens in its load)
        upgraded = in_columns(Path(cache_dir, f"data-{KEY[:32]}.pt"))
        new = load_or_build(Path(cache_dir), NEW_KEY, bundle, max_gb=0.0)  # rank 0 builds, evicts the stale entry
        Path(out, f"{rank}.json").write_text(json.dumps({"old": old.train == ROWS, "upgraded": upgraded,
                                                         "new": new.train == ROWS, "built": not new.from_cache}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~10 s on 2 cores
def test_launched_rank_0_rewrites_and_evicts_the_others_only_read(tmp_path):
    import torch.multiprocessing as tmp_mp

    write_as_rows(tmp_path / "cache")
    load_or_build(tmp_path / "cache", STALE_KEY, bundle)  # an earlier run's entry, not in use by the launched run
    tmp_mp.spawn(_dist_worker, args=(str(tmp_path / "cache"), f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got == [{"old": True, "upgraded": True, "new": True, "built": True},
                   {"old": True, "upgraded": True, "new": True, "built": False}]
    # the entry the run read is in use by it: kept, as the new one; the stale one goes
    assert sorted(p.name for p in (tmp_path / "cache").glob("data-*.pt")) == [f"data-{KEY[:32]}.pt",
                                                                              f"data-{NEW_KEY[:32]}.pt"]
    logs = [(tmp_path / f"{r}.log").read_text() for r in range(2)]
    assert f"removed 1 least recently used entry of {tmp_path / 'cache'} (data-{STALE_KEY[:32]}.pt)" in logs[0]
    assert "removed" not in logs[1]
