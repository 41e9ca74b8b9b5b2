"""The recipe's ``preference:`` section: preference fine-tuning (DPO, IPO, robust DPO, ORPO, SimPO, KTO).

Names and defaults are TRL's (``DPOConfig``, ``CPOConfig``/``ORPOConfig``, ``KTOConfig``): ``beta`` 0.1,
``label_smoothing`` 0, ``simpo_gamma`` 0.5, ``desirable_weight`` / ``undesirable_weight`` 1. The reference of
DPO/IPO/robust/KTO is the model itself with its adapters switched off (no second model): computed at every
step (``reference: adapters_off``) or once before training for every row (``precomputed``); ORPO and SimPO
need none. :func:`check_preference` holds the combinations the section cannot judge alone.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("dpo", "ipo", "robust", "orpo", "simpo", "kto")
REFERENCE_FREE = ("orpo", "simpo")


class PreferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["dpo", "ipo", "robust", "orpo", "simpo", "kto"] = "dpo"
    """dpo (sigmoid; cDPO with label_smoothing > 0), ipo, robust (rDPO), orpo, simpo (reference-free), kto
    (unpaired rows {prompt, completion, label})."""
    beta: float = Field(0.1, gt=0)
    """Strength of the KL penalty / reward scale (ORPO: the odds-ratio weight λ; IPO: τ)."""
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    """Probability that a preference label is wrong (cDPO for dpo, rDPO for robust, SimPO's smoothing)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ."""
    desirable_weight: float = Field(1.0, gt=0)
    """KTO: weight of the desirable completions' losses."""
    undesirable_weight: float = Field(1.0, gt=0)
    """KTO: weight of the undesirable completions' losses."""
    sft_weight: float = Field(0.0, ge=0.0)
    """dpo / ipo / robust: weight of an SFT term, the chosen answers' token-mean NLL of the micro-batch, added to
    the loss (RPO; TRL 1.16: ``loss_type: [sigmoid, sft]``, ``loss_weights: [1, sft_weight]``). Keeps the chosen
    answers likely while the margin grows (pure DPO can lower both)."""
    reference: Literal["adapters_off", "precomputed"] = "adapters_off"
    """Reference log-probs: the model with its adapters off at every step, or computed so once before training."""
    max_prompt_len: int | None = Field(None, ge=1)
    """Over-length pairs: tokens the prompt keeps (cut from the left) before the answers are cut; None: half
    of data.max_seq_len."""

    @model_validator(mode="after")
    def _check(self) -> PreferenceConfig:
        if self.method == "robust" and self.label_smoothing >= 0.5:
            raise ValueError("method=robust needs label_smoothing < 0.5 (the probability that a label is flipped)")
        if self.method in ("ipo", "orpo", "kto") and self.label_smoothing:
            raise ValueError(f"label_smoothing has no meaning for method={self.method}; set it to 0 "
                             "(it applies to dpo, robust and simpo)")
        if self.sft_weight and self.method not in ("dpo", "ipo", "robust"):
            raise ValueError(f"sft_weight with method={self.method}: the SFT term is added to dpo, ipo and robust "
                             "(orpo has its own; simpo and kto have none); set it to 0")
        if self.method == "kto" and self.reference == "precomputed":
            raise ValueError("method=kto with reference=precomputed: KTO's KL estimate pairs each prompt with "
                             "another completion of its batch, which changes every epoch; use reference: "
                             "adapters_off")
        return self

    @property
    def mode(self) -> str:
        """``unpaired`` (KTO's labelled completions) or ``pairs`` (every other method)."""
        return "unpaired" if self.method == "kto" else "pairs"

    @property
    def needs_reference(self) -> bool:
        return self.method not in REFERENCE_FREE


def check_preference(recipe: Any) -> None:
    """The recipe-level combinations of ``preference:`` (called from the Recipe's validator); marks the data
    section as preference data so its files are read as pairs (or KTO rows)."""
    pref = recipe.preference
    if pref is None:
        recipe.data.preference = None
        return
    if recipe.task != "causal_lm":
        raise ValueError(f"preference with task={recipe.task}: preference training scores a language model's "
                         "answers; remove task (or the preference section)")
    if recipe.distill is not None:
        raise ValueError("preference with distill: a run learns from preferences or from a teacher, not both; "
                         "remove one of the two sections")
    if recipe.data.packing:
        raise ValueError("preference with data.packing: true: chosen and rejected answers are scored as whole "
                         "sequences, which packing would mix; set data.packing: false")
    if recipe.data.streaming:
        raise ValueError("preference with data.streaming: true is not supported (pairs are read in memory); set "
                         "data.streaming: false")
    if recipe.data.overlength == "split":
        raise ValueError("preference with data.overlength: split: a pair cut into pieces has no meaning; use "
                         "truncate (the prompt is cut from the left first, then the answers) or drop")
    if pref.max_prompt_len is not None and pref.max_prompt_len >= recipe.data.max_seq_len:
        raise ValueError(f"preference.max_prompt_len={pref.max_prompt_len} leaves no room for the answers in "
                         f"data.max_seq_len={recipe.data.max_seq_len}; lower it or raise data.max_seq_len")
    if recipe.adapter.unfreeze and pref.needs_reference:
        raise ValueError(f"preference with adapter.unfreeze: the reference of method={pref.method} is the model "
                         "with its adapters off, and the unfrozen modules would still carry their trained weights "
                         "into it; remove adapter.unfreeze (or use method orpo / simpo, which need no reference)")
    loss = recipe.train.loss
    if loss.label_smoothing or loss.z_loss:
        raise ValueError("preference with train.loss.label_smoothing/z_loss: those shape the next-token loss; "
                         "preference smoothing is preference.label_smoothing. Remove train.loss.label_smoothing "
                         "and train.loss.z_loss")
    recipe.data.preference = {"mode": pref.mode, "max_prompt_len": pref.max_prompt_len}
