"""Safetensors checkpoints, read and written in one place.

A model directory holds ``model.safetensors``, or shards ``model-0000i-of-0000N.safetensors`` listed in
``model.safetensors.index.json`` — the names transformers reads and writes.

Reading (the streaming 4-bit loader, the merge, the GGUF export): :func:`checkpoint_files` finds the files,
:func:`read_header` reads a file's header (names, dtypes, shapes, offsets: no tensor data) and
:func:`iter_tensors` yields every tensor one at a time, each read at its offset into an owned buffer.

Writing: :func:`plan_shards` splits a state dict whose tensors are known up front with huggingface_hub's
``split_torch_state_dict_into_shards`` (what transformers' ``save_pretrained`` does) and :func:`write_planned`
writes the files of such a plan while the tensors arrive one at a time; :class:`ShardWriter` decides the shards
while it streams (the merge). Every file is written through :mod:`peftlab.checkpoint.atomic`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab.checkpoint.atomic import atomic_write, atomic_write_text
from peftlab.errors import PeftlabError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"  # transformers' pattern: suffix "" or "-0000i-of-0000N"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; a larger length is a damaged file

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8),
        ("U64", getattr(torch, "uint64", None)), ("U32", getattr(torch, "uint32", None)),
        ("U16", getattr(torch, "uint16", None)), ("U8", torch.uint8), ("BOOL", torch.bool),
    ) if dtype is not None
}


# --------------------------------------------------------------------------------------------------
# reading


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (1-based) of ``count``, as transformers names it."""
    return FILENAME_PATTERN.format(suffix=f"-{index:05d}-of-{count:05d}")


