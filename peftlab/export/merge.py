"""Merging a LoRA adapter into its base model: ``peftlab merge --adapter DIR --out DIR``.

The merge streams the base checkpoint: its safetensors shards are read one tensor at a time
(:func:`peftlab.model.shards.iter_tensors`); a targeted weight gets its update ``ΔW`` (plain LoRA / rsLoRA:
``s·B·A``; DoRA: the magnitude over the row norm of ``W + s·B·A``, as PEFT merges it — the arithmetic of
:mod:`peftlab.adapters.arithmetic`, the same the LoRA layer computes with) added in fp32 and is cast once to
the output dtype; finished tensors go to an output shard that is written as soon as it is full
(:class:`peftlab.model.shards.ShardWriter`). Peak memory is one output shard (``max_shard_size``) plus one
input tensor plus the adapter, never the whole model. The base model and how training saw it come from
:mod:`peftlab.export.source`.

Which base weights? By default (``base_precision="trained"``) exactly those training saw: for a
QLoRA adapter the adapter directory's ``peftlab_recipe.yaml`` says how the base was quantised, and
every weight that the 4-bit loader quantised is put through the same bitsandbytes
quantise→dequantise round trip, so the merged model reproduces the adapter model's logits.
``base_precision="original"`` merges into the checkpoint's own (unquantised) weights instead.

After every merge a fidelity report (:mod:`peftlab.export.fidelity`) compares the adapter model with the
merged model on a few held-out samples (max / mean absolute logit difference, perplexity of each) and is
written as ``merge_report.json`` next to the weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab.adapters.arithmetic import merged_weight
from peftlab.adapters.chat_template import read_chat_template, save_chat_template
from peftlab.adapters.peft_format import read_lora_updates
from peftlab.checkpoint.atomic import atomic_directory
from peftlab.errors import PeftlabError
from peftlab.export.fidelity import fidelity_report, format_report, write_report
from peftlab.export.source import BaseQuant, model_layout, resolve_source, tokenizer_dir
from peftlab.model.shards import ShardWriter, checkpoint_files, iter_tensors, read_header
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASE_PRECISIONS = ("trained", "original")
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Every file of a tokenizer that the merged model gets verbatim (transformers' save_pretrained would drop
# tokenizer.model and special_tokens_map.json, which llama.cpp's converter and older loaders read).
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "tokenizer.model", "*.model", "vocab.json", "vocab.txt",
                           "merges.txt", "chat_template.jinja", "chat_template.json")


# --------------------------------------------------------------------------------------------------
# small parsers


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"200KB"`` or a byte count -> bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise PeftlabError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 200KB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B").rstrip("I")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in match.group(2):
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise PeftlabError(f"--max-shard-size {text!r} must be positive")
    return size


def output_dtype(name: str, base_dir: Path) -> torch.dtype:
    """The merged model's dtype: bf16 | fp16 | fp32, or ``auto`` = the base checkpoint's dtype."""
    if name in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[name]
    if name != "auto":
        raise PeftlabError(f"--dtype {name!r}: use one of auto, {', '.join(OUTPUT_DTYPES)}")
    config = json.loads((base_dir / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, stored, None) if isinstance(stored, str) else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for shard in checkpoint_files(base_dir):  # no dtype in the config: the first float tensor's
        _, header = read_header(shard)
        for key in sorted(header):
            dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(header[key]["dtype"])
            if dt is not None:
                return dt
    return torch.float32


# --------------------------------------------------------------------------------------------------
# the base weights training saw


def trained_weight(weight: Tensor, quant: BaseQuant) -> Tensor:
    """The weight as a 4-bit QLoRA run saw it: cast to the load dtype, quantised and dequantised by
    bitsandbytes exactly as ``Params4bit`` does when transformers loads the model (fp32 result)."""
    import bitsandbytes.functional as bnbf

    from peftlab.kernels.nf4 import dequantize_4bit

    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float32": torch.float32}[quant.quant_storage]
    w = weight.to(quant.load_dtype).contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=quant.blocksize, compress_statistics=quant.double_quant,
                                       quant_type=quant.mode, quant_storage=storage)
    return dequantize_4bit(packed, state).float()  # peftlab's conventions: the bits every backend gives


# --------------------------------------------------------------------------------------------------
# the merge


@dataclass
class MergeResult:
    out_dir: Path
    shards: list[Path]
    dtype: str
    base_precision: str
    merged_modules: int
    total_bytes: int
    peak_buffered_bytes: int  # the most tensor bytes the writer held at once
    report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def save_model_files(source_dir: Path, out_dir: Path, dtype: torch.dtype, tokenizer_from: Path,
                     chat_template: str | None = None) -> None:
    """config.json (dtype set, quantization_config dropped), generation_config.json, and every tokenizer file
    of ``tokenizer_from`` copied as is; ``chat_template`` (the one training used) as chat_template.jinja.
    ``out_dir`` is a directory being built (an ``atomic_directory``)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(source_dir)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source_dir).save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(tokenizer_from)  # it must load: the merged model is useless without it
    except (OSError, ValueError) as exc:
        raise PeftlabError(f"could not load the tokenizer from {tokenizer_from} ({exc}); the merged model "
                           "needs one. Pass --base with a model directory that has tokenizer files.") from None
    for pattern in TOKENIZER_FILE_PATTERNS:
        for f in tokenizer_from.glob(pattern):
            if f.is_file() and not (out_dir / f.name).exists():
                shutil.copyfile(f, out_dir / f.name)
    if chat_template is not None:
        save_chat_template(out_dir, chat_template)


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | None = None,
    dtype: str = "auto",
    base_precision: str = "trained",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    report_samples: int = 8,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge the adapter at ``adapter_dir`` into its base, shard by shard; write an HF model dir at ``out_dir``.

    ``dtype``: bf16 | fp16 | fp32 | auto (the base checkpoint's dtype). ``base_precision``: ``trained``
    (the weights training saw: NF4-dequantised for a QLoRA adapter) or ``original`` (the checkpoint's).
    ``report_samples`` held-out samples go into the fidelity report (0 skips it). The directory is written
    atomically (:func:`peftlab.checkpoint.atomic.atomic_directory`): a failed merge never leaves a half-written
    model under ``out_dir``, nor destroys an old one.
    """
    if base_precision not in BASE_PRECISIONS:
        raise PeftlabError(f"--base-precision {base_precision!r}: use trained or original")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:  # before any work
        raise PeftlabError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    source = resolve_source(adapter_dir, base, overrides, trust_remote_code=trust_remote_code)
    out_dtype = output_dtype(dtype, source.base_dir)
    max_bytes = parse_size(max_shard_size)
    updates = read_lora_updates(source.adapter_dir, source.adapter_config)
    quantised: set[str] = set()
    notes = []
    if base_precision == "trained" and source.quant is not None:
        _, quantised = model_layout(source.base_dir)
        notes.append(f"base weights: {source.quant.mode.upper()}-dequantised as training saw them "
                     f"(blocksize {source.quant.blocksize}, double quant {source.quant.double_quant}, "
                     f"quantised from {str(source.quant.load_dtype).removeprefix('torch.')})")
    # What training saw of the dense tensors too: a bf16 run saw bf16 norms and embeddings.
    via = source.load_dtype if base_precision == "trained" else None
    targeted = {f"{name}.weight": upd for name, upd in updates.items()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        seen = set()
        for key, tensor in iter_tensors(source.base_dir):
            if tensor.is_floating_point():
                if key in quantised:
                    tensor = trained_weight(tensor, source.quant)
                elif via is not None:
                    tensor = tensor.to(via)
                if key in targeted:
                    u = targeted[key]
                    tensor = merged_weight(tensor, u.lora_A, u.lora_B, u.scaling, u.magnitude)
                    seen.add(key)
                tensor = tensor.to(out_dtype)
            writer.add(key, tensor)
            del tensor
        missing = set(targeted) - seen
        if missing:
            raise PeftlabError(
                f"the adapter updates {len(missing)} weights that the base checkpoint {source.base_dir} does not "
                f"have (e.g. {sorted(missing)[:3]}); is this the base model the adapter was trained on?"
            )
        shards = writer.finish()
        save_model_files(source.base_dir, tmp, out_dtype, tokenizer_dir(source),
                         chat_template=read_chat_template(source.adapter_dir))
        if (source.adapter_dir / ADAPTER_RECIPE_NAME).is_file():
            shutil.copy2(source.adapter_dir / ADAPTER_RECIPE_NAME, tmp / ADAPTER_RECIPE_NAME)
    result = MergeResult(out, [out / s.name for s in shards], str(out_dtype).removeprefix("torch."),
                         base_precision, len(updates), writer.total, writer.peak_buffered, notes=notes)
    logger.info("merged %d modules of %s into %s -> %s (%d shard(s), %s)", len(updates), source.adapter_dir,
                source.base_name, out, len(shards), result.dtype)
    for note in notes:
        logger.info(note)
    if report_samples > 0:
        result.report = fidelity_report(source, out, n_samples=report_samples, base_precision=base_precision)
        write_report(out, result.report)
        logger.info(format_report(result.report))
    return result
