"""The recipe's ``dann:`` section: domain-adversarial adaptation (Ganin & Lempitsky's DANN) of a classification or
regression run.

A labelled source domain (``data.train``) and an unlabelled target domain (``dann.target``): a domain classifier on
the pooled features learns to tell the domains apart through a gradient-reversal layer, so the backbone learns
features that do not — and the task head trained on source rows carries over to the target. Target labels, when
the files have them, are only ever evaluated (``dann.target_eval``, else the labelled ``dann.target`` rows), never
trained on. The objective is :mod:`peftlab.objectives.domain_adversarial`; the target rows,
:mod:`peftlab.data.target_domain`; the domain head, :mod:`peftlab.model.domain_head`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from peftlab.data.config import DatasetSpec

# Formats a target dataset may be read as: classification rows ({text, label}, the label optional).
_TARGET_FORMATS = ("auto", "classification")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DomainHeadConfig(_Section):
    hidden_size: int = Field(64, gt=0)
    """Width of the domain classifier's hidden layer (pooled features -> hidden -> ReLU -> 1 logit)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate of the domain classifier (its own optimizer group, same schedule); None: train.lr."""


class DannConfig(_Section):
    target: list[DatasetSpec]
    """Target-domain data: classification rows (``text``; a ``label`` is allowed and never trained on)."""
    target_eval: list[DatasetSpec] = []
    """Labelled target rows for the target_* eval metrics; empty: the dann.target rows when all are labelled."""
    head: DomainHeadConfig = DomainHeadConfig()
    schedule: Literal["dann", "constant"] = "dann"
    """Reversal strength λ: ``dann`` = lambda_max x (2/(1+exp(-10p)) - 1), p = step/total steps; ``constant``."""
    lambda_max: float = Field(1.0, ge=0.0)

    @field_validator("target", "target_eval", mode="before")
    @classmethod
    def _specs(cls, v: object) -> object:
        if v is None:
            return []
        if isinstance(v, str):
            return [{"path": v}]
        if isinstance(v, dict):
            return [v]
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("target")
    @classmethod
    def _target_given(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        if not v:
            raise ValueError("dann.target is empty: give the target-domain data (classification rows, labels "
                             "optional), e.g. target: [{path: data/target.jsonl}]")
        return v

    @field_validator("target", "target_eval")
    @classmethod
    def _classification_rows(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        for spec in v:
            if spec.format not in _TARGET_FORMATS:
                raise ValueError(f"format {spec.format} for {spec.path}: target-domain data are classification "
                                 "rows ({text, label}); set format: classification (or leave it out)")
        return v


def check_dann_combination(recipe: Any) -> None:
    """ValueError (the recipe's message) when ``dann`` is set on a run it cannot apply to."""
    if recipe.dann is None:
        return
    if recipe.task == "causal_lm":
        raise ValueError("dann needs task: classification or regression (the domain classifier reads the pooled "
                         "features a classification head uses); language modelling, distillation and preference "
                         "runs have none. Set task: classification, or remove dann")
    if recipe.data.streaming:
        raise ValueError("dann with data.streaming: target rows are drawn from the whole target set at every "
                         "step; set data.streaming: false")
    if recipe.deepspeed is not None:
        raise ValueError("dann with deepspeed is not supported (the domain head's own learning rate and "
                         "checkpoint live in the single-process engine); remove deepspeed")
