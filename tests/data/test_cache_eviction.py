"""The data cache's size cap (``data.cache_max_gb``): a hit records the entry's use (its mtime), and after writing a new
entry the least recently used others are removed until the entries fit; the new entry and those this process uses are
kept, other tools' files are never touched, the cap is not part of the key, and a refusal is a warning."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from peftlab.data import cache
from peftlab.data.build import DataBundle
from peftlab.data.cache import load_or_build
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.stats import DataStats
from peftlab.model.builtin import build_tokenizer
from peftlab.recipe.parse import load_recipe

ROWS = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4], "sample_id": k, "dataset": 0, "loss_weight": 1.0}
        for k in range(20)]
OLD = 10**18  # an mtime (ns) long before any test runs: 2001


def key(name: str) -> str:
    """A key whose entry is ``data-<name padded with 0 to 32 hex digits>.pt``."""
    return name.ljust(32, "0") * 2


def entry(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"data-{key(name)[:32]}.pt"


def bundle() -> DataBundle:
    return DataBundle(train=list(ROWS), eval=None, eval_prompts=[], stats=DataStats(max_seq_len=8,
                      train_samples=len(ROWS)), dataset_names=["d"])


def never():
    raise AssertionError("rebuilt")


pytestmark = pytest.mark.usefixtures("fresh_cache_process")  # tests/data/conftest.py


def written_earlier(cache_dir: Path, ages: dict[str, int]) -> int:
    """Entries ``name -> last use`` (seconds after OLD), written by earlier runs (none in use by this one); the size of
    one entry (they are all the same size)."""
    for name, age in ages.items():
        load_or_build(cache_dir, key(name), bundle)
        os.utime(entry(cache_dir, name), ns=(OLD + age * 10**9, OLD + age * 10**9))
    cache._in_use.clear()
    sizes = {entry(cache_dir, name).stat().st_size for name in ages}
    assert len(sizes) == 1
    return sizes.pop()


def names(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.glob("data-*.pt")}


def test_a_hit_records_the_use(tmp_path):
    written_earlier(tmp_path, {"a": 0})
    assert entry(tmp_path, "a").stat().st_mtime_ns == OLD
    hit = load_or_build(tmp_path, key("a"), never)
    assert hit.from_cache and entry(tmp_path, "a").stat().st_mtime_ns > OLD + 10**17  # now, not 2001


def test_the_least_recently_used_go_first_and_a_hit_counts(tmp_path, caplog):
    size = written_earlier(tmp_path, {"a": 1, "b": 3, "c": 2})
    load_or_build(tmp_path, key("a"), never)  # an earlier run's hit: "a" is now the most recently used
    cache._in_use.clear()
    cap = 2.5 * size / cache.GB  # room for two entries
    with caplog.at_level(logging.INFO, logger="peftlab.data.cache"):
        new = load_or_build(tmp_path, key("d"), bundle, max_gb=cap)
    assert not new.from_cache and new.cache_path == str(entry(tmp_path, "d"))
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "ad"}  # c (2) then b (3); without the hit: a, c
    lines = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert lines == [(f"data cache: removed 2 least recently used entries of {tmp_path} ({entry(tmp_path, 'c').name}, "
                     f"{entry(tmp_path, 'b').name}), freeing {2 * size} bytes, to keep it under data.cache_max_gb="
                     f"{cap:g}")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_entries_that_fit_stay_and_hits_do_not_evict(tmp_path, caplog):
    size = written_earlier(tmp_path, {"a": 1, "b": 2})
    with caplog.at_level(logging.INFO, logger="peftlab.data.cache"):
        load_or_build(tmp_path, key("c"), bundle, max_gb=3 * size / cache.GB)
        load_or_build(tmp_path, key("a"), never, max_gb=0.0)  # a hit writes nothing: nothing is evicted
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "abc"} and "removed" not in caplog.text


def test_no_cap_removes_nothing(tmp_path):
    written_earlier(tmp_path, {"a": 1, "b": 2})
    load_or_build(tmp_path, key("c"), bundle)  # max_gb=None, data.cache_max_gb's default
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "abc"}


def test_a_cap_below_the_new_entry_keeps_it_removes_the_rest_and_warns_once(tmp_path, caplog):
    size = written_earlier(tmp_path, {"a": 1, "b": 2})
    with caplog.at_level(logging.INFO, logger="peftlab.data.cache"):
        load_or_build(tmp_path, key("c"), bundle, max_gb=0.0)
        assert names(tmp_path) == {entry(tmp_path, "c").name}
        load_or_build(tmp_path, key("d"), bundle, max_gb=0.0)  # "c" is this run's: kept too
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "cd"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [(f"data cache: in {tmp_path} the entry just written, {entry(tmp_path, 'c').name} ({size} "
                        "bytes), is more than data.cache_max_gb=0 alone: kept, and every other entry removed; raise "
                        "data.cache_max_gb to keep more than that")]


def test_an_entry_this_run_uses_is_kept_although_least_recently_used(tmp_path, caplog):
    size = written_earlier(tmp_path, {"a": 1, "b": 2})
    load_or_build(tmp_path, key("a"), never)
    os.utime(entry(tmp_path, "a"), ns=(OLD, OLD))  # the oldest entry, but this run's data
    with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"):
        load_or_build(tmp_path, key("c"), bundle, max_gb=1.5 * size / cache.GB)
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "ac"}
    assert caplog.records[0].getMessage().startswith(f"data cache: in {tmp_path} the entries this run uses take "
                                                     f"{2 * size} bytes, more than data.cache_max_gb=")


def test_other_files_in_the_directory_are_never_touched(tmp_path):
    size = written_earlier(tmp_path, {"a": 1, "b": 2})
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere.pt"
    outside.write_bytes(b"x" * 10 * size)
    foreign = {  # each old and larger than the cap: none counts, none is removed
        "file-hashes.json": b"{}", "notes.txt": b"n" * 10 * size, "data-notes.pt": b"n" * 10 * size,
        f"data-{'A' * 32}.pt": b"u" * 10 * size,  # the cache's keys are lower-case hex
        f"data-{'a' * 31}.pt": b"s" * 10 * size, f"data-{'a' * 32}.pt.bak": b"b" * 10 * size,
        f".data-{'a' * 32}.pt.tmp-123": b"t" * 10 * size, f"data-{'a' * 32}.lock": b""}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, ns=(OLD, OLD))
    (tmp_path / f"data-{'c' * 32}.pt").mkdir()  # a directory with an entry's name
    (tmp_path / f"data-{'d' * 32}.pt").symlink_to(outside)  # a link with an entry's name
    load_or_build(tmp_path, key("c"), bundle, max_gb=3 * size / cache.GB)
    assert names(tmp_path) >= {entry(tmp_path, n).name for n in "abc"}  # the three entries fit: foreign files don't count
    load_or_build(tmp_path, key("e"), bundle, max_gb=0.0)
    assert {p.name for p in tmp_path.iterdir()} == {*foreign, f"data-{'c' * 32}.pt", f"data-{'d' * 32}.pt",
                                                    entry(tmp_path, "c").name, entry(tmp_path, "e").name,
                                                    "data-cache.lock", f"data-{key('c')[:32]}.lock",
                                                    f"data-{key('e')[:32]}.lock", f"data-{key('a')[:32]}.lock",
                                                    f"data-{key('b')[:32]}.lock"}
    assert all((tmp_path / name).read_bytes() == data for name, data in foreign.items())
    assert outside.read_bytes() == b"x" * 10 * size and (tmp_path / f"data-{'d' * 32}.pt").is_symlink()


def test_a_refused_eviction_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    written_earlier(tmp_path, {"a": 1, "b": 2})
    (tmp_path / cache.DIR_LOCK).mkdir()  # the directory lock cannot be opened (root ignores a read-only mode)
    with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"):
        new = load_or_build(tmp_path, key("c"), bundle, max_gb=0.0)
        load_or_build(tmp_path, key("d"), bundle, max_gb=0.0)
    assert new.train == ROWS and new.cache_path == str(entry(tmp_path, "c"))
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "abcd"}  # nothing removed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once per directory, and not also "more than the cap"
    assert warnings[0].startswith(f"data cache: could not remove old entries of {tmp_path} to keep it under "
                                  "data.cache_max_gb=0 (Is a directory); the run goes on")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_read_only_directory_is_a_warning_and_hits_still_read(tmp_path, caplog):
    written_earlier(tmp_path, {"a": 1, "b": 2})
    tmp_path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"):
            assert cache.evict(tmp_path, entry(tmp_path, "a"), 0.0) == []
            assert load_or_build(tmp_path, key("b"), never, max_gb=0.0).train == ROWS
            assert load_or_build(tmp_path, key("c"), bundle, max_gb=0.0).train == ROWS  # built in memory
    finally:
        tmp_path.chmod(0o755)
    assert names(tmp_path) == {entry(tmp_path, n).name for n in "ab"}
    assert "could not remove old entries" in caplog.text


# --- the recipe key ---

def test_the_cap_is_a_data_key_of_the_recipe(tmp_path):
    (tmp_path / "recipe.yaml").write_text(json.dumps({"data": {"train": ["t.jsonl"], "cache_max_gb": 2.5}}))
    assert load_recipe(tmp_path / "recipe.yaml").data.cache_max_gb == 2.5
    assert DataConfig(train=["t.jsonl"]).cache_max_gb is None  # default: nothing is removed
    assert DataConfig(train=["t.jsonl"], cache_max_gb=0).cache_max_gb == 0.0
    with pytest.raises(ValidationError, match="cache_max_gb"):
        DataConfig(train=["t.jsonl"], cache_max_gb=-1)


def test_the_cap_is_not_part_of_the_key(tmp_path):
    tok = build_tokenizer()
    cfg = DataConfig(train=["t.jsonl"], max_seq_len=64)
    pinned = "26444ee1e0312acb574d049239cf0a8d75d04751100a0e6c81f30c020be3a010"  # the key before the cap existed
    assert cache.cache_key(cfg, tok, 0, ["f" * 64]) == pinned
    for cap in (0.0, 0.5, 100.0):
        capped = cfg.model_copy(update={"cache_max_gb": cap})
        assert cache.cache_key(capped, tok, 0, ["f" * 64]) == pinned
        assert cache.data_settings(capped) == cache.data_settings(cfg)  # nor of a stream's resume fingerprint


def test_a_run_with_a_cap_reads_the_entry_of_a_run_without(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a" * (k + 1)}]}
            for k in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, cfg = build_tokenizer(), DataConfig(train=["chat.jsonl"], max_seq_len=64)
    first = build_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    again = build_data(cfg.model_copy(update={"cache_max_gb": 1.0}), tok, seed=0, cache_dir=tmp_path / "cache",
                       base_dir=tmp_path)
    assert not first.from_cache and again.from_cache and again.cache_path == first.cache_path


def test_the_recipe_cap_reaches_the_cache_through_build_data(tmp_path, caplog):
    """data.cache_max_gb as a recipe sets it: a second data set built under a cap of one entry removes the first
    (an earlier run's: not in use by this one)."""
    rows = [{"messages": [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": "a" * (k + 1)}]}
            for k in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, cfg = build_tokenizer(), DataConfig(train=["chat.jsonl"], max_seq_len=64)
    first = build_data(cfg, tok, seed=0, cache_dir=tmp_path / "cache", base_dir=tmp_path)
    cache._in_use.clear()  # a later run
    first_path = Path(first.cache_path)
    one_entry_gb = first_path.stat().st_size * 1.5 / 1e9
    with caplog.at_level(logging.INFO, logger="peftlab"):
        second = build_data(cfg.model_copy(update={"max_seq_len": 32, "cache_max_gb": one_entry_gb}), tok, seed=0,
                            cache_dir=tmp_path / "cache", base_dir=tmp_path)
    assert Path(second.cache_path).is_file() and not first_path.exists()
    assert any(first_path.name in r.getMessage() for r in caplog.records)
