"""``peftlab export --format gguf``: a merged Llama-architecture model as one GGUF file for llama.cpp.

- ``gguf``: a merged Llama-architecture model (or an adapter plus its base, merged on the way) as one
  GGUF file for llama.cpp-family runtimes, written with the ``gguf`` Python package — tensor names
  as llama.cpp's ``convert_hf_to_gguf.py`` writes them (``token_embd``, ``blk.N.attn_q``, ...,
  ``output_norm``, ``output``), q/k rows permuted the way that script permutes them (HF Llama rotates
  halves of each head, llama.cpp rotates adjacent pairs), Llama-3.1 RoPE scaling as the ``rope_freqs``
  tensor, the tokenizer (:mod:`peftlab.export.gguf_vocab`: SentencePiece scores and token types) and the chat
  template embedded. Everything it would refuse is checked first (``check_gguf_export``; the CLI runs
  it before merging an adapter). Tensors are streamed: one is held in memory at a time.
- ``peft``: the adapter alone, validated, for PEFT / vLLM (:mod:`peftlab.export.peft`).
- ``safetensors``: the merged model as an HF directory (:mod:`peftlab.export.merge`).

``--push-to-hub REPO``: :mod:`peftlab.export.hub`.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftlab.checkpoint.atomic import atomic_write
from peftlab.errors import PeftlabError
from peftlab.model.shards import checkpoint_files, iter_tensors, read_header

FORMATS = ("gguf", "peft", "safetensors")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LLAMA_LIKE = ("llama", "mistral")  # model_types llama.cpp converts with the LLAMA architecture


# --------------------------------------------------------------------------------------------------
# GGUF


def llama_permute(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py).

    HF checkpoints order each head's rows as [first halves of the rotary pairs, second halves]
    (``rotate_half``); llama.cpp's Llama RoPE rotates adjacent rows (0,1), (2,3), ... This interleaves
    the two halves of every head so both compute the same attention.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _ggml_type(gguf: Any, name: str) -> Any:
    t = gguf.GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}[name]


def _file_type(gguf: Any, name: str) -> Any:
    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
            "q4_0": ft.MOSTLY_Q4_0}[name]


def _tensor_type(gguf: Any, gguf_name: str, shape: tuple[int, ...], requested: str) -> Any:
    """The GGML type of one tensor, as llama.cpp's converter chooses it.

    Norms and other 1-D tensors stay F32. Block-quantised types need rows divisible by the block
    size (32) and fall back to F16 otherwise. Under q4_0 the output head is kept at Q8_0 (llama.cpp's
    quantizer also keeps ``output.weight`` at higher precision: it matters most for quality).
    """
    t = gguf.GGMLQuantizationType
    if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
        return t.F32
    qtype = _ggml_type(gguf, requested)
    if requested == "q4_0" and gguf_name == "output.weight":
        qtype = t.Q8_0
    if qtype in (t.Q8_0, t.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return t.F16
    return qtype


def _convert(gguf: Any, data: np.ndarray, qtype: Any) -> np.ndarray:
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return data.astype(np.float32)
    if qtype == t.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int, notes: list[str]) -> None:
    """Tokens, scores, types, merges, special ids and chat template, as convert_hf_to_gguf writes them.

    The vocabulary (:mod:`peftlab.export.gguf_vocab`): byte-level BPE as llama.cpp's ``gpt2`` model,
    SentencePiece (``tokenizer.model``, or a tokenizer.json BPE with byte fallback / Unigram) as
    ``llama`` with SentencePiece's scores and token types. Special ids and merges come from gguf's
    ``SpecialVocab``; the chat template is the one transformers loads (``chat_template.jinja`` first).
    """
    import gguf
    from gguf.vocab import SpecialVocab

    from peftlab.export.gguf_vocab import chat_template, read_vocab

    vocab = read_vocab(model_dir, vocab_size)
    notes.extend(vocab.notes)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special = SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=vocab_size)
    special.chat_template = chat_template(model_dir)
    special.add_to_gguf(writer, quiet=True)
    if vocab.model == "gpt2" and not special.merges:
        # llama.cpp refuses a gpt2 tokenizer without a merges key; a byte-level vocabulary with no
        # merges (the built-in tokenizer) needs it present and empty.
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    if special.chat_template is None:
        notes.append("the tokenizer has no chat template; none embedded")


def _writer_class():
    """GGUFWriter that can write an empty array (gguf's writer refuses them; the GGUF format allows
    them and llama.cpp reads them) — needed for the empty merges list of a merge-free BPE vocabulary."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                header = self._pack("I", vtype) if add_vtype else b""
                return header + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return Writer