def checkpoint_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a model directory: the shards in the order the index first names them, else
    ``model.safetensors``, else every ``*.safetensors`` file by name."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise PeftlabError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); re-save or "
                               "re-download the checkpoint") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PeftlabError(f"{index} lists {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                               f"not in {model_dir}; the checkpoint is incomplete (copy or download every shard)")
        return files
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise PeftlabError(
        f"{model_dir} has no safetensors weights ({WEIGHTS_NAME}, or shards listed in {INDEX_NAME}); peftlab "
        "reads safetensors checkpoints only. Convert the checkpoint once, where you trust it: load it with "
        "transformers and save_pretrained(dir, safe_serialization=True)."
    )


def read_header(file: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the tensor entries) of a safetensors file: an 8-byte little-endian length and
    a JSON header mapping each name to its ``dtype``, ``shape`` and ``data_offsets`` (``__metadata__`` dropped)."""
    file = Path(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= MAX_HEADER_BYTES else b""
    problem = None
    if not 0 < n <= MAX_HEADER_BYTES:
        problem = f"header length {n}"
    elif len(raw) != n:
        problem = "the header is cut short"
    else:
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            header, problem = None, str(exc)
        if problem is None and not isinstance(header, dict):
            problem = "the header is not a JSON object"
    if problem is not None:
        raise PeftlabError(f"{file} is not a readable safetensors file ({problem}); re-save or re-download the "
                           "checkpoint")
    header.pop("__metadata__", None)
    return 8 + n, header


def _torch_dtype(file: Path, key: str, name: str) -> torch.dtype:
    """The torch dtype of a header's dtype name."""
    dtype = SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise PeftlabError(f"{file}: tensor {key} has dtype {name}, which peftlab cannot load")
    return dtype


def iter_tensors(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every tensor of a checkpoint, one at a time: files in :func:`checkpoint_files` order,
    names sorted within a file (the order ``safe_open(...).keys()`` gives).

    Tensors are read with plain ``readinto`` at the offsets of the safetensors header rather than through
    ``safe_open``'s memory map: pages of a mapped file count in the resident set while the map is open, and
    with the kernel's fault-around a "one tensor" read maps more than that tensor (measured on a 300 MB bf16
    checkpoint: load growth 241-253 MB through safe_open, 206 MB with these reads; see
    tests/model/test_quantized_load.py). Each tensor is an owned buffer, freed as soon as the caller drops it.
    """
    for file in checkpoint_files(model_dir):
        data_start, header = read_header(file)
        with open(file, "rb") as f:
            for key in sorted(header):
                meta = header[key]
                dtype = _torch_dtype(file, key, meta["dtype"])
                begin, end = meta["data_offsets"]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise PeftlabError(f"{file} is truncated (tensor {key}); re-download or re-save the checkpoint")
                yield key, buf.view(dtype).reshape(meta["shape"])
                del buf


# --------------------------------------------------------------------------------------------------
# writing


def write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    """One safetensors file, atomically, with transformers' ``{"format": "pt"}`` metadata."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def write_index(out_dir: Path, weight_map: dict[str, str], *, total_size: int, total_parameters: int) -> Path:
    """``model.safetensors.index.json`` as transformers writes it (sorted keys, two-space indent)."""
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": weight_map}
    return atomic_write_text(out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def plan_shards(state_dict: dict[str, Tensor], max_shard_size: int | str):
    """The files of ``state_dict`` (tensors, or meta tensors of the right shapes and dtypes) split at
    ``max_shard_size`` bytes: huggingface_hub's ``split_torch_state_dict_into_shards`` with transformers'
    file names, so the result is laid out as ``save_pretrained`` lays it out (a ``StateDictSplit``)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    return split_torch_state_dict_into_shards(state_dict, filename_pattern=FILENAME_PATTERN,
                                              max_shard_size=max_shard_size)


def write_planned(out_dir: str | os.PathLike[str], plan: Any, tensors: Iterable[tuple[str, Tensor]]) -> list[Path]:
    """Write the files of ``plan`` (:func:`plan_shards`) into ``out_dir`` while ``tensors`` arrive one at a time:
    a file is written as soon as its last tensor has arrived, so with tensors in the plan's order at most one
    shard (plus one tensor larger than a shard) is held. The index is written when there are several files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending = {name: set(keys) for name, keys in plan.filename_to_tensors.items()}
    held: dict[str, dict[str, Tensor]] = {}
    written: list[Path] = []
    parameters = 0
    for key, tensor in tensors:
        name = plan.tensor_to_filename.get(key)
        if name is None:
            raise ValueError(f"tensor {key!r} is not in the shard plan")
        held.setdefault(name, {})[key] = tensor.contiguous()
        parameters += tensor.numel()
        pending[name].discard(key)
        if not pending[name]:
            write_shard(out / name, held.pop(name))
            written.append(out / name)
    missing = sorted(k for keys in pending.values() for k in keys)
    if missing:
        raise ValueError(f"the shard plan has tensors that never came: {missing[:5]}")
    if plan.is_sharded:
        write_index(out, dict(plan.tensor_to_filename), total_size=plan.metadata["total_size"],
                    total_parameters=parameters)
    return sorted(written)


class ShardWriter:
    """Collects tensors that arrive one at a time into shards of at most ``max_bytes`` (a tensor larger than that
    gets a shard of its own), writing each shard as soon as the next tensor would not fit.

    Why not :func:`plan_shards` (huggingface_hub's planner): it splits a state dict that exists up front, and the
    merge produces each output tensor only while it streams the base checkpoint (read, dequantised, merged,
    cast), so the boundaries are decided here as the tensors come, holding one shard. Shards are written under
    temporary names (their count is unknown until the end) and renamed to ``model-0000i-of-0000N.safetensors``
    by :meth:`finish`, which writes the index too — also for a single shard, the layout ``peftlab merge`` has
    always written. ``out_dir`` is a directory being built (an ``atomic_directory``).
    """

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffered = 0
        self.peak_buffered = 0  # the most bytes ever held at once (what the streaming test checks)
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.parameters = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total += nbytes
        self.parameters += tensor.numel()
        self.peak_buffered = max(self.peak_buffered, self.buffered)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / f".shard-{len(self.files):05d}.tmp"
        write_shard(path, self.buffer)
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.files)
        weight_map: dict[str, str] = {}
        final = []
        for i, (tmp, names) in enumerate(self.files):
            target = self.out_dir / shard_name(i + 1, n)
            tmp.rename(target)  # a name change inside the directory being built, not a write
            final.append(target)
            weight_map.update({name: target.name for name in names})
        write_index(self.out_dir, weight_map, total_size=self.total, total_parameters=self.parameters)
        return final
