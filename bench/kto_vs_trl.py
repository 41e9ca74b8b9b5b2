"""TRL's KTOTrainer on peftlab's KTO quickstart, for an end-to-end comparison with `peftlab train`.

Same merged SFT model (runs/quickstart-merged: `peftlab quickstart` then `peftlab merge --adapter
runs/quickstart/adapter --out runs/quickstart-merged`), same rows (recipes/data/kto/train.jsonl, from
`python recipes/make_preference_data.py`), same LoRA (r 16, alpha 32, all linear layers, no dropout), lr 5e-4 cosine
with 6 warmup steps, batch 16, beta 0.1, one epoch, seed; the reference is the model with its adapter off, as in
recipes/kto-quickstart.yaml. Score the saved adapter with
`python recipes/preference_style.py recipes/kto-quickstart.yaml --adapter OUT/adapter`.

    OMP_NUM_THREADS=1 python bench/kto_vs_trl.py --undesirable-weight 1.0 --out /tmp/kto-trl --seed 42
    peftlab train recipes/kto-quickstart.yaml --set preference.undesirable_weight=1.0   # peftlab's side

    OMP_NUM_THREADS=1 python bench/kto_vs_trl.py --out /tmp/kto-trl-o1 --row-order-seed 1   # another data order

Figures (2026-12-02/03) are in README.md, "KTO against TRL end to end"; bench/kto_lockstep_vs_trl.py runs both
engines on the same batches from the same starting LoRA.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--undesirable-weight", type=float, default=1.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--row-order-seed", type=int, default=None,
                    help="permute the file's rows with this seed first (TRL's KTO trains in dataset order)")
    ap.add_argument("--log-history", type=Path, default=None, help="write TRL's log history (JSON) here")
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(args.seed)
    model_dir = ROOT / "runs" / "quickstart-merged"
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "kto" / "train.jsonl").open()]
    if args.row_order_seed is not None:
        random.Random(args.row_order_seed).shuffle(rows)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")} for r in rows])
    cfg = KTOConfig(output_dir=str(args.out), beta=0.1, desirable_weight=1.0,
                    undesirable_weight=args.undesirable_weight, max_length=80, per_device_train_batch_size=16,
                    gradient_accumulation_steps=1, learning_rate=5e-4, warmup_steps=6, num_train_epochs=1,
                    lr_scheduler_type="cosine", logging_steps=10, report_to=[], seed=args.seed, use_cpu=True,
                    save_strategy="no", bf16=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = KTOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(str(args.out / "adapter"))
    logged = [h for h in trainer.state.log_history if "logps/chosen" in h]
    if args.log_history is not None:
        args.log_history.write_text(json.dumps(trainer.state.log_history))
    print(json.dumps({"train_s": time.perf_counter() - t0, "last": logged[-1] if logged else None}))


if __name__ == "__main__":
    main()
