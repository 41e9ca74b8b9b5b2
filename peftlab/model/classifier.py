"""The classifier model: a backbone with LoRA plus peftlab's classification head, and the head's files.

``task: classification | regression`` trains a backbone — a decoder LM (Llama, Qwen, ...) built exactly as for
causal-LM training (:func:`peftlab.model.load.build_model`, so 4-bit loading and PEFT key names are the same),
or an encoder (BERT family: any model type with a masked-LM head) loaded as a bare ``AutoModel`` — and one fp32
linear head on a pooled hidden state: the LAST real token for decoders (the only position that has seen the
whole text under causal attention), the FIRST token ([CLS]) for encoders (bidirectional); classes ->
``num_labels`` logits, regression -> one value. The loss and metrics are
:mod:`peftlab.objectives.classification`.

Files: the LoRA weights are the usual PEFT ``adapter_model.safetensors``; the head is a separate
``classifier_head.safetensors`` (``score.weight``, ``score.bias``) with ``classifier_config.json`` (task,
label names in id order, pooling) beside it — not PEFT's ``modules_to_save``, because the head is peftlab's
own module, not one of the base model's (:mod:`peftlab.model.head_files`). The head is registered on the model
instance (never on its class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from peftlab.errors import PeftlabError
from peftlab.model.head_files import load_module_files, save_module_files
from peftlab.model.load import (
    LoadedModel,
    attach_adapters,
    bnb_config,
    build_model,
    check_weight_files,
    load_model_config,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_path,
)

HEAD_ATTR = "peftlab_head"
HEAD_FILE = "classifier_head.safetensors"
CONFIG_FILE = "classifier_config.json"


class ClassificationHead(nn.Module):
    """Pooled hidden state (B, H) -> logits (B, num_outputs), in fp32 whatever the backbone dtype."""

    def __init__(self, hidden_size: int, num_outputs: int, *, pooling: str, task: str, labels: list[str]):
        super().__init__()
        self.score = nn.Linear(hidden_size, num_outputs, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)
        self.pooling = pooling  # "last" (decoders) | "first" (encoders)
        self.task = task        # "classification" | "regression"
        self.labels = labels    # class names in id order ([] for regression)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled.float())


def is_encoder(config: Any) -> bool:
    """BERT-family checkpoints: a model type with a masked-LM head that is not configured as a decoder."""
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def build_classifier_model(recipe: Any, *, adapter_dir: str | Path | None = None, trainable: bool = True):
    """The backbone with LoRA (a :class:`peftlab.model.load.LoadedModel`); the head is attached separately."""
    path = resolve_model_path(recipe.model.name, revision=recipe.model.revision)
    config = load_model_config(recipe.model.name, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    if not is_encoder(config):
        return build_model(recipe, adapter_dir=adapter_dir, trainable=trainable)
    return _build_encoder(recipe, path, adapter_dir=adapter_dir, trainable=trainable)


def _build_encoder(recipe: Any, path: str, *, adapter_dir: str | Path | None, trainable: bool):
    check_weight_files(recipe.model.name, path)

    device = pick_device(recipe.train.device)
    dtype = pick_dtype(recipe.model.dtype, device)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": recipe.model.revision, "use_safetensors": True,
                              "trust_remote_code": recipe.model.trust_remote_code}
    qcfg = bnb_config(recipe.quantization, dtype)
    if qcfg is not None:
        kwargs.update(quantization_config=qcfg, device_map={"": device})
    try:
        model = AutoModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise PeftlabError(f"could not load the encoder {recipe.model.name!r}: {exc}") from None
    if qcfg is None:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    names = attach_adapters(model, recipe, device, adapter_dir=adapter_dir, trainable=trainable)
    return LoadedModel(model, tokenizer, device, dtype, path, names)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.hidden_size)


def attach_head(model: nn.Module, data: Any, recipe: Any) -> ClassificationHead:
    """Create the head for the data's label space and register it on this model instance (so the engine
    trains it and ``model.to`` moves it); nothing outside the instance changes."""
    if data.task not in ("classification", "regression"):
        raise PeftlabError(f"task: {recipe.task} needs classification rows {{text, label}} in data.train "
                           "(format: classification); the data given are for language modelling")
    if data.task != recipe.task:
        raise PeftlabError(f"task: {recipe.task}, but data.label_type made the labels {data.task}; "
                           "set data.label_type: auto")
    labels = [name for name, _ in sorted((data.label_map or {}).items(), key=lambda kv: kv[1])]
    if data.task == "classification" and len(labels) < 2:
        raise PeftlabError(f"task: classification needs at least 2 classes in the data; found {labels}")
    pooling = "first" if is_encoder(model.config) else "last"
    head = ClassificationHead(_hidden_size(model), len(labels) if data.task == "classification" else 1,
                              pooling=pooling, task=data.task, labels=labels)
    model.add_module(HEAD_ATTR, head.to(next(model.parameters()).device))
    return head


def head_of(model: nn.Module) -> ClassificationHead:
    head = getattr(model, HEAD_ATTR, None)
    if head is None:
        raise PeftlabError("this model has no classification head (recipe task: causal_lm?)")
    return head



def save_head(model: nn.Module, adapter_dir: Path) -> None:
    """Write the head's weights and config beside the adapter (each file atomically)."""
    head = head_of(model)
    cfg = {"task": head.task, "labels": head.labels, "pooling": head.pooling,
           "hidden_size": head.score.in_features, "num_outputs": head.score.out_features}
    save_module_files(head, adapter_dir, weights_file=HEAD_FILE, config_file=CONFIG_FILE, config=cfg)


def load_head(model: nn.Module, adapter_dir: Path, device: torch.device) -> ClassificationHead:
    """Rebuild the head written by :func:`save_head` and register it on ``model``."""
    return load_module_files(model, adapter_dir, attr=HEAD_ATTR, weights_file=HEAD_FILE, config_file=CONFIG_FILE,
                             device=device, what="classification head", build=lambda cfg: ClassificationHead(
                                 cfg["hidden_size"], cfg["num_outputs"], pooling=cfg["pooling"], task=cfg["task"],
                                 labels=cfg["labels"]))