# --------------------------------------------------------------------------------------------------
# RoPE


ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters (with rope_theta inside), older versions rope_scaling
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_theta(config: dict[str, Any]) -> float:
    return float(_rope_params(config).get("rope_theta") or config.get("rope_theta") or 10000.0)


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_kind(config: dict[str, Any]) -> str:
    params = _rope_params(config)
    return params.get("rope_type") or params.get("type") or "default"


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """The ``rope_freqs`` tensor of a Llama-3.1-style (``rope_type: llama3``) model, as llama.cpp writes it.

    llama.cpp's RoPE divides each rotary pair's angle by this factor (``ggml_rope_ext``'s freq
    factors): 1 for wavelengths shorter than ``original_max_position_embeddings / high_freq_factor``,
    ``factor`` for those longer than ``original_max_position_embeddings / low_freq_factor``, and in
    between the inverse of transformers' smooth interpolation, so ``base_freq / factor_i`` is
    transformers' llama3 inverse frequency. Base frequencies in float32, as llama.cpp computes them.
    """
    params = _rope_params(config)
    missing = [k for k in LLAMA3_ROPE_KEYS if params.get(k) is None]
    if missing:
        raise PeftlabError(f"config.json: rope_type llama3 needs {', '.join(missing)} in rope_scaling / "
                           "rope_parameters; the config is incomplete")
    dim = _head_dim(config)
    factor, low, high = (float(params[k]) for k in LLAMA3_ROPE_KEYS[:3])
    old_context = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# what can be exported, checked before any work


def _convert_advice(out: Path, type: str, model: str | None, adapter: str | None, merge_flags: Sequence[str]) -> str:
    """Commands that export what peftlab's GGUF writer does not cover, with llama.cpp's own converter
    (``convert_hf_to_gguf.py`` writes f32/f16/bf16/q8_0; other types go through ``llama-quantize``)."""
    outtype = type if type in ("f32", "f16", "bf16", "q8_0") else "f16"
    merged = model or str(out.parent / f"{out.stem}-merged")
    gguf_out = out if outtype == type else out.with_name(f"{out.stem}-{outtype}.gguf")
    steps = []
    if adapter:
        steps.append(shlex.join(["peftlab", "export", "--format", "safetensors", "--adapter", adapter, *merge_flags,
                                 "--out", merged]))
    steps.append(shlex.join(["python", "convert_hf_to_gguf.py", merged, "--outfile", str(gguf_out),
                             "--outtype", outtype]))
    if outtype != type:
        steps.append(shlex.join(["llama-quantize", str(gguf_out), str(out), type.upper()]))
    lead = "merge, then convert with llama.cpp's converter" if adapter else "convert with llama.cpp's converter"
    return f"{lead} (convert_hf_to_gguf.py is in a llama.cpp checkout): " + "; then ".join(f"`{s}`" for s in steps)


def check_gguf_export(model_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *, type: str = "f16",
                      overwrite: bool = False, model: str | None = None, adapter: str | None = None,
                      merge_flags: Sequence[str] = ()) -> dict[str, Any]:
    """Everything GGUF export refuses, checked before any work; returns the model's config.

    ``model_dir`` holds the config of the model to export (for an adapter: its base, so the check runs
    before the merge). ``model`` / ``adapter`` / ``merge_flags`` (``--base``, ``--set``, ... as the user
    gave them) are what the advice in a refusal repeats. Also proves ``out_file``'s directory writable
    by creating (and removing) a file there.
    """
    if type not in GGUF_TYPES:
        raise PeftlabError(f"--type {type!r}: use one of {', '.join(GGUF_TYPES)}")
    model_dir, out = Path(model_dir), Path(out_file)
    if out.suffix != ".gguf":
        raise PeftlabError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    if out.is_dir():
        raise PeftlabError(f"--out {out} is a directory; a GGUF export is one file: name a *.gguf file")
    if out.exists() and not overwrite:
        raise PeftlabError(f"--out {out} exists; choose a new file name or pass --overwrite")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise PeftlabError(f"{model_dir} has no config.json; --model must be a merged Hugging Face model directory")
    config = json.loads(config_file.read_text())
    advice = _convert_advice(out, type, model or (None if adapter else str(model_dir)), adapter, merge_flags)
    kind = config.get("model_type")
    if kind not in LLAMA_LIKE:
        what = f"the base model of {adapter}" if adapter else str(model_dir)
        raise PeftlabError(f"GGUF export supports Llama-architecture models ({', '.join(LLAMA_LIKE)}); {what} is "
                           f"{kind!r}. Instead, {advice}")
    rope = _rope_kind(config)
    if rope not in ROPE_TYPES:
        raise PeftlabError(f"rope type {rope!r} is not supported by peftlab's GGUF export ({', '.join(ROPE_TYPES)} "
                           f"are). Instead, {advice}")
    if rope == "llama3":
        llama3_rope_factors(config)  # refuses an incomplete llama3 config now rather than after a merge
    _check_writable(out)
    return config


def _check_writable(out: Path) -> None:
    where = out.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PeftlabError(f"--out {out}: cannot write to {where} ({exc.strerror or exc}); choose a --out in a "
                           "directory you can write to, or make that directory writable. Nothing was done.") from None


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """OS errors while writing the GGUF file (disk full, permissions) as one message about ``out``."""
    try:
        yield
    except OSError as exc:
        raise PeftlabError(f"--out {out}: writing the GGUF file failed ({exc.strerror or exc}); free space or "
                           "choose a --out on another disk. No partial file was left.") from None


