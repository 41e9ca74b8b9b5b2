"""peftlab's KTO quickstart and TRL's KTOTrainer in lockstep: same batches, same KL pairs, same starting LoRA.

peftlab trains recipes/kto-quickstart.yaml (with --undesirable-weight, --warmup-start, --seed); TRL then trains the
same rows in the order peftlab's seeded sampler drew them (TRL's KTO trains in dataset order and pairs each row's
KL completion with the previous row of its batch, so both see the same micro-batches and KL pairs), starting from
peftlab's initial LoRA weights, with transformers' warmup (the first step at lr 0: compare with --warmup-start zero).
Prints both per-step curves every 10 steps and saves both adapters (score them with
`python recipes/preference_style.py recipes/kto-quickstart.yaml --adapter OUT/{peftlab,trl}/adapter`). Needs
runs/quickstart-merged (see bench/kto_vs_trl.py). One epoch, 188 steps, twice: ~5 min on one thread.

    OMP_NUM_THREADS=1 python bench/kto_lockstep_vs_trl.py --out /tmp/kto-lockstep --warmup-start zero

Figures (2026-12-03) are in README.md, "KTO against TRL end to end".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_peftlab(args: argparse.Namespace) -> tuple[list[int], dict[int, dict]]:
    from peftlab.recipe.parse import load_recipe
    from peftlab.trainer.loop import Trainer

    recipe = load_recipe(ROOT / "recipes" / "kto-quickstart.yaml", overrides=[
        f"preference.undesirable_weight={args.undesirable_weight}", f"output.dir={args.out / 'peftlab'}",
        "train.eval_every=null", "train.log_every=1", f"train.seed={args.seed}",
        f"train.warmup_start={args.warmup_start}", f"model.name={ROOT / 'runs' / 'quickstart-merged'}"])
    trainer = Trainer(recipe)
    # one dataset: sample_id = the row's line in the file
    drawn = [trainer.data.train[i]["sample_id"] for batch in trainer.sampler.epoch_order(0) for i in batch]
    trainer.save_adapter(args.out / "init")
    trainer.train()
    metrics = [json.loads(line) for line in (args.out / "peftlab" / "metrics.jsonl").open()]
    return drawn, {m["step"]: m for m in metrics if m.get("split") == "train"}


def run_trl(args: argparse.Namespace, drawn: list[int]) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    model_dir = ROOT / "runs" / "quickstart-merged"
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "kto" / "train.jsonl").open()]
    data = Dataset.from_list([{k: rows[i][k] for k in ("prompt", "completion", "label")} for i in drawn])
    cfg = KTOConfig(output_dir=str(args.out / "trl"), beta=0.1, desirable_weight=1.0,
                    undesirable_weight=args.undesirable_weight, max_length=80, per_device_train_batch_size=16,
                    gradient_accumulation_steps=1, learning_rate=5e-4, warmup_steps=6, num_train_epochs=1,
                    lr_scheduler_type="cosine", logging_steps=1, report_to=[], seed=args.seed, use_cpu=True,
                    save_strategy="no", bf16=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = KTOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
    loaded = set_peft_model_state_dict(trainer.model, load_file(str(args.out / "init" / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    trainer.train()
    trainer.save_model(str(args.out / "trl" / "adapter"))
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--undesirable-weight", type=float, default=1.0)
    ap.add_argument("--warmup-start", choices=("zero", "update"), default="zero", help="peftlab's train.warmup_start")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    drawn, ours = run_peftlab(args)
    theirs = run_trl(args, drawn)
    print("step | loss TRL / peftlab | kl TRL / peftlab | logps chosen TRL / peftlab | rejected TRL / peftlab")
    for h in theirs:
        s = h["step"]
        if s in ours and (s <= 5 or s % 10 == 0 or s == len(theirs)):
            m = ours[s]
            print(f"{s:4d} | {h['loss']:.4f} / {m['loss']:.4f} | {h['kl']:.4f} / {m['kl']:.4f} | "
                  f"{h['logps/chosen']:.3f} / {m['logps/chosen']:.3f} | "
                  f"{h['logps/rejected']:.3f} / {m['logps/rejected']:.3f}")


if __name__ == "__main__":
    main()
