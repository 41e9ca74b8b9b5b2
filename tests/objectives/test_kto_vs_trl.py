"""KTO training, several optimizer steps, step for step against TRL's KTOTrainer (the peer whose loss peftlab's
follows; tests/objectives/test_preference_losses.py checks the loss functions alone).

Same model (the built-in micro-llama), same rows in the same micro-batches (TRL trains in file order and pairs each
row's KL completion with the previous row of its batch; the file is written in the order peftlab's seeded sampler
draws, so both see the same batches and KL pairs), same starting LoRA weights (peftlab's, loaded into TRL's
PeftModel), AdamW, cosine schedule with two warmup steps in transformers' convention (``train.warmup_start: zero``,
the first step at lr 0), fp32 on the CPU. The per-step losses, KL estimates and the trained LoRA weights agree.
This is the check that found why the KTO quickstart with equal weights ended differently in the two engines
(README, "KTO against TRL end to end"): not the loss, the warmup's first step.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

trl = pytest.importorskip("trl")

from peftlab.model.builtin import resolve_builtin
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

MBS, STEPS, LR, BETA = 8, 4, 2e-3, 0.1


def _rows(n: int) -> list[dict]:
    """Unpaired KTO rows: a sum answered with a full stop (desirable) or without (undesirable)."""
    rng = random.Random(3)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        good = rng.random() < 0.5
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "completion": [{"role": "assistant", "content": f"{a + b}." if good else f"{a + b}"}],
                     "label": good})
    return rows


def _write(rows: list[dict], path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_kto_trains_step_for_step_like_trls_kto_trainer(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_builtin("builtin:micro-llama")
    rows = _rows(MBS * STEPS)
    _write(rows, tmp_path / "rows.jsonl")
    raw = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "quantization": {"mode": "none"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(tmp_path / "rows.jsonl")}], "max_seq_len": 64},
        "preference": {"method": "kto", "beta": BETA, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                       "reference": "adapters_off"},
        "train": {"max_steps": STEPS, "micro_batch_size": MBS, "grad_accum": 1, "lr": LR, "scheduler": "cosine",
                  "warmup_steps": 2, "warmup_start": "zero", "log_every": 1, "seed": 11, "eval_at_start": False},
        "eval": {"max_prompts": 1, "max_new_tokens": 1},
        "output": {"dir": str(tmp_path / "peftlab"), "report_to": ["jsonl"]},
    }
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    # the rows in the order peftlab's sampler draws them (sample_id = the row's line in the file)
    drawn = [trainer.data.train[i]["sample_id"] for batch in trainer.sampler.epoch_order(0) for i in batch]
    assert sorted(drawn) == list(range(len(rows)))
    trainer.save_adapter(tmp_path / "init")
    result = trainer.train()
    ours = {json.loads(line)["step"]: json.loads(line) for line in (tmp_path / "peftlab" / "metrics.jsonl").open()
            if json.loads(line).get("split") == "train"}

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_list([rows[i] for i in drawn])
    cfg = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, desirable_weight=1.0, undesirable_weight=1.0,
                        max_length=64, per_device_train_batch_size=MBS, gradient_accumulation_steps=1,
                        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=2, max_steps=STEPS,
                        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                        dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peer = trl.KTOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
    loaded = set_peft_model_state_dict(peer.model, load_file(str(tmp_path / "init" / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    peer.train()
    theirs = [h for h in peer.state.log_history if "loss" in h and "step" in h]

    assert [h["step"] for h in theirs] == list(range(1, STEPS + 1)) and sorted(ours) == list(range(1, STEPS + 1))
    assert theirs[0]["learning_rate"] == 0.0 and ours[1]["lr"] == 0.0  # transformers' warmup: the first step at 0
    for h in theirs:
        mine = ours[h["step"]]
        assert mine["loss"] == pytest.approx(h["loss"], rel=1e-4, abs=1e-6), h["step"]
        assert mine["kl"] == pytest.approx(h["kl"], rel=1e-3, abs=1e-6), h["step"]
        assert mine["lr"] == pytest.approx(h["learning_rate"], rel=1e-6, abs=1e-12), h["step"]
    assert any(h["kl"] > 0 for h in theirs)  # the KL reference point took part (it is clamped at 0)
    assert not math.isclose(theirs[-1]["loss"], theirs[0]["loss"], rel_tol=1e-3)  # and the adapters moved

    trained = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    peer_state = {k.replace(".default", ""): v for k, v in peer.model.state_dict().items() if "lora_" in k}
    worst = 0.0
    for key, ref in peer_state.items():
        mine = trained["base_model.model." + key.split("base_model.model.", 1)[1]]
        worst = max(worst, float((mine - ref).norm() / ref.norm().clamp(min=1e-12)))
    assert len(peer_state) == len(trained) and worst < 1e-4
