"""Sequence classification and regression: LoRA adapters plus a small head on a decoder or an encoder.

``task: classification`` (or ``regression``) with ``classification``-format data ({text, label}):

- the backbone is the recipe's model with LoRA injected: a decoder LM (Llama, Qwen, ...) built exactly
  as for causal-LM training (:func:`peftlab.models.build_model`, so 4-bit loading and PEFT key names are
  the same), or an encoder (BERT family: any model type with a masked-LM head) loaded as a bare
  ``AutoModel``;
- the head is one fp32 linear layer on a pooled hidden state: the LAST real token for decoders (the
  only position that has seen the whole text under causal attention), the FIRST token ([CLS]) for
  encoders (bidirectional); classes -> ``num_labels`` logits, regression -> one value;
- loss: cross-entropy (classification) or squared error (regression) per row, weighted by the row's
  sample weight and divided by the summed weights of the step (as for language modelling);
- eval: accuracy, macro precision / recall, macro and micro F1 and the confusion matrix (rows = true
  class, columns = predicted, classes in label-map order; macro averages run over every class of the
  label map) — or MSE / MAE / R² for regression.

Files: the LoRA weights are the usual PEFT ``adapter_model.safetensors``; the head is a separate
``classifier_head.safetensors`` (``score.weight``, ``score.bias``) with ``classifier_config.json``
(task, label names in id order, pooling) beside it — not PEFT's ``modules_to_save``, because the head
is peftlab's own module, not one of the base model's. ``peftlab predict ADAPTER_DIR --input X.jsonl``
reloads both and writes one JSON line per input row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError

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
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def build_classifier_model(recipe: Any, *, adapter_dir: str | Path | None = None, trainable: bool = True):
    """The backbone with LoRA (a :class:`peftlab.models.LoadedModel`); the head is attached separately."""
    from peftlab.model.load import build_model, load_model_config, resolve_model_path

    path = resolve_model_path(recipe.model.name, revision=recipe.model.revision)
    config = load_model_config(recipe.model.name, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    if not is_encoder(config):
        return build_model(recipe, adapter_dir=adapter_dir, trainable=trainable)
    return _build_encoder(recipe, path, adapter_dir=adapter_dir, trainable=trainable)


def _build_encoder(recipe: Any, path: str, *, adapter_dir: str | Path | None, trainable: bool):
    from transformers import AutoModel

    from peftlab.model.load import (
        LoadedModel,
        attach_adapters,
        bnb_config,
        check_weight_files,
        load_tokenizer,
        pick_device,
        pick_dtype,
    )

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


def pooled_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H): the last real token's hidden state (decoders, right padding) or the first token's (encoders)."""
    from peftlab.objectives.causal_lm import final_hidden_states

    head = head_of(model)
    if head.pooling == "first":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state[:, 0]
    hidden = final_hidden_states(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    last = batch["attention_mask"].sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return head_of(model)(pooled_hidden(model, batch))


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return (logits.squeeze(-1) - labels.float()).square()
    return F.cross_entropy(logits, labels, reduction="none")


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float,
                        settings: Any = None) -> torch.Tensor:
    """Σ over rows of weight x (cross-entropy | squared error), divided by ``normalizer`` (the step's
    summed row weights): the trainer's loss seam for ``task: classification | regression``."""
    losses = per_row_loss(logits_of(model, batch), batch["labels"], head_of(model).task)
    weights = batch.get("loss_weights")
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.sum() / normalizer


# ---- metrics -------------------------------------------------------------------------------------


