r"""TRL's CPOTrainer (SimPO) and ORPOTrainer on peftlab's preference quickstart, end to end against `peftlab train`.

The setup is bench/dpo_vs_trl.py's (read its docstring): recipes/dpo-quickstart.yaml moved onto the merged SFT model
(runs/quickstart-merged) in fp32 on the CPU, a fresh LoRA adapter (r 16, alpha 32, all linear layers, no dropout),
the pairs of recipes/data/preference/train.jsonl, lr 5e-4 cosine, 6 warmup steps, batch 16, one epoch (188 steps),
max length 80, seed. The method is the README's: peftlab's side is that recipe with the README's overrides

    simpo: --set preference.method=simpo --set preference.sft_weight=0 --set preference.beta=2.0
           --set preference.simpo_gamma=1.0
    orpo:  --set preference.method=orpo --set preference.sft_weight=0 --set preference.beta=0.1     (λ 0.1)

TRL's side: SimPO = trl.experimental.cpo.CPOTrainer, loss_type "simpo", cpo_alpha 0 (CPOConfig's default 1.0 adds
a behaviour-cloning NLL term: that is CPO-SimPO, not SimPO), beta 2.0, simpo_gamma 1.0 (TRL subtracts γ/β inside
β(...): the same margin β(c − r) − γ); ORPO = trl.experimental.orpo.ORPOTrainer, beta 0.1. The script writes
OUT/recipe.yaml (peftlab's recipe, the method overrides included, absolute paths), trains TRL's side and saves
OUT/adapter, OUT/log_history.json and OUT/summary.json.

Settings aligned with peftlab (TRL 1.16 CPOConfig/ORPOConfig and transformers 5.24 defaults that differ):
- model, reference, peft_config: as bench/dpo_vs_trl.py (SimPO and ORPO need no reference).
- learning rate: CPOConfig/ORPOConfig default to 1e-6 -> the recipe's 5e-4; bf16 (default on) -> off;
  gradient_checkpointing (default on) -> off; max_length 1024 -> 80; no pair is longer (counted, printed).
- length normalisation: both trainers use per-token mean log-probs of the completion (CPO: average_log_prob for
  loss_type simpo/ipo; ORPO: always), as peftlab's simpo/orpo do; logps/* and rewards/* (β·mean logps) are
  per-token in both.
- tokens: CPO/ORPO use the legacy tokenize_row (chat template applied to strings, then prompt + answer tokenized;
  BOS/EOS added only if missing). The script checks, row by row, that TRL's prompt and answer tokens and scored
  labels equal the ids peftlab builds (the template already ends the answer with <|eot_id|> = eos, and starts with
  <|begin_of_text|>): it stops if one differs.
- sampling order and warmup: peftlab's epoch-0 order with train_sampling_strategy 'sequential', and peftlab's
  warmup multiplier (s+1)/w (--order trl / --schedule hf keep TRL's), as bench/dpo_vs_trl.py.
- optimizer: adamw_torch, betas (0.9, 0.999), eps 1e-8, weight decay 0, clipping at 1.0; disable_dropout.
- loss averaging: TRL's batch mean of the per-pair losses = peftlab's sum/pairs without accumulation.
- ORPO's NLL term: ORPOTrainer 1.16 takes the cross-entropy over the chosen rows' whole sequence, prompt tokens
  included ("computed over the full prompt and response"); peftlab's over the chosen answers' tokens only (as
  TRL's CPO and DPO 'sft' terms do). --orpo-nll completion gives TRL peftlab's rule (concatenated_forward's NLL
  recomputed from the same chosen logits on the answer labels); --orpo-nll trl (default) keeps TRL's. The
  odds-ratio term is the same in both.
- eval: the held-out pairs every 30 steps, batch 16, TRL's figures are means over batches (the last has 8 pairs),
  peftlab's over pairs (3rd-digit differences). CPO's/ORPO's train figures are 10-step window means, as peftlab's.

    OMP_NUM_THREADS=1 .venv/bin/python -P bench/cpo_vs_trl.py --method simpo --out /tmp/simpo-trl-s42      # TRL
    OMP_NUM_THREADS=1 .venv/bin/peftlab train /tmp/simpo-trl-s42/recipe.yaml --set output.dir=/tmp/simpo-pl-s42
    .venv/bin/python -P recipes/preference_style.py /tmp/simpo-trl-s42/recipe.yaml --adapter /tmp/simpo-trl-s42/adapter
    .venv/bin/python -P recipes/preference_style.py /tmp/simpo-trl-s42/recipe.yaml --adapter /tmp/simpo-pl-s42/adapter
    (orpo: the same with --method orpo and /tmp/orpo-*)

Measured 2026-12-03 on the 2-core CPU machine (shared with other sessions), one thread per run, one run at a
time; TRL 1.16.0, transformers 5.24.0, peft 0.21.2, torch 2.13 (CPU); seed 42, 188 steps each. TRL's tokens equal
peftlab's on every row (checked); no pair exceeds 80 tokens. Held-out figures (200 pairs) at the end (TRL /
peftlab; per-token mean logps; start: chosen -3.127, rejected -1.788, accuracy 0.0 on both sides):

                          SimPO b 2.0 g 1.0       ORPO l 0.1 (TRL's NLL     ORPO, TRL given peftlab's
                                                  on prompt + answer)       NLL on the answer only
    eval_logps/chosen     -3.547 / -3.260         -3.791 / -1.520           -1.519 / -1.520
    eval_logps/rejected   -7.055 / -6.558         -3.575 / -4.316           -4.274 / -4.316
    eval_rewards/acc       1.0   /  1.0            0.159 /  0.995            0.995 /  0.995
    eval_loss              0.004 /  0.005          2.725 /  1.525            1.523 /  1.525
    style rate             0.88  /  1.00           0.00  /  1.00             1.00  /  1.00
    exact match            0.04  /  0.02           0.00  /  0.21             0.18  /  0.21
    right value            0.04  /  0.02           0.05  /  0.21             0.18  /  0.21   (0.19 before)
    greedy, TRL            w. i. w. i.             '\n\nisst \n4' '\n...\n4'  4. 1. w. 1.
    greedy, peftlab        4. i. i. i.             4. 1. w. 1.               4. 1. w. 1.
    training time (s)      122 / 211               119 / 128                 116 / 128
    (peftlab's time includes generating 100 greedy answers at each eval; the machine's load varied)

SimPO, per 10-step window: identical to step 20 (logps -3.104 / -1.847 both), 3rd-digit apart at step 30,
then nearby paths (not traced step by step here; bench/dpo_vs_trl.py traced such a parting to rounding); both reach
accuracy 1.0 by step 60 and end at the table's figures. Neither side degenerates into full stops here: both keep
the chosen answers near their start (-3.5 / -3.3), push the rejected ones down, answer in the chosen style (0.88 /
1.00) and lose the values (right value 0.19 -> 0.04 / 0.02: 'i.', 'w.' for most prompts).

The README's degenerate SimPO run (all full stops) continued the SFT adapter (adapter.init_from, nf4 base). peftlab
on the fp32 base (builtin:tiny-llama, quantization none) continuing the same SFT adapter, SimPO otherwise as above,
degenerates the same way: held-out logps -3.126 -> -7.289 chosen, -1.787 -> -10.382 rejected, accuracy 0.995,
style 0.00, right value 0.00, greedy '....................', 'd...................'. So the full stops come from
continuing the trained SFT adapter (non-zero A and B: another optimisation path from the same starting model), not
from nf4 and not from peftlab's SimPO, which follows TRL's on the fresh-adapter setup TRL can run.

ORPO: TRL 1.16's ORPOTrainer fails on this data: its NLL runs over the whole chosen sequence (prompt ~45 tokens,
answer 2-4), so it learns the prompts (nll 6.87 -> 2.64) and the odds-ratio term (weight 0.1) barely moves
(accuracy 0.16, greedy answers start with newlines). Given peftlab's NLL rule (--orpo-nll completion) it agrees
with peftlab (the table's last column): per-window train logps and nll_loss equal to 3 decimals through step 50
(nll 3.108 / 3.108 at step 10), nearby after, the same end (held-out -1.519 / -1.520 chosen, accuracy 0.995 both,
style 1.00 both, exact match 0.18 / 0.21). peftlab's ORPO = TRL's odds-ratio loss + the answer-only NLL, which is
what the README's ORPO row measured. All figures: seed 42 only (no second seed in the time available).

    OMP_NUM_THREADS=1 .venv/bin/peftlab train /tmp/simpo-trl-s42/recipe.yaml --set output.dir=/tmp/simpo-pl-fp32-init \
        --set model.name=builtin:tiny-llama --set adapter.init_from=runs/quickstart/adapter   # (absolute path)
    OMP_NUM_THREADS=1 .venv/bin/python -P bench/cpo_vs_trl.py --method orpo --orpo-nll completion \
        --out /tmp/orpo-trl-s42-cnll
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import DATA, MERGED, lora_config, peftlab_data, peftlab_recipe, peftlab_schedule

# The README's overrides of each method (the recipe keys peftlab's side trains with).
METHODS = {
    "simpo": {"method": "simpo", "sft_weight": 0, "beta": 2.0, "simpo_gamma": 1.0},
    "orpo": {"method": "orpo", "sft_weight": 0, "beta": 0.1},
}


def check_tokens(trl_rows, rows_in_order: list[int], built: dict[int, dict]) -> None:
    """TRL's tokenized rows hold peftlab's tokens: prompt + answer ids, and labels on the answer only."""
    for k, r in enumerate(rows_in_order):
        t, p = trl_rows[k], built[r]
        for side in ("chosen", "rejected"):
            ids = p["prompt_ids"] + p[f"{side}_ids"]
            labels = [-100] * len(p["prompt_ids"]) + p[f"{side}_labels"]
            if t[f"{side}_input_ids"] != ids or t[f"{side}_labels"] != labels:
                raise SystemExit(f"row {r} ({side}): TRL's tokens {t[f'{side}_input_ids']} / labels "
                                 f"{t[f'{side}_labels']} differ from peftlab's {ids} / {labels}")


def trl_config(method: str, raw: dict, out: Path, **kw):
    """CPOConfig (SimPO) or ORPOConfig of the recipe's settings (the module docstring's alignments)."""
    pref, tr = raw["preference"], raw["train"]
    settings = {
        "output_dir": str(out / "trainer"), "beta": pref["beta"], "max_length": raw["data"]["max_seq_len"],
        "per_device_train_batch_size": tr["micro_batch_size"], "per_device_eval_batch_size": tr["micro_batch_size"],
        "gradient_accumulation_steps": tr["grad_accum"], "learning_rate": tr["lr"],
        "warmup_steps": tr["warmup_ratio"], "lr_scheduler_type": "cosine", "num_train_epochs": tr["epochs"],
        "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0, "train_sampling_strategy": "sequential", "logging_steps": tr["log_every"],
        "eval_strategy": "steps", "eval_steps": tr["eval_every"], "report_to": [], "seed": tr["seed"],
        "use_cpu": True, "save_strategy": "no", "bf16": False, "gradient_checkpointing": False,
        "disable_dropout": True, "remove_unused_columns": False}
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig

        settings.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=pref["simpo_gamma"], label_smoothing=0.0)
        settings.update(kw)
        return CPOConfig(**settings)
    from trl.experimental.orpo import ORPOConfig

    settings.update(kw)
    return ORPOConfig(**settings)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=tuple(METHODS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--order", choices=("peftlab", "trl"), default="peftlab",
                    help="peftlab: train the rows in peftlab's epoch order; trl: TRL's own shuffle")
    ap.add_argument("--schedule", choices=("peftlab", "hf"), default="peftlab",
                    help="warmup multiplier (s+1)/w (peftlab) or s/w (HF)")
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--orpo-nll", choices=("trl", "completion"), default="trl",
                    help="ORPO's NLL term: TRL 1.16's (the chosen rows' prompt + answer tokens) or peftlab's (the "
                    "chosen answer's tokens only)")
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer


    if args.method == "simpo":
        from trl.experimental.cpo import CPOTrainer as Base
    else:
        from trl.experimental.orpo import ORPOTrainer as Base

    args.out.mkdir(parents=True, exist_ok=True)
    raw = peftlab_recipe(args.seed)
    raw["preference"].update(METHODS[args.method])
    raw["output"] = {"dir": f"/tmp/{args.method}-pl", "overwrite": True}
    recipe_path = args.out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    tr = raw["train"]

    tok = AutoTokenizer.from_pretrained(MERGED)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in (DATA / "train.jsonl").open()]
    eval_rows = [json.loads(line) for line in (DATA / "eval.jsonl").open()]
    pl_order, built, over = peftlab_data(recipe_path, tok)
    if sorted(pl_order) != list(range(len(rows))):
        raise SystemExit(f"peftlab trains {len(pl_order)} of {len(rows)} rows: the orders cannot be aligned")
    order = pl_order if args.order == "peftlab" else list(range(len(rows)))
    keys = ("prompt", "chosen", "rejected")
    data = Dataset.from_list([{k: rows[i][k] for k in keys} for i in order])
    eval_data = Dataset.from_list([{k: r[k] for k in keys} for r in eval_rows])

    class Aligned(peftlab_schedule(args.schedule, tr.get("scheduler", "cosine")), Base):
        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            if args.method != "orpo" or args.orpo_nll == "trl":
                return out
            # peftlab's ORPO NLL: the token mean over the chosen answers' scored tokens (labels != -100), the same
            # logits; TRL's is over every attended token of the chosen rows, prompt included.
            logits = out[2]  # ORPOTrainer returns the chosen logits already shifted (all_logits[:B, :-1])
            labels = batch["chosen_labels"].to(logits.device)
            labels = torch.nn.functional.pad(labels, (0, logits.shape[1] + 1 - labels.shape[1]), value=-100)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            return (*out[:4], nll, *out[5:])

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(MERGED, dtype=torch.float32)
    cfg = trl_config(args.method, raw, args.out, max_steps=args.max_steps,
                     train_sampling_strategy="sequential" if args.order == "peftlab" else "random")
    trainer = Aligned(model=model, args=cfg, train_dataset=data, eval_dataset=eval_data, processing_class=tok,
                      peft_config=lora_config(raw))
    check_tokens(trainer.train_dataset, order, built)
    trainer.model.save_pretrained(str(args.out / "init_adapter"))
    before = trainer.evaluate()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    final = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    after = final[-1] if final else trainer.evaluate()
    trainer.save_model(str(args.out / "adapter"))
    history = [{"step": 0, **before}, *trainer.state.log_history]
    (args.out / "log_history.json").write_text(json.dumps(history, indent=1))

    b_norm = max(float(p.detach().norm()) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    logged = [h for h in trainer.state.log_history if "rewards/chosen" in h and "eval_loss" not in h]
    if b_norm == 0.0 or abs(after["eval_logps/chosen"] - before["eval_logps/chosen"]) < 1e-6:
        raise SystemExit(f"TRL did not train the adapter (max |lora_B| {b_norm})")
    summary = {"method": args.method, "orpo_nll": args.orpo_nll, "train_s": train_s, "order": args.order, "schedule": args.schedule,
               "seed": args.seed, "pairs_over_max_length": over, "tokens_equal_peftlab": True,
               "max_lora_B_norm": b_norm, "eval_before": before, "eval_after": after,
               "last_train_log": logged[-1] if logged else None}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
