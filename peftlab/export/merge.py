"""Merging a LoRA adapter into its base model: ``peftlab merge --adapter DIR --out DIR``.

The merge streams the base checkpoint: each safetensors shard is opened with ``safe_open`` and read
one tensor at a time; a targeted weight gets its update ``ΔW`` (plain LoRA / rsLoRA: ``s·B·A``;
DoRA: the magnitude over the row norm of ``W + s·B·A``, as PEFT merges it) added in fp32 and is cast
once to the output dtype; finished tensors go to an output shard that is written as soon as it is
full. Peak memory is one output shard (``max_shard_size``) plus one input tensor plus the adapter,
never the whole model.

Which base weights? By default (``base_precision="trained"``) exactly those training saw: for a
QLoRA adapter the adapter directory's ``peftlab_recipe.yaml`` says how the base was quantised, and
every weight that the 4-bit loader quantised is put through the same bitsandbytes
quantise→dequantise round trip, so the merged model reproduces the adapter model's logits.
``base_precision="original"`` merges into the checkpoint's own (unquantised) weights instead.

After every merge a fidelity report compares the adapter model with the merged model on a few
held-out samples (max / mean absolute logit difference, perplexity of each) and is written as
``merge_report.json`` next to the weights.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab.errors import PeftlabError

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASE_PRECISIONS = ("trained", "original")
RECIPE_NAME = "peftlab_recipe.yaml"
REPORT_NAME = "merge_report.json"
INDEX_NAME = "model.safetensors.index.json"
KEY_PREFIX = "base_model.model."
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Files that make a directory a tokenizer directory (an adapter dir with one of them carries its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Every file of a tokenizer that the merged model gets verbatim (transformers' save_pretrained would drop
# tokenizer.model and special_tokens_map.json, which llama.cpp's converter and older loaders read).
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "tokenizer.model", "*.model", "vocab.json", "vocab.txt",
                           "merges.txt", "chat_template.jinja", "chat_template.json")

# Shown by the fidelity report when the training recipe's eval data cannot be read.
BUILTIN_PROMPTS = (
    "The capital of France is Paris. The capital of Italy is",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "after c comes d, after d comes e, after e comes",
    "Question: what is 3 + 4?\nAnswer: 7\nQuestion: what is 5 - 2?\nAnswer:",
)


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
    for shard in checkpoint_shards(base_dir):  # no dtype in the config: the first float tensor's
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                t = f.get_slice(key)
                dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dt is not None:
                    return dt
    return torch.float32


# --------------------------------------------------------------------------------------------------
# where the base model and the training settings come from


@dataclass
class BaseQuant:
    """How training quantised the base (the recipe's ``quantization`` section + the load dtype)."""

    mode: str  # nf4 | fp4
    double_quant: bool
    blocksize: int
    quant_storage: str
    load_dtype: torch.dtype  # the dtype weights had when bitsandbytes quantised them


@dataclass
class MergeSource:
    adapter_dir: Path
    adapter_config: dict[str, Any]
    base_name: str  # as the user / recipe / adapter config names it
    base_dir: Path  # a local HF model directory
    recipe: Any | None  # the training Recipe when the adapter dir holds peftlab_recipe.yaml
    quant: BaseQuant | None  # None: training saw a dense base
    load_dtype: torch.dtype | None  # the dtype training loaded the base in (None: unknown, a PEFT adapter)


def local_model_dir(name: str) -> Path:
    """A local directory holding ``name``'s config and safetensors: built-ins, local dirs, hub snapshots."""
    from peftlab.model.load import resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                            "*.txt"]))
    except Exception as exc:  # noqa: BLE001 (offline, unknown repo, gated, ...: one message for all)
        raise PeftlabError(
            f"could not get base model {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Pass --base with a local model directory (config.json + *.safetensors), or run where the hub "
            "is reachable."
        ) from None


