"""The recipe: one typed, validated description of a run.

Every section is a pydantic model that forbids unknown keys and fills the defaults a practitioner
expects (QLoRA NF4 with double quantisation, LoRA r=16 alpha=32 on all linear layers, AdamW, cosine
schedule with warmup, gradient clipping at 1.0, a fixed seed); :class:`Recipe` holds them and checks the
combinations no single section can. YAML in, ``--set`` overrides and the messages of a bad recipe are
:mod:`peftlab.recipe.parse`; the recipe stored with an adapter is :mod:`peftlab.recipe.from_adapter`.
:func:`reference_markdown` is the README's table of every key.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftlab.data.config import DataConfig
from peftlab.recipe.augmentation import AugmentConfig, check_augment
from peftlab.recipe.dann import DannConfig, check_dann_combination
from peftlab.recipe.preference_config import PreferenceConfig, check_preference
from peftlab.recipe.shipped import shipped_deepspeed_config, shipped_deepspeed_configs

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name: str = "builtin:tiny-llama"
    """Hub id (``meta-llama/Llama-3.1-8B``), local directory, or ``builtin:<name>``."""
    revision: str | None = None
    dtype: Dtype = "auto"
    """Compute dtype: auto = bfloat16 on GPUs that support it, float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None
    """Tokenizer id/dir when it differs from the model's."""
    frozen_16bit: bool = True
    """fp32 CPU runs: frozen embeddings / head whose values are exact in bf16 or fp16 (a 16-bit checkpoint's)
    stay in 16 bits and are upcast per use (peftlab.model.frozen_weights): half their memory, slower head."""


