"""The target-domain rows of a DANN run (``dann.target`` / ``dann.target_eval``), tokenized like the source rows.

Training rows keep their token ids only: a ``label`` in the target files is read for evaluation and dropped from
every training row here, so no path can carry it into a loss. Evaluation rows (``dann.target_eval``, else the
``dann.target`` rows when every one of them is labelled) get their label mapped through the SOURCE label space
(a target class the source data never had is refused: the head cannot predict it). The objective draws target
rows for each training micro-batch (:mod:`peftlab.objectives.domain_adversarial`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.data.build import sample_id
from peftlab.data.config import DataConfig, DatasetSpec
from peftlab.data.formats import field_value
from peftlab.data.sources import Source, UnreadableRow
from peftlab.data.tokenize import EncodedClass, Encoder
from peftlab.errors import PeftlabError

# Dataset numbers of target rows in sample ids (high 32 bits): far from the source mixture's 0, 1, ...
TARGET_DATASET = 1 << 20
TARGET_EVAL_DATASET = 2 << 20


@dataclass
class TargetData:
    train: list[dict[str, Any]]             # {"input_ids", "sample_id"}: never a label
    eval: list[dict[str, Any]] | None       # {"input_ids", "label", "sample_id"}; None: no labelled target rows
    eval_from: str                          # "dann.target_eval" | "dann.target" | ""
    # per dataset key ("dann.target[0]"): {"path", "rows", "fingerprint"} of its training rows (a resume checks them)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """Content hash of token-only rows (their count and ids, in order): what a resume compares."""
    h = hashlib.sha256(str(len(rows)).encode())
    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        h.update(str(ids.size).encode() + b":" + ids.tobytes())
    return h.hexdigest()[:16]


def _rows(spec: DatasetSpec, key: str, cfg: DataConfig, base_dir: Path | None
          ) -> list[tuple[int, str, str, Any]]:
    """(row index, where, text, label or None) of one target dataset; bad rows raise or are skipped."""
    text_name, label_name = spec.fields.get("text", "text"), spec.fields.get("label", "label")
    out = []
    for row in Source(spec, base_dir):
        problem = None
        if isinstance(row.data, UnreadableRow):
            problem = f"unreadable row: {row.data.problem}"
            text = label = None
        else:
            text, label = field_value(row.data, text_name), field_value(row.data, label_name)
            if not isinstance(text, str) or not text.strip():
                problem = f"field {text_name!r} is missing or not a non-empty string"
        if problem is not None:
            if cfg.on_bad_rows == "skip":
                continue
            raise PeftlabError(f"{row.where}: bad row in {key} ({spec.path}): {problem}. Fix the row, or set "
                               "data.on_bad_rows: skip to leave such rows out")
        out.append((row.index, row.where, text, label))
    if not out:
        raise PeftlabError(f"{key} ({spec.path}) has no usable rows; give target-domain rows {{text, label?}}")
    return out


def _encode(texts: list[str], encoder: Encoder, cfg: DataConfig) -> list[list[int] | None]:
    """Token ids per text, cut to data.max_seq_len (None: left out by data.overlength: drop)."""
    encs = encoder.encode_batch([{"kind": "classification", "text": t, "label": None} for t in texts])
    out: list[list[int] | None] = []
    for enc in encs:
        assert isinstance(enc, EncodedClass)
        ids = enc.input_ids
        if len(ids) > cfg.max_seq_len:
            ids = None if cfg.overlength == "drop" else ids[:cfg.max_seq_len]
        out.append(ids)
    return out


def _label_id(label: Any, where: str, key: str, task: str, label_map: dict[str, int] | None) -> int | float:
    if task == "regression":
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise PeftlabError(f"{where}: {key} label {label!r} is not a number (task: regression)")
        return float(label)
    name = str(label)
    if label_map is None or name not in label_map:
        raise PeftlabError(f"{where}: {key} label {label!r} is not a class of the source data "
                           f"({', '.join(sorted(label_map or {}))}); the head can only predict those. Fix the "
                           "label or leave that row out of the target evaluation")
    return label_map[name]


def build_target_data(dann: Any, cfg: DataConfig, tokenizer: Any, *, task: str,
                      label_map: dict[str, int] | None, base_dir: Path | None) -> TargetData:
    """Read and tokenize ``dann.target`` (training rows, labels dropped) and the labelled target eval rows."""
    encoder = Encoder(tokenizer, template=cfg.template, train_on=cfg.train_on, system_prompt=cfg.system_prompt)
    train: list[dict[str, Any]] = []
    labelled: list[dict[str, Any]] = []
    fingerprints: dict[str, dict[str, Any]] = {}
    all_labelled = True
    for i, spec in enumerate(dann.target):
        key = f"dann.target[{i}]"
        rows = _rows(spec, key, cfg, base_dir)
        first = len(train)
        for (index, where, _, label), ids in zip(rows, _encode([r[2] for r in rows], encoder, cfg)):
            if ids is None:
                continue
            train.append({"input_ids": ids, "sample_id": sample_id(TARGET_DATASET + i, index)})
            if label is None:
                all_labelled = False
            elif all_labelled:
                labelled.append({"input_ids": ids, "label": _label_id(label, where, key, task, label_map),
                                 "sample_id": sample_id(TARGET_DATASET + i, index)})
        fingerprints[key] = {"path": str(spec.path), "rows": len(train) - first,
                             "fingerprint": rows_fingerprint(train[first:])}
    if not train:
        raise PeftlabError("dann.target: every row is longer than data.max_seq_len and overlength: drop left them "
                           "all out; raise data.max_seq_len or set data.overlength: truncate")
    if dann.target_eval:
        evaluated: list[dict[str, Any]] = []
        for j, spec in enumerate(dann.target_eval):
            key = f"dann.target_eval[{j}]"
            rows = _rows(spec, key, cfg, base_dir)
            for (index, where, _, label), ids in zip(rows, _encode([r[2] for r in rows], encoder, cfg)):
                if label is None:
                    raise PeftlabError(f"{where}: {key} row has no label; target eval rows need one (the "
                                       "target accuracy is measured on them)")
                if ids is not None:
                    evaluated.append({"input_ids": ids, "label": _label_id(label, where, key, task, label_map),
                                      "sample_id": sample_id(TARGET_EVAL_DATASET + j, index)})
        return TargetData(train, evaluated or None, "dann.target_eval", fingerprints)
    if all_labelled and labelled:
        return TargetData(train, labelled, "dann.target", fingerprints)
    return TargetData(train, None, "", fingerprints)