def _load_dtype(recipe: Any) -> torch.dtype:
    """The dtype the trainer loaded the base in (``model.dtype``; ``auto`` resolved as models.pick_dtype does).

    ``auto`` depends on the device training ran on, which the recipe only records as ``train.device``;
    for ``auto`` the device of this machine is assumed (a GPU run merged on a CPU-only machine should
    pass ``--set model.dtype=bfloat16`` ... or train with an explicit dtype).
    """
    from peftlab.model.load import DTYPES, pick_device, pick_dtype

    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    device = torch.device("cpu") if recipe.train.device == "cpu" else pick_device("auto")
    return pick_dtype("auto", device)


def resolve_source(adapter_dir: str | os.PathLike[str], base: str | None = None,
                   overrides: list[str] | None = None, *, trust_remote_code: bool = False) -> MergeSource:
    """Find the adapter's base model and how training saw it.

    Order: ``base`` (``--base``), then the training recipe stored in the adapter dir (read as untrusted
    input: it never turns on remote code), then the PEFT config's ``base_model_name_or_path``.
    """
    from peftlab.adapters.peft_format import read_adapter_config
    from peftlab.recipe.schema import load_adapter_recipe

    path = Path(adapter_dir)
    config = read_adapter_config(path)
    recipe = (load_adapter_recipe(path, overrides, trust_remote_code=trust_remote_code)
              if (path / RECIPE_NAME).is_file() else None)
    name = base or (recipe.model.name if recipe is not None else None) or config.get("base_model_name_or_path")
    if not name:
        raise PeftlabError(
            f"{path}: no base model is named (no {RECIPE_NAME}, and adapter_config.json has no "
            "base_model_name_or_path); pass --base ID|DIR"
        )
    quant = None
    load_dtype = _load_dtype(recipe) if recipe is not None else None
    if recipe is not None and recipe.quantization.mode != "none":
        q = recipe.quantization
        quant = BaseQuant(q.mode, q.double_quant, q.blocksize, q.quant_storage, load_dtype)
    return MergeSource(path, config, name, local_model_dir(name), recipe, quant, load_dtype)


def checkpoint_shards(base_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in index order (or the single model.safetensors)."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [base_dir / f for f in dict.fromkeys(weight_map.values())]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(base_dir.glob("*.safetensors"))
    if found:
        return found
    raise PeftlabError(
        f"{base_dir} has no safetensors weights (model.safetensors or {INDEX_NAME}); the merge streams "
        "safetensors shards. Convert the checkpoint first: load it with transformers and "
        "save_pretrained(dir, safe_serialization=True)."
    )


def model_layout(base_dir: Path) -> tuple[list[str], set[str]]:
    """(every module name in model order, the linear weights a bitsandbytes 4-bit loader quantises).

    Built from the config on the meta device (no weights are read): the module order is what PEFT
    iterates over, and transformers' own ``get_keys_to_not_convert`` says which linear layers stay
    unquantised (the output head, tied weights).
    """
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = set(get_keys_to_not_convert(model))
    except (ImportError, AttributeError):  # other transformers versions: the head is what it always skips
        skip = {"lm_head"}
    names = [n for n, _ in model.named_modules() if n]
    quantised = {f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n not in skip and n.rsplit(".", 1)[-1] not in skip}
    return names, quantised


# --------------------------------------------------------------------------------------------------
# the math


@dataclass
class LoraUpdate:
    """One module's adapter tensors and scaling, read from a PEFT adapter."""

    lora_A: Tensor  # [r, in]
    lora_B: Tensor  # [out, r]
    scaling: float
    magnitude: Tensor | None = None  # DoRA, [out]


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key matching the end of the module name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_updates(adapter_dir: Path, config: dict[str, Any]) -> dict[str, LoraUpdate]:
    """The LoRA update of every module of an adapter, keyed by module name (``model.layers.0...q_proj``)."""
    from peftlab.adapters.peft_format import read_adapter_weights

    weights = read_adapter_weights(adapter_dir)
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)",
                             key)
        if match is None:
            raise PeftlabError(f"{adapter_dir}: unexpected tensor {key!r} in the adapter weights (a LoRA "
                               "adapter holds ...lora_A.weight, ...lora_B.weight and, for DoRA, "
                               "...lora_magnitude_vector)")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    updates = {}
    use_dora = bool(config.get("use_dora"))
    for name, parts in modules.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise PeftlabError(f"{adapter_dir}: module {name} has only {sorted(parts)}; lora_A and lora_B "
                               "are both needed")
        if use_dora and "lora_magnitude_vector" not in parts:
            raise PeftlabError(f"{adapter_dir}: use_dora is set but {name} has no lora_magnitude_vector")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise PeftlabError(f"{adapter_dir}: {name} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}: their ranks differ")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[name] = LoraUpdate(a, b, scaling, parts.get("lora_magnitude_vector"))
    return updates