class QuantizationConfig(Section):
    mode: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True
    blocksize: Literal[64, 128, 256] = 64
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of packed 4-bit weights (DeepSpeed ZeRO-3 wants the compute dtype)."""


class AdapterConfig(Section):
    kind: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    layers: list[int] | str | None = None
    """Decoder layers that get adapters (PEFT's layers_to_transform): indices and ``"16..31"`` ranges
    (inclusive), or ``"top:8"`` / ``"bottom:4"`` for the last / first k layers; None: every layer."""
    init_from: str | None = None
    """Start from an existing adapter directory (PEFT format) instead of a fresh init."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+: the B matrices train at ratio x train.lr (A at train.lr); None: one learning rate."""
    unfreeze: list[str] = []
    """Base modules trained in full besides the adapters: ``embeddings``, ``head`` or module names
    (suffix match, e.g. ``embed_tokens``); saved beside the adapter (unfrozen_modules.safetensors)."""
    unfreeze_lr: float | None = Field(None, gt=0)
    """Learning rate of the unfrozen modules; None: train.lr."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_ranges(cls, v: Any) -> Any:
        from peftlab.adapters.freezing import parse_layers

        return parse_layers(v)


class LossConfig(Section):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    z_loss: float = Field(0.0, ge=0.0)
    softcap: float | None = Field(None, gt=0.0)


class EarlyStoppingConfig(Section):
    """Early stopping (peftlab.trainer.early_stopping): stop after ``patience`` evals without improvement."""

    metric: str = "eval_loss"
    """Any eval metric: eval_loss (or loss), perplexity, exact_match, token_f1, accuracy, f1_macro, ..."""
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    """An eval improves only when it beats the best by more than this."""
    mode: Literal["auto", "min", "max"] = "auto"
    """auto: min for losses/perplexity/errors, max for scores; refused for a metric without a known direction."""


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs when set."""
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_start: Literal["update", "zero"] = "update"
    """``update``: warmup step s runs at lr·(s+1)/warmup, the first step already updates; ``zero``: lr·s/warmup,
    the first step at lr 0, as transformers' schedulers (TRL, Axolotl, Unsloth, torchtune) — to follow a run of
    theirs step for step."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (None: only before and after training)."""
    eval_at_start: bool = True
    save_every: int | None = Field(None, gt=0)
    auto_fit: bool = False
    """Before training, shrink micro_batch_size (raising grad_accum) and then max_seq_len until the
    memory planner (``peftlab estimate``) says the run fits the free device / host memory."""
    threads: int | None = Field(None, gt=0)
    """CPU threads of torch's intra-op pool (``torch.set_num_threads``); None: torch's default capped at the
    CPUs the process may use (affinity, cgroup quota). peftlab's CLI makes waiting OpenMP threads sleep
    (``OMP_WAIT_POLICY=passive`` unless set), so a machine shared with other work slows a run gracefully."""
    host_allocator: Literal["auto", "default", "bounded"] = "auto"
    """CPU runs: ``auto`` asks torch for transparent huge pages on tensors >= 2 MiB and hands the heap's free
    pages back after every micro-batch's backward when it holds >= 64 MiB free (peak -17% against ``default`` on
    the vs_peers model, same speed); ``default`` leaves the C library's adaptive allocator alone (its heap keeps
    freed activations); ``bounded`` fixes glibc's mmap threshold at 1 MiB so freed tensors go back to the OS at once: peak host
    memory follows the live tensors (-30%), steps are slower when activations are 1-32 MiB (page faults:
    +3.5 s of a 10 s step on the vs_peers model, +40% on a 100M model; README "Host memory on the CPU")."""
    fused_blocks: bool = False
    """Whole-block (Q)LoRA autograd: q/k/v, o and the SwiGLU MLP of Llama/Mistral/Qwen2/Gemma-2 decoders each run
    as one node (peftlab.adapters.fused_blocks); groups with LoRA dropout, biases or DoRA stay per-module."""
    fused_norm: bool = False
    """RMSNorm modules of Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma-2 decoders run peftlab's fused RMSNorm (Triton
    kernels on CUDA: fp32 statistics, x and one fp32 value per row saved for backward, no weight gradient when
    frozen); on the CPU the same ops as transformers (no speed change there)."""
    offload_activations: bool = False
    """Long context: each gradient-checkpointed decoder layer's input goes to pinned host memory (async copies on
    a side CUDA stream, prefetched one layer ahead in backward) instead of staying on the GPU; needs
    model.gradient_checkpointing. On the CPU nothing moves (same numerics, no memory change)."""
    mlp_chunk_tokens: int | None = Field(None, gt=0)
    """Long context: each decoder MLP runs over the sequence in chunks of this many positions, each chunk
    recomputed in backward, so the gate/up activations exist for one chunk at a time (None: whole sequence)."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when an eval metric stops improving (needs eval_every); the best adapter is kept in best/."""
    loss: LossConfig = LossConfig()


class EvalConfig(Section):
    metric: Literal["exact_match", "token_f1", "loss", "perplexity", "accuracy", "f1_macro", "f1_micro",
                    "precision", "recall", "mse"] = "exact_match"
    max_new_tokens: int = Field(32, gt=0)
    max_prompts: int = Field(100, gt=0)
    batch_size: int = Field(16, gt=0)
    show_samples: int = Field(1, ge=0)


class OutputConfig(Section):
    dir: str = "runs/peftlab"
    report_to: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = ["jsonl", "tensorboard"]
    """mlflow: a local file store run in <dir>/mlruns; wandb: an offline run in <dir>/wandb."""
    plot: bool = True
    overwrite: bool = False
    """Allow training into a directory that already holds a finished run."""


class CheckpointConfig(Section):
    """Resumable checkpoints (README, "Fault tolerance"); written every ``train.save_every`` steps."""

    keep_last: int | None = Field(3, ge=1)
    """Complete checkpoints kept (oldest deleted first; the newest is never deleted). None: keep all."""
    dir: str = "checkpoints"
    """Folder of the checkpoints, relative to output.dir (it may not point outside output.dir)."""

    @field_validator("dir")
    @classmethod
    def _dir_inside_output(cls, v: str) -> str:
        from pathlib import PurePath

        parts = PurePath(v).parts
        if not v.strip() or PurePath(v).is_absolute() or ".." in parts or v.startswith("~"):
            raise ValueError("must be a relative folder inside output.dir without '..', e.g. checkpoints")
        return v


class GuardsConfig(Section):
    """Training guards: non-finite steps and loss spikes (README, "Fault tolerance")."""

    max_consecutive_nonfinite: int = Field(5, ge=1)
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped)."""
    loss_spike_action: Literal["warn", "abort", "off"] = "warn"
    loss_spike_factor: float = Field(3.0, gt=1.0)
    """A step's loss above factor x the median of the last ``loss_spike_window`` finite losses is a spike."""
    loss_spike_window: int = Field(20, ge=2)
    """Steps in the running median; the watchdog arms once the window is full."""


