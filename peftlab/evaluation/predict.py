"""Predictions and evaluation from a saved classification adapter: ``peftlab predict`` and ``peftlab eval DIR``.

:func:`load_classifier` rebuilds the backbone with its LoRA weights and the head (:mod:`peftlab.model.classifier`)
from an adapter directory a ``task: classification | regression`` run wrote; :func:`predict_file` writes one JSON
line per input row (label, label id and class probabilities, or the predicted value for regression);
:func:`evaluate_adapter_dir` scores the adapter on a recipe's eval data with the training run's metrics
(:func:`peftlab.objectives.classification.evaluate_classifier`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write
from peftlab.data.build import pad_token_id_for
from peftlab.data.collate import collate
from peftlab.data.pipeline import build_data
from peftlab.data.tokenize import Encoder
from peftlab.errors import PeftlabError
from peftlab.model.classifier import CONFIG_FILE, build_classifier_model, head_of, load_head
from peftlab.objectives.classification import evaluate_classifier, predict_batches
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME, load_adapter_recipe


def load_classifier(adapter_dir: str | Path, *, device: str | None = None, trust_remote_code: bool = False):
    """(LoadedModel with LoRA and head, recipe) from an adapter dir written by a classification run (its
    recipe read as untrusted input: remote code only with ``trust_remote_code``)."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file() or not (d / ADAPTER_RECIPE_NAME).is_file():
        raise PeftlabError(f"{d} is not a classification adapter (no {CONFIG_FILE} / {ADAPTER_RECIPE_NAME}); "
                           "pass the adapter/ or best/ directory of a task: classification run")
    overrides = [f"train.device={device}"] if device else []
    recipe = load_adapter_recipe(d, overrides, trust_remote_code=trust_remote_code)
    loaded = build_classifier_model(recipe, adapter_dir=d, trainable=False)
    load_head(loaded.model, d, loaded.device)
    loaded.model.eval()
    return loaded, recipe


def predict_file(adapter_dir: str | Path, input_path: str | Path, output_path: str | Path, *,
                 text_field: str = "text", batch_size: int = 16, device: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """Classify every row of a JSONL file; writes the row plus ``label``/``label_id``/``probs`` (or
    ``prediction`` for regression) per line. Returns the number of rows."""
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

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
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

    atomic_write(out_path, write)  # the output file appears only once every row is predicted
    return len(rows)


def evaluate_adapter_dir(adapter_dir: str | Path, recipe: Any) -> dict[str, Any]:
    """``peftlab eval`` for a classification adapter: its head + LoRA on the recipe's eval data."""
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