def merged_weight(weight: Tensor, update: LoraUpdate) -> Tensor:
    """``W + ΔW`` in fp32 — the same operations as ``LoraLinear.merged_weight``, so results are bit-equal."""
    weight = weight.float()
    delta = update.scaling * (update.lora_B.float() @ update.lora_A.float())
    combined = weight + delta
    if update.magnitude is None:
        return combined
    norm = torch.linalg.norm(combined, dim=1)
    return (update.magnitude.float() / norm).view(-1, 1) * combined


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
# streaming writer


class ShardWriter:
    """Collects tensors into output shards of at most ``max_bytes`` and writes each as soon as it is full.

    Shards are written under temporary names (their count is unknown until the end) and renamed to
    ``model-0000i-of-0000N.safetensors`` by :meth:`finish`, which also writes the index.
    """

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffered = 0
        self.peak_buffered = 0  # the most bytes ever held at once (what the streaming test checks)
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total += nbytes
        self.peak_buffered = max(self.peak_buffered, self.buffered)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.out_dir / f".shard-{len(self.files):05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self.files)
        weight_map: dict[str, str] = {}
        final = []
        for i, (tmp, names) in enumerate(self.files):
            target = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, target)
            final.append(target)
            weight_map.update({name: target.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return final


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


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """A fresh temporary directory beside ``out_dir``; the result is renamed into place at the end so a
    failed merge never leaves a half-written model under the final name (nor destroys an old one)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PeftlabError(f"--out {out_dir} exists and is not empty; choose a new directory or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def default_permissions(path: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (mode 0700) the mode any new directory gets (0777 less
    the umask): a merged model is shared with the people and services that serve it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def _commit_out_dir(tmp: Path, out_dir: Path) -> None:
    default_permissions(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _iter_checkpoint(base_dir: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the base checkpoint, one at a time (only the current one is held)."""
    from safetensors import safe_open

    for shard in checkpoint_shards(base_dir):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                yield key, f.get_tensor(key)


def save_model_files(source_dir: Path, out_dir: Path, dtype: torch.dtype, tokenizer_dir: Path,
                     chat_template: str | None = None) -> None:
    """config.json (dtype set, quantization_config dropped), generation_config.json, and every tokenizer file
    of ``tokenizer_dir`` copied as is; ``chat_template`` (the one training used) as chat_template.jinja."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from peftlab.adapters.chat_template import save_chat_template

    config = AutoConfig.from_pretrained(source_dir)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    if (source_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source_dir).save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(tokenizer_dir)  # it must load: the merged model is useless without it
    except (OSError, ValueError) as exc:
        raise PeftlabError(f"could not load the tokenizer from {tokenizer_dir} ({exc}); the merged model "
                           "needs one. Pass --base with a model directory that has tokenizer files.") from None
    for pattern in TOKENIZER_FILE_PATTERNS:
        for f in tokenizer_dir.glob(pattern):
            if f.is_file() and not (out_dir / f.name).exists():
                shutil.copyfile(f, out_dir / f.name)
    if chat_template is not None:
        save_chat_template(out_dir, chat_template)


def _tokenizer_dir(source: MergeSource) -> Path:
    """The tokenizer training used: one saved in the adapter dir, the recipe's ``model.tokenizer``, else the base's."""
    if any((source.adapter_dir / f).is_file() for f in TOKENIZER_FILES):
        return source.adapter_dir
    if source.recipe is not None and source.recipe.model.tokenizer:
        return local_model_dir(source.recipe.model.tokenizer)
    return source.base_dir


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
    log: Any = print,
) -> MergeResult:
    """Merge the adapter at ``adapter_dir`` into its base, shard by shard; write an HF model dir at ``out_dir``.

    ``dtype``: bf16 | fp16 | fp32 | auto (the base checkpoint's dtype). ``base_precision``: ``trained``
    (the weights training saw: NF4-dequantised for a QLoRA adapter) or ``original`` (the checkpoint's).
    ``report_samples`` held-out samples go into the fidelity report (0 skips it).
    """
    if base_precision not in BASE_PRECISIONS:
        raise PeftlabError(f"--base-precision {base_precision!r}: use trained or original")
    from peftlab.adapters.chat_template import read_chat_template

    source = resolve_source(adapter_dir, base, overrides, trust_remote_code=trust_remote_code)
    out = Path(out_dir)
    out_dtype = output_dtype(dtype, source.base_dir)
    max_bytes = parse_size(max_shard_size)
    updates = read_updates(source.adapter_dir, source.adapter_config)
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
    tmp = _prepare_out_dir(out, overwrite)
    try:
        writer = ShardWriter(tmp, max_bytes)
        seen = set()
        for key, tensor in _iter_checkpoint(source.base_dir):
            if tensor.is_floating_point():
                if key in quantised:
                    tensor = trained_weight(tensor, source.quant)
                elif via is not None:
                    tensor = tensor.to(via)
                if key in targeted:
                    tensor = merged_weight(tensor, targeted[key])
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
        save_model_files(source.base_dir, tmp, out_dtype, _tokenizer_dir(source),
                         chat_template=read_chat_template(source.adapter_dir))
        if (source.adapter_dir / RECIPE_NAME).is_file():
            shutil.copy2(source.adapter_dir / RECIPE_NAME, tmp / RECIPE_NAME)
        _commit_out_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = MergeResult(out, [out / s.name for s in shards], str(out_dtype).removeprefix("torch."),
                         base_precision, len(updates), writer.total, writer.peak_buffered, notes=notes)
    log(f"merged {len(updates)} modules of {source.adapter_dir} into {source.base_name} -> {out} "
        f"({len(shards)} shard(s), {result.dtype})")
    for note in notes:
        log(note)
    if report_samples > 0:
        result.report = fidelity_report(source, out, n_samples=report_samples, base_precision=base_precision)
        (out / REPORT_NAME).write_text(json.dumps(result.report, indent=2) + "\n")
        log(format_report(result.report))
    return result


# --------------------------------------------------------------------------------------------------
# fidelity report


def adapter_model(source: MergeSource):
    """(model, tokenizer) of the adapter on its base, as training built it (4-bit when it trained 4-bit)."""
    from peftlab.adapters.peft_format import load_adapter
    from peftlab.model.load import build_model, load_base_model, load_tokenizer

    if source.recipe is not None:
        recipe = source.recipe.model_copy(deep=True)
        recipe.model.name = str(source.base_dir)
        recipe.train.device = "cpu"
        recipe.model.gradient_checkpointing = False
        loaded = build_model(recipe, device=torch.device("cpu"), adapter_dir=source.adapter_dir, trainable=False)
        return loaded.model.eval(), loaded.tokenizer
    model = load_base_model(str(source.base_dir), dtype=torch.float32, device=torch.device("cpu"))
    load_adapter(model, source.adapter_dir, kernel_backend="torch")
    return model.eval(), load_tokenizer(str(_tokenizer_dir(source)))


def _report_batches(source: MergeSource, tokenizer: Any, n_samples: int) -> tuple[list[dict[str, Tensor]], str]:
    """Held-out batches: the training recipe's eval data when it can be read, else built-in prompts."""
    if source.recipe is not None and source.recipe.data.eval:
        try:
            from peftlab.data import build_data, collate

            data = build_data(source.recipe.data, tokenizer, seed=source.recipe.train.seed,
                              base_dir=Path(source.recipe.base_dir))
            if data.eval:
                examples = list(data.eval[:n_samples])
                batch = collate(examples, pad_token_id=data.pad_token_id, attn_implementation="sdpa")
                keep = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")
                        if k in batch and batch[k].dim() == 2}
                if "position_ids" not in batch and set(keep) == {"input_ids", "attention_mask", "labels"}:
                    paths = ", ".join(str(s.path) for s in source.recipe.data.eval if getattr(s, "path", None))
                    return [keep], f"training recipe eval data ({paths or 'data.eval'})"
        except (PeftlabError, OSError, ValueError):
            pass
    texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(min(n_samples, len(BUILTIN_PROMPTS)))]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}], \
        "built-in prompts"


