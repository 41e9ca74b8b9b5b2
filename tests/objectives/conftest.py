"""Fixtures of the distillation tests: quickstart data, a teacher (micro-llama + a seeded random adapter) and a
distillation Trainer of the micro model, built once per test process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer


@pytest.fixture(scope="session")
def kd_data(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("kd-data"), n_train=48, n_eval=16)


@pytest.fixture(scope="session")
def teacher_adapter(tmp_path_factory) -> Path:
    """A teacher that differs from the student's base: micro-llama + a seeded random LoRA adapter."""
    from peftlab.adapters.lora_inject import inject_lora, lora_modules
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.model.load import load_base_model

    model = load_base_model("builtin:micro-llama", dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("teacher") / "adapter"
    save_adapter(model, out, base_model_name_or_path="builtin:micro-llama")
    return out


def distill_recipe(data_dir: Path, out_dir: Path, teacher_adapter: Path, **distill):
    raw = tiny_recipe_dict(data_dir, out_dir)
    raw["distill"] = {"teacher": {"name": "builtin:micro-llama", "adapter": str(teacher_adapter),
                                  "quantization": {"mode": "none"}},
                      "alpha": 0.3, "temperature": 2.0, **distill}
    return recipe_from_dict(raw)


@pytest.fixture(scope="session")
def kd_recipe():
    """:func:`distill_recipe`: ``kd_recipe(data_dir, out_dir, teacher_adapter, **distill)``."""
    return distill_recipe


@pytest.fixture(scope="session")
def kd_trainer(kd_data, teacher_adapter, tmp_path_factory) -> Trainer:
    """An online-distillation Trainer (4-bit micro-llama student, the teacher above); not trained."""
    return Trainer(distill_recipe(kd_data, tmp_path_factory.mktemp("kd-run"), teacher_adapter), quiet=True)
