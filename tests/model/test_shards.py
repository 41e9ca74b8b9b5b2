"""peftlab.model.shards: checkpoints written as transformers writes them (file names, sharding, index) and read back
tensor for tensor as the safetensors library reads them; damaged or incomplete checkpoints end in one message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peftlab.errors import PeftlabError
from peftlab.model.shards import (
    INDEX_NAME,
    ShardWriter,
    checkpoint_files,
    iter_tensors,
    plan_shards,
    read_header,
    write_planned,
)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "b.weight": torch.randn(40, 8, generator=g).bfloat16(),
        "c.half": torch.randn(5, generator=g).half(),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.big": torch.randn(64, 64, generator=g),  # larger than the 2500-byte shards below: a shard of its own
        "h.last": torch.randn(3, 3, generator=g).double(),
    }


def test_planned_write_round_trips_and_reads_back_like_safetensors(tmp_path):
    sd = mixed_state_dict()
    files = write_planned(tmp_path, plan_shards(sd, 2500), sd.items())
    assert len(files) > 2 and (tmp_path / INDEX_NAME).is_file()
    got = dict(iter_tensors(tmp_path))
    assert list(got) == [k for f in checkpoint_files(tmp_path) for k in sorted(load_file(str(f)))]
    assert got.keys() == sd.keys()
    for key, value in sd.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        assert torch.equal(got[key], value), key
    for f in files:  # every file is what the safetensors library reads, with transformers' metadata
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for key in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                assert torch.equal(h.get_tensor(key), got[key])
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_plan_and_index_are_what_transformers_save_pretrained_writes(micro_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf", max_shard_size="150KB")
    sd = dict(sorted(model.state_dict().items()))  # transformers plans the state dict in key order
    files = write_planned(tmp_path / "ours", plan_shards(sd, "150KB"), sd.items())
    hf_files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(hf_files) > 3 and [f.name for f in files] == [f.name for f in hf_files]
    assert (tmp_path / "ours" / INDEX_NAME).read_text() == (tmp_path / "hf" / INDEX_NAME).read_text()
    for ours, theirs in zip(files, hf_files):
        a, b = load_file(str(ours)), load_file(str(theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model.config.save_pretrained(tmp_path / "ours")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert all(torch.equal(p, sd[k]) for k, p in loaded.state_dict().items())
    # one shard: model.safetensors and no index, as transformers writes it
    single = write_planned(tmp_path / "one", plan_shards(sd, "1GB"), sd.items())
    assert [f.name for f in single] == ["model.safetensors"] and not (tmp_path / "one" / INDEX_NAME).exists()


def test_streaming_writer_holds_one_shard_and_names_the_files_at_the_end(tmp_path):
    sd = mixed_state_dict()
    limit = 2500
    writer = ShardWriter(tmp_path, limit)
    for key, value in sd.items():
        writer.add(key, value)
    files = writer.finish()
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_parameters": sum(v.numel() for v in sd.values()),
                                 "total_size": sum(v.numel() * v.element_size() for v in sd.values())}
    largest = max(v.numel() * v.element_size() for v in sd.values())
    for f in files:
        tensors = load_file(str(f))
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= limit or len(tensors) == 1  # only a tensor larger than the limit overflows, alone
        assert all(index["weight_map"][k] == f.name for k in tensors)
    assert load_file(str(tmp_path / index["weight_map"]["g.big"])).keys() == {"g.big"}
    assert writer.peak_buffered <= limit + largest
    # in the order they were added, shard after shard
    assert [k for k, _ in iter_tensors(tmp_path)] == [k for f in files for k in sorted(load_file(str(f)))]
    assert sorted(k for k, _ in iter_tensors(tmp_path)) == sorted(sd)
    # one shard: still an index and shard names (the layout `peftlab merge` documents)
    one = ShardWriter(tmp_path / "one", 10**9)
    (tmp_path / "one").mkdir()
    one.add("x", torch.ones(2))
    assert [f.name for f in one.finish()] == ["model-00001-of-00001.safetensors"]
    assert json.loads((tmp_path / "one" / INDEX_NAME).read_text())["weight_map"] == {
        "x": "model-00001-of-00001.safetensors"}


def test_damaged_and_incomplete_checkpoints_are_refused_with_one_message(tmp_path):
    with pytest.raises(PeftlabError, match=r"has no safetensors weights .*save_pretrained\(dir, safe_serialization"):
        checkpoint_files(tmp_path)
    sd = mixed_state_dict()
    write_planned(tmp_path / "ck", plan_shards(sd, 2500), sd.items())
    shard = checkpoint_files(tmp_path / "ck")[-1]
    shard.unlink()
    with pytest.raises(PeftlabError, match=rf"{INDEX_NAME} lists {shard.name}, which is not in .*incomplete"):
        checkpoint_files(tmp_path / "ck")
    save_file({"w": torch.randn(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])
    with pytest.raises(PeftlabError, match=r"model.safetensors is truncated \(tensor w\); re-download or re-save"):
        list(iter_tensors(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(PeftlabError, match=r"is not a readable safetensors file \(header length"):
        read_header(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes((5).to_bytes(8, "little") + b"[1,2]")
    with pytest.raises(PeftlabError, match=r"not a readable safetensors file \(the header is not a JSON object\)"):
        read_header(tmp_path / "model.safetensors")


def test_an_unknown_dtype_names_the_tensor(tmp_path):
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\x00")
    with pytest.raises(PeftlabError, match=r"tensor w has dtype F4, which peftlab cannot load"):
        list(iter_tensors(Path(tmp_path)))