@torch.no_grad()
def compare_logits(model_a, model_b, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Max/mean |logits_a - logits_b| over real tokens, each model's perplexity, top-1 agreement."""
    max_diff, sum_diff, n_logits, agree, n_tok = 0.0, 0.0, 0, 0, 0
    nll = [0.0, 0.0]
    n_targets = 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        la = model_a(**inputs).logits.float()
        lb = model_b(**inputs).logits.float()
        real = batch["attention_mask"].bool()
        diff = (la - lb).abs()[real]
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.sum().item()
        n_logits += diff.numel()
        agree += (la.argmax(-1) == lb.argmax(-1))[real].sum().item()
        n_tok += int(real.sum())
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        n_targets += int(mask.sum())
        for i, logits in enumerate((la, lb)):
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll[i] -= picked[mask].sum().item()
    ppl = [math.exp(min(v / max(n_targets, 1), 50.0)) for v in nll]
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum_diff / max(n_logits, 1),
            "perplexity_adapter": ppl[0], "perplexity_merged": ppl[1], "top1_agreement": agree / max(n_tok, 1),
            "tokens": n_tok, "target_tokens": n_targets}


def fidelity_report(source: MergeSource, merged_dir: Path, *, n_samples: int = 8,
                    base_precision: str = "trained") -> dict[str, Any]:
    """Adapter model vs merged model on a few held-out samples (see :func:`compare_logits`)."""
    from transformers import AutoModelForCausalLM

    ref, tokenizer = adapter_model(source)
    config = json.loads((merged_dir / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or "float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    batches, where = _report_batches(source, tokenizer, n_samples)
    report: dict[str, Any] = {
        "adapter": str(source.adapter_dir), "base": source.base_name, "merged": str(merged_dir),
        "base_precision": base_precision, "dtype": str(dtype).removeprefix("torch."),
        "adapter_model": ("4-bit " + source.quant.mode.upper()) if source.quant else "dense",
        "samples": int(batches[0]["input_ids"].shape[0]), "samples_source": where,
    }
    report.update(compare_logits(ref, merged, batches))
    return report


def format_report(report: dict[str, Any]) -> str:
    return (
        f"fidelity ({report['samples']} samples from {report['samples_source']}, {report['tokens']} tokens): "
        f"max |Δlogit| {report['max_abs_logit_diff']:.3g}, mean |Δlogit| {report['mean_abs_logit_diff']:.3g}, "
        f"perplexity adapter {report['perplexity_adapter']:.4f} vs merged {report['perplexity_merged']:.4f}, "
        f"top-1 agreement {report['top1_agreement']:.1%}"
    )


def result_dict(result: MergeResult) -> dict[str, Any]:
    d = asdict(result)
    d["out_dir"] = str(result.out_dir)
    d["shards"] = [str(s) for s in result.shards]
    return d