class TeacherConfig(Section):
    """The distillation teacher: a base model, optionally with its own (e.g. quickstart-trained) adapter."""

    name: str | None = None
    """Hub id, local directory or ``builtin:<name>``; may be left out when ``adapter`` is set (the base
    named in the adapter's adapter_config.json is used)."""
    revision: str | None = None
    tokenizer: str | None = None
    """Tokenizer id/dir when it differs from the teacher's (must give the student's vocabulary)."""
    adapter: str | None = None
    """A PEFT-format adapter directory applied to the teacher (frozen), e.g. ``runs/quickstart/adapter``."""
    quantization: QuantizationConfig | None = None
    """The teacher's own quantization; None: the one its adapter was trained on (when it records it),
    else the recipe's ``quantization`` section."""
    dtype: Dtype | None = None
    """Compute dtype of the teacher; None: ``model.dtype``."""
    trust_remote_code: bool = False


class DistillConfig(Section):
    """Knowledge distillation: L = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher, student)."""

    teacher: TeacherConfig
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixture weight of the teacher (0 = forward KL, 1 = reverse KL); only used by kind=jsd."""
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the hard-label cross-entropy; 0 = pure distillation, 1 = plain fine-tuning."""
    mode: Literal["online", "offline"] = "online"
    """online: the teacher runs in the training process; offline: its top-k log-probs are read from
    ``cache_dir`` (written once by ``peftlab distill-cache RECIPE``)."""
    cache_dir: str | None = None
    """Teacher cache directory (offline mode); None: ``<output.dir>/teacher-cache``."""
    top_k: int = Field(64, gt=0)
    """Teacher log-probabilities stored per target token (offline mode)."""
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the cached log-probabilities (float16: 2 bytes, ~1e-3 relative error)."""

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _teacher_named(self) -> DistillConfig:
        if self.teacher.name is None and self.teacher.adapter is None:
            raise ValueError("distill.teacher needs a name (hub id, local dir or builtin:<name>) or an adapter "
                             "directory whose adapter_config.json names its base model")
        return self


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    kernels: Literal["auto", "triton", "torch", "off"] = "auto"
    """Fused kernels: auto = Triton on CUDA, PyTorch elsewhere; off = the model's own unfused path."""
    # Seams for the scale-out, fault-tolerance and distillation sections (other issues).
    deepspeed: str | None = None
    resume: str | None = None
    """``auto``: continue from the newest complete checkpoint in output.dir (fresh start if none);
    a checkpoint directory: continue from that one; None: start fresh."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    guards: GuardsConfig = GuardsConfig()
    distill: DistillConfig | None = None
    """Distillation from a teacher model (README, "Distillation"); None: plain fine-tuning."""
    dann: DannConfig | None = None
    """Domain-adversarial adaptation to unlabelled target-domain data (classification/regression runs)."""
    task: Literal["causal_lm", "classification", "regression"] = "causal_lm"
    """classification / regression: LoRA + a head on {text, label} rows (README, "Sequence classification and regression")."""
    augment: AugmentConfig | None = None
    """Training-time augmentation of the inputs, new at every epoch (peftlab.data.augment); None: off."""
    preference: PreferenceConfig | None = None
    """Preference fine-tuning (DPO, IPO, robust, ORPO, SimPO, KTO) on pairs / labelled completions; None: off."""

    # Where relative paths in the recipe are resolved from (the recipe file's directory).
    base_dir: str = Field(".", exclude=True)

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_is_json(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".json") and shipped_deepspeed_config(v) is None:
            raise ValueError("expected the path of a DeepSpeed JSON config, or the name of one shipped with peftlab: "
                             f"{', '.join(shipped_deepspeed_configs())} (e.g. deepspeed: zero2)")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> Recipe:
        if self.quantization.mode != "none" and self.model.dtype == "float16" and self.train.device == "cpu":
            raise ValueError(
                f"quantization.mode={self.quantization.mode} with model.dtype=float16 on train.device=cpu: "
                "bitsandbytes' CPU path computes in float32 or bfloat16; set model.dtype to float32, "
                "bfloat16 or auto"
            )
        if self.adapter.dora and self.kernels == "triton":
            raise ValueError(
                "adapter.dora=true with kernels=triton: the fused QLoRA kernel does not implement DoRA; "
                "set kernels to auto (DoRA layers then use the PyTorch path) or torch"
            )
        if self.train.fused_norm and self.kernels == "off":
            raise ValueError("train.fused_norm=true with kernels=off: the fused RMSNorm is a fused kernel; set "
                             "train.fused_norm: false or kernels: auto")
        if self.train.fused_blocks and (self.kernels == "off" or self.adapter.dora):
            raise ValueError("train.fused_blocks=true with kernels=off or adapter.dora=true: the fused blocks are "
                             "fused kernels and do not implement DoRA; set train.fused_blocks: false")
        if self.train.fused_blocks and self.adapter.dropout > 0 and not self.adapter.init_from:
            raise ValueError(f"train.fused_blocks=true with adapter.dropout={self.adapter.dropout}: layers with LoRA "
                             "dropout keep the per-module path, so nothing would be fused; set adapter.dropout: 0")
        if self.train.offload_activations and not self.model.gradient_checkpointing:
            raise ValueError("train.offload_activations=true offloads the inputs gradient checkpointing keeps; set "
                             "model.gradient_checkpointing: true (or train.offload_activations: false)")
        if self.model.attn_implementation == "flash_attention_2" and self.train.device == "cpu":
            raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
        if self.train.early_stopping is not None and self.train.eval_every is None:
            raise ValueError("train.early_stopping needs train.eval_every (evaluate every N steps), e.g. "
                             "train.eval_every: 50")
        check_dann_combination(self)
        if self.resume is not None and (self.adapter.unfreeze or (self.task != "causal_lm" and self.deepspeed)):
            raise ValueError("resume with adapter.unfreeze, or with task=classification/regression under deepspeed, "
                             "is not supported yet; remove resume (start a fresh run)")
        if self.task != "causal_lm":
            if self.distill is not None or self.data.packing:
                raise ValueError(f"task={self.task} cannot be combined with distill or data.packing; remove them")
            if self.data.label_type == "auto":  # the task decides how labels are read
                self.data.label_type = "class" if self.task == "classification" else "regression"
            elif (self.data.label_type == "class") != (self.task == "classification"):
                raise ValueError(f"task={self.task} with data.label_type={self.data.label_type}: set "
                                 "data.label_type: auto (the task then decides)")
            # the head's cross-entropy / squared error applies none of these: the run would train without them (a
            # model's own final_logit_softcapping belongs to its LM head, which a classifier never reads)
            given = [f"train.loss.{k}={getattr(self.train.loss, k)}" for k in ("softcap", "label_smoothing", "z_loss")
                     if getattr(self.train.loss, k)]
            if given:
                raise ValueError(f"{', '.join(given)} with task: {self.task}: these shape a language model's token "
                                 "logits, and the classification head's loss does not apply them (the run would "
                                 "train without them). Remove them from train.loss")
        check_augment(self)
        check_preference(self)
        loss = self.train.loss
        if self.distill is not None and (loss.label_smoothing or loss.z_loss or loss.softcap):
            raise ValueError(
                "distill with train.loss.label_smoothing/z_loss/softcap: the distillation loss does not "
                "implement them; remove those keys (the teacher's distribution already smooths the targets)"
            )
        return self

    # ---- helpers -------------------------------------------------------------------------------
    def resolve_path(self, p: str | Path) -> Path:
        """A path from the recipe, relative to the recipe file's directory."""
        p = Path(p).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p)

    @property
    def output_dir(self) -> Path:
        return self.resolve_path(self.output.dir)

    def with_local_paths_absolute(self) -> Recipe:
        """A copy whose local paths are absolute, to be written to another folder (the adapter's
        ``peftlab_recipe.yaml``, a sweep's ``best_recipe.yaml``) and still name the same files from there.

        Each path-valued key is made absolute the way peftlab opens it, so the copy loads what this recipe loads:

        - only ever a path on this machine, relative to the recipe's folder: ``output.dir``, ``adapter.init_from``,
          ``deepspeed`` (not the bare name of a shipped config), ``resume`` (not ``auto``), ``distill.cache_dir``, ``distill.teacher.adapter`` — made
          absolute even when missing (an output folder does not exist yet; kept relative, it would move with the
          copy);
        - a file/folder relative to the recipe's folder, or a hub dataset id: the ``path`` of every ``data.train``,
          ``data.eval``, ``dann.target`` and ``dann.target_eval`` source — absolute when it exists there;
        - a hub id, ``builtin:<name>`` or a local model/tokenizer directory, which the loaders open as written (a
          relative directory: from the working directory): ``model.name``, ``model.tokenizer``,
          ``distill.teacher.name``, ``distill.teacher.tokenizer`` — absolute when such a directory exists.

        Hub ids and missing paths stay as written. ``checkpoint.dir`` is relative to ``output.dir`` by definition
        and stays so. ``tests/trainer/test_recipe_rebase.py`` checks every string key of the schema is one of these
        or named there as not a path, so a path key added later cannot be left out silently.
        """
        copy = self.model_copy(deep=True)
        d = copy.distill

        def local(p: str) -> str:
            return str(self.resolve_path(p).resolve())

        def recipe_relative(p: str) -> str:
            found = self.resolve_path(p)
            return str(found.resolve()) if found.exists() else p

        def as_loaded(p: str) -> str:
            found = Path(p).expanduser()
            return str(found.resolve()) if not p.startswith("builtin:") and found.exists() else p

        def deepspeed(p: str) -> str:  # a shipped config's bare name stays a name where no such file is
            return p if shipped_deepspeed_config(p) and not self.resolve_path(p).is_file() else local(p)

        rules = [(copy.output, "dir", local), (copy.adapter, "init_from", local), (copy, "deepspeed", deepspeed),
                 (copy.model, "name", as_loaded), (copy.model, "tokenizer", as_loaded)]
        if copy.resume != "auto":
            rules.append((copy, "resume", local))
        if d is not None:
            rules += [(d, "cache_dir", local), (d.teacher, "adapter", local), (d.teacher, "name", as_loaded),
                      (d.teacher, "tokenizer", as_loaded)]
        sources = [*copy.data.train, *copy.data.eval]
        if copy.dann is not None:
            sources += [*copy.dann.target, *copy.dann.target_eval]
        rules += [(spec, "path", recipe_relative) for spec in sources]
        for owner, key, absolute in rules:
            value = getattr(owner, key)
            if value is not None and absolute(value) != value:
                setattr(owner, key, absolute(value))
        return copy

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, *keys: str) -> str:
        """Stable hash of the named top-level sections (all when none are named)."""
        d = self.to_dict()
        if keys:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def section_model(annotation: Any) -> Any:
    """The BaseModel inside ``X | None`` / ``list[X]`` annotations, else the annotation."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = section_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def reference_markdown() -> str:
    """The recipe reference table (every key, its type and default) — embedded in README.md.

    ``tests/test_readme.py`` checks the README holds exactly this text, so the documentation cannot
    drift from the schema.
    """
    lines = ["| key | type | default |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            key = f"{prefix}{name}"
            sub = section_model(field.annotation)
            is_section = isinstance(sub, type) and issubclass(sub, BaseModel) and sub is not type(None)
            if is_section and (field.is_required() or isinstance(field.default, BaseModel)):
                is_list = "list[" in str(field.annotation)
                lines.append(f"| `{key}` | {'list of ' if is_list else ''}section | "
                             f"{'required' if field.is_required() else ''} |")
                walk(sub, key + ("[]." if is_list else "."))
                continue
            if field.is_required():
                shown = "required"
            else:
                default = field.default if field.default_factory is None else field.default_factory()
                shown = f"`{json.dumps(default)}`"
            typ = _type_name(field.annotation)
            lines.append(f"| `{key}` | {typ} | {shown} |")

    walk(Recipe, "")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    text = re.sub(r"\bpeftlab(\.\w+)*\.(?=[A-Z])", "", text).replace("NoneType", "None")  # bare class names
    return text.replace("|", "\\|")