def keep_merged(merged_dir: Path, out: Path) -> Path:
    """Move an intermediate merged model beside ``out`` (when the export after a merge fails: the merge
    is kept, not thrown away); returns where it is."""
    keep = out.parent / f"{out.stem}-merged"
    n = 1
    while keep.exists():
        n += 1
        keep = out.parent / f"{out.stem}-merged-{n}"
    os.replace(merged_dir, keep)  # a move of a finished directory (not a write): nothing can be half-done
    return keep


@dataclass
class GGUFResult:
    path: Path
    type: str
    tensors: int
    bytes: int  # the file's size: tensors + metadata + tokenizer
    tensor_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def export_gguf(model_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *, type: str = "f16",
                overwrite: bool = False) -> GGUFResult:
    """Write the merged HF model in ``model_dir`` (Llama architecture) as a GGUF file at ``out_file``.

    The file is written beside ``out_file`` and renamed into place (:func:`peftlab.checkpoint.atomic.atomic_write`):
    a failed export leaves no partial file."""
    model_dir, out = Path(model_dir), Path(out_file)
    config = check_gguf_export(model_dir, out, type=type, overwrite=overwrite, model=str(model_dir))
    notes: list[str] = []
    counts: list[int] = []

    def write(tmp: Path) -> None:
        writer = _writer_class()(tmp, "llama")
        try:
            counts.extend(_write_gguf(writer, model_dir, out, config, type, notes))
            with _writing(out):
                writer.close()
        except BaseException:
            try:
                writer.close()
            except OSError:
                pass  # the write that failed is being reported; closing may fail the same way
            raise

    with _writing(out):
        atomic_write(out, write)
    n_tensors, total = counts
    return GGUFResult(out, type, n_tensors, out.stat().st_size, total, notes)


def _write_gguf(writer: Any, model_dir: Path, out: Path, config: dict[str, Any], type: str,
                notes: list[str]) -> tuple[int, int]:
    """Metadata, tokenizer and tensors into ``writer``; returns (tensors written, tensor bytes)."""
    import gguf

    rope = _rope_kind(config)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = _head_dim(config)
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if rope == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope_params(config)["factor"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_type(gguf, type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, config["vocab_size"], notes)

    # pass 1: names, shapes and types from the shard headers (no tensor data read)
    extra: list[tuple[str, np.ndarray]] = []
    if rope == "llama3":
        # llama.cpp's Llama-3.1 RoPE: one F32 vector of per-pair frequency divisors (convert_hf_to_gguf
        # writes it as an extra tensor; llama.cpp needs no rope-scaling keys for it)
        extra.append((f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", llama3_rope_factors(config)))
    for name, data in extra:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    plan: list[tuple[str, str, Any]] = []
    for shard in checkpoint_files(model_dir):
        _, header = read_header(shard)
        for key in sorted(header):  # the order iter_tensors reads them in
            if key.endswith(".rotary_emb.inv_freq"):
                continue
            name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise PeftlabError(f"{shard.name}: tensor {key!r} has no llama.cpp name; GGUF export "
                                   "covers the Llama architecture's tensors only")
            shape = tuple(header[key]["shape"])
            qtype = _tensor_type(gguf, name, shape, type)
            plan.append((key, name, qtype))
            nbytes = _nbytes(gguf, shape, qtype)
            writer.add_tensor_info(name, _byte_shape(gguf, shape, qtype), _np_dtype(gguf, qtype),
                                   nbytes, raw_dtype=qtype)
    with _writing(out):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    # pass 2: convert and write one tensor at a time, in the planned order
    total = 0
    for _, data in extra:
        with _writing(out):
            writer.write_tensor_data(data)
        total += data.nbytes
    planned = {key: (name, qtype) for key, name, qtype in plan}
    for key, tensor in iter_tensors(model_dir):
        if key not in planned:
            continue
        name, qtype = planned[key]
        data = tensor.float().numpy()
        if key.endswith("q_proj.weight"):
            data = llama_permute(data, n_head, n_head)
        elif key.endswith("k_proj.weight"):
            data = llama_permute(data, n_head, n_kv)
        converted = _convert(gguf, data, qtype)
        with _writing(out):
            writer.write_tensor_data(converted)
        total += converted.nbytes
    return len(plan) + len(extra), total


def _byte_shape(gguf: Any, shape: tuple[int, ...], qtype: Any) -> tuple[int, ...]:
    t = gguf.GGMLQuantizationType
    if qtype in (t.F32, t.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def _np_dtype(gguf: Any, qtype: Any) -> np.dtype:
    t = gguf.GGMLQuantizationType
    return {t.F32: np.dtype(np.float32), t.F16: np.dtype(np.float16)}.get(qtype, np.dtype(np.uint8))


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size
