"""The recipe's ``data:`` section as pydantic models.

``DataConfig`` is everything that decides which tokens a run trains on; all of it (plus the data
files' content and the tokenizer) goes into the cache key in :mod:`peftlab.data.cache`, so a new
setting added here is automatically part of the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "classification"]


class DatasetSpec(BaseModel):
    """One data source of a mixture."""

    model_config = ConfigDict(extra="forbid")

    path: str
    format: Format = "auto"
    split: str = "train"
    # canonical field name -> name in the data, e.g. {"instruction": "question", "output": "answer"};
    # a name may be a path into nested rows: "data.question", "turns[0].text" (formats.field_value)
    fields: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(1.0, ge=0.0)
    loss_weight: float = Field(1.0, ge=0.0)
    name: str | None = None

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path is empty: give a file, a directory or a hub dataset id")
        return v

    @field_validator("fields")
    @classmethod
    def _field_paths(cls, v: dict[str, str]) -> dict[str, str]:
        from peftlab.data.formats import parse_field_path

        for canon, name in v.items():
            try:
                parse_field_path(name)
            except ValueError as e:
                raise ValueError(f"fields.{canon}: {e}") from None
        return v

    def display_name(self) -> str:
        """``name``, else the file stem (``alpaca_small``), else the hub id."""
        if self.name:
            return self.name
        p = Path(self.path)
        return p.stem if p.suffix else (p.name or self.path)


def _as_specs(v: object) -> object:
    """Accept ``"file.jsonl"``, ``["a.jsonl", {...}]`` and a single mapping besides a list of specs."""
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [{"path": str(v)}]
    if isinstance(v, dict):
        return [v]
    if isinstance(v, list):
        return [{"path": str(x)} if isinstance(x, (str, Path)) else x for x in v]
    return v


# refused by the recipe (and by the stream itself, should a config be changed after validation)
PROPORTIONAL_STREAMING = (
    "data.mixture: proportional gives each dataset a share of the total row count, which data.streaming: true "
    "does not know before the first row is drawn; set data.mixture: scale (dataset weight w draws round(w * rows) "
    "rows: 2 = every row twice, 0.5 = half) or data.streaming: false")


class DataConfig(BaseModel):
    """The ``data:`` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    train: list[DatasetSpec]
    eval: list[DatasetSpec] = Field(default_factory=list)
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    template: str | None = None
    train_on: Literal["assistant", "last_turn", "all"] = "assistant"
    max_seq_len: int = Field(1024, ge=2)
    packing: bool = False
    overlength: Literal["truncate", "drop", "split"] = "truncate"
    on_bad_rows: Literal["error", "skip"] = "error"
    system_prompt: str | None = None
    max_samples: int | None = Field(None, ge=1)
    streaming: bool = False
    num_proc: int = Field(1, ge=1)
    # --- beyond the trainer's contract; all defaulted ---
    # mixture: "scale" draws round(weight * rows) rows of each dataset (weight 2 = every row twice,
    # 0.5 = half of them); "proportional" keeps the total at the sum of the dataset sizes and gives
    # each dataset a share weight_i / sum(weights) of it.
    mixture: Literal["scale", "proportional"] = "scale"
    shuffle: bool = True
    # classification labels: "auto" = strings/bools -> class ids via a label map, numbers -> floats
    label_type: Literal["auto", "class", "regression"] = "auto"
    eval_prompts: int = Field(32, ge=0)  # how many held-out prompts to keep for generation eval
    shuffle_buffer: int = Field(10_000, ge=1)  # streaming: rows held for shuffling and packing
    # The tokenized-data cache directory's size cap, in GB (10**9 bytes) of its entries (data-<key>.pt; nothing else
    # there counts or is removed): after writing a new entry, a run removes the least recently used others until the
    # rest fits (peftlab.data.cache). None, the default, removes nothing, as the HF datasets cache and Axolotl's
    # dataset_prepared_path do: an entry can be hours of tokenization, a sweep reuses each trial's, and the default
    # cache lives in output.dir (it goes with it); set a cap for a shared PEFTLAB_DATA_CACHE or a long sweep. It cannot
    # change the tokens, so it is not part of the cache key (cache.UNKEYED_DATA_FIELDS).
    cache_max_gb: float | None = Field(None, ge=0.0)
    # Set from the recipe's preference: section (not a data key): {"mode": "pairs" | "unpaired", "max_prompt_len"}
    # reads the files as preference data (peftlab.data.preference_build); part of the data cache key.
    preference: dict[str, Any] | None = Field(None, exclude=True)

    @field_validator("train", mode="before")
    @classmethod
    def _train_specs(cls, v: object) -> object:
        return _as_specs(v)

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_specs(cls, v: object) -> object:
        return _as_specs(v)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.train:
            raise ValueError("train: no datasets given; add at least one `- path: ...`")
        if self.eval and self.eval_split > 0:
            raise ValueError("set either eval (separate datasets) or eval_split (held-out fraction), not both")
        if self.streaming and self.mixture == "proportional" and len(self.train) > 1:
            raise ValueError(PROPORTIONAL_STREAMING)
        return self