def classification_metrics(y_true: list[int], y_pred: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, micro F1 and the confusion matrix over classes 0..K-1.

    Same definitions as scikit-learn with ``labels=range(K)`` and ``zero_division=0`` (a class never
    predicted has precision 0; never present, recall 0)."""
    cm = torch.zeros((num_labels, num_labels), dtype=torch.long)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    tp = cm.diag().double()
    pred_n, true_n = cm.sum(0).double(), cm.sum(1).double()
    precision = torch.where(pred_n > 0, tp / pred_n.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_n > 0, tp / true_n.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    n = max(1, len(y_true))
    accuracy = float(tp.sum()) / n
    return {"accuracy": accuracy, "precision": float(precision.mean()), "recall": float(recall.mean()),
            "f1_macro": float(f1.mean()), "f1_micro": accuracy,  # single-label: micro P = R = F1 = accuracy
            "confusion_matrix": cm.tolist()}


def regression_metrics(y_true: list[float], y_pred: list[float]) -> dict[str, Any]:
    t = torch.tensor(y_true, dtype=torch.float64)
    p = torch.tensor(y_pred, dtype=torch.float64)
    mse = float((p - t).square().mean())
    var = float((t - t.mean()).square().sum())
    r2 = 1.0 - float((p - t).square().sum()) / var if var > 0 else float("nan")
    return {"mse": mse, "mae": float((p - t).abs().mean()), "r2": r2}


@torch.no_grad()
def predict_batches(model: nn.Module, batches) -> tuple[torch.Tensor, list[Any]]:
    """(logits of every row, labels when the batches carry them)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for b in batches:
            outs.append(logits_of(model, b).cpu())
            if "labels" in b:
                labels += b["labels"].tolist()
    finally:
        model.train(was_training)
    return torch.cat(outs), labels


def evaluate_classifier(model: nn.Module, batches, *, task: str, label_map: dict[str, int] | None) -> dict[str, Any]:
    """Eval metrics of a classification/regression run (empty without eval data)."""
    if not batches:
        return {}
    logits, labels = predict_batches(model, batches)
    y = torch.tensor(labels, dtype=torch.float32 if task == "regression" else torch.long)
    loss = float(per_row_loss(logits, y, task).mean())
    if task == "regression":
        metrics = regression_metrics(labels, logits.squeeze(-1).tolist())
    else:
        metrics = classification_metrics(labels, logits.argmax(-1).tolist(), len(label_map or {}))
    return {"eval_loss": loss, **metrics, "eval_samples": len(labels)}


# ---- files and inference -------------------------------------------------------------------------


def save_head(model: nn.Module, adapter_dir: Path) -> None:
    from safetensors.torch import save_file

    head = head_of(model)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(Path(adapter_dir) / HEAD_FILE))
    cfg = {"task": head.task, "labels": head.labels, "pooling": head.pooling,
           "hidden_size": head.score.in_features, "num_outputs": head.score.out_features}
    (Path(adapter_dir) / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def load_classifier(adapter_dir: str | Path, *, device: str | None = None, trust_remote_code: bool = False):
    """(LoadedModel with LoRA and head, recipe) from an adapter dir written by a classification run (its
    recipe read as untrusted input: remote code only with ``trust_remote_code``)."""
    from safetensors.torch import load_file

    from peftlab.recipe.schema import load_adapter_recipe

    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file() or not (d / "peftlab_recipe.yaml").is_file():
        raise PeftlabError(f"{d} is not a classification adapter (no {CONFIG_FILE} / peftlab_recipe.yaml); "
                           "pass the adapter/ or best/ directory of a task: classification run")
    overrides = [f"train.device={device}"] if device else []
    recipe = load_adapter_recipe(d, overrides, trust_remote_code=trust_remote_code)
    loaded = build_classifier_model(recipe, adapter_dir=d, trainable=False)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    head = ClassificationHead(cfg["hidden_size"], cfg["num_outputs"], pooling=cfg["pooling"], task=cfg["task"],
                              labels=cfg["labels"])
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    loaded.model.add_module(HEAD_ATTR, head.to(loaded.device))
    loaded.model.eval()
    return loaded, recipe


def predict_file(adapter_dir: str | Path, input_path: str | Path, output_path: str | Path, *,
                 text_field: str = "text", batch_size: int = 16, device: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """Classify every row of a JSONL file; writes the row plus ``label``/``label_id``/``probs`` (or
    ``prediction`` for regression) per line. Returns the number of rows."""
    from peftlab.data import collate
    from peftlab.data.build import pad_token_id_for
    from peftlab.data.tokenize import Encoder

    loaded, recipe = load_classifier(adapter_dir, device=device, trust_remote_code=trust_remote_code)
    rows = []
    for i, line in enumerate(Path(input_path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"{input_path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise PeftlabError(f"{input_path}:{i}: expected an object with a string field {text_field!r} "
                               "(choose another with --text-field)")
        rows.append(row)
    encoder = Encoder(loaded.tokenizer, template=recipe.data.template)
    head = head_of(loaded.model)
    pad = pad_token_id_for(loaded.tokenizer)
    out_path = Path(output_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            encs = encoder.encode_batch([{"kind": "classification", "text": r[text_field], "label": 0}
                                         for r in chunk])
            examples = [{"input_ids": e.input_ids[:recipe.data.max_seq_len], "label": 0, "sample_id": start + k}
                        for k, e in enumerate(encs)]
            batch = collate(examples, pad_token_id=pad)
            batch = {k: v.to(loaded.device) for k, v in batch.items()}
            logits, _ = predict_batches(loaded.model, [batch])
            for row, lg in zip(chunk, logits):
                if head.task == "regression":
                    row = {**row, "prediction": float(lg[0])}
                else:
                    probs = lg.softmax(-1)
                    k = int(probs.argmax())
                    row = {**row, "label": head.labels[k], "label_id": k,
                           "probs": {name: round(float(p), 6) for name, p in zip(head.labels, probs)}}
                f.write(json.dumps(row) + "\n")
    return len(rows)


def evaluate_adapter_dir(adapter_dir: str | Path, recipe: Any) -> dict[str, Any]:
    """``peftlab eval`` for a classification adapter: its head + LoRA on the recipe's eval data."""
    from peftlab.data import build_data, collate

    adapter_dir = Path(adapter_dir)
    loaded, _ = load_classifier(adapter_dir, trust_remote_code=recipe.model.trust_remote_code)
    data = build_data(recipe.data, loaded.tokenizer, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    if not data.eval:
        raise PeftlabError("peftlab eval: the recipe has no eval data (data.eval or data.eval_split)")
    head = head_of(loaded.model)
    labels = [name for name, _ in sorted((data.label_map or {}).items(), key=lambda kv: kv[1])]
    if head.task == "classification" and labels != head.labels:
        raise PeftlabError(f"the eval data's classes {labels} differ from the classes the adapter {adapter_dir} "
                           f"was trained on {head.labels}; evaluate on data with the same label set")
    bs = recipe.train.micro_batch_size
    batches = []
    for i in range(0, len(data.eval), bs):
        b = collate(data.eval[i:i + bs], pad_token_id=data.pad_token_id)
        b.pop("loss_weights", None)
        batches.append({k: v.to(loaded.device) for k, v in b.items()})
    return evaluate_classifier(loaded.model, batches, task=head.task, label_map=data.label_map)
