"""TRL's DPOTrainer on peftlab's DPO quickstart, for an end-to-end comparison with `peftlab train`.

The setup both sides share (recipes/dpo-quickstart.yaml, moved onto the merged SFT model as the KTO comparison
is): the merged SFT model (runs/quickstart-merged: `peftlab quickstart`, then `peftlab merge --adapter
runs/quickstart/adapter --out runs/quickstart-merged`) in fp32 on the CPU; a fresh LoRA adapter (r 16, alpha 32, all
linear layers, no dropout); the reference is that model with its adapter off, every step (TRL: base model +
peft_config, no ref_model; peftlab: reference: adapters_off); the pairs of recipes/data/preference/train.jsonl
(`python recipes/make_preference_data.py`); DPO sigmoid loss, beta 0.5, + 1.0 x the chosen answers' token-mean NLL
(peftlab sft_weight 1.0 = TRL loss_type [sigmoid, sft], loss_weights [1, 1]); lr 5e-4 cosine, 6 warmup steps
(warmup_ratio 0.03 of 188); batch 16, no accumulation; one epoch; max length 80; seed. The script writes
OUT/recipe.yaml, the recipe of peftlab's side (the quickstart recipe with model, quantization, adapter.init_from
and reference changed, absolute paths), trains TRL's side and saves OUT/adapter, OUT/log_history.json (train logs
every 10 steps, held-out evals at steps 0, 30, 60, ... and at the end) and OUT/summary.json.

Settings aligned with peftlab (TRL 1.16 / transformers 5.24 defaults that differ, and why):
- model and reference: the quickstart recipe trains the nf4 base + the SFT adapter (init_from) against a
  precomputed reference; TRL cannot continue a 4-bit peftlab model, so both sides train a fresh adapter on the merged
  fp32 model and the reference is the merged model (adapter off). With a fresh adapter (B = 0) a precomputed reference
  and adapters_off are the same model; peftlab's side uses adapters_off, as TRL does.
- peft_config with the plain base model, not a PeftModel: KTOTrainer 1.16 ignored a PeftModel handed to it; the
  script checks that the saved adapter's B matrices are non-zero and that the logged rewards moved.
- sampling order: TRL's RandomSampler draws another permutation than peftlab's (data shuffle seeded by
  'shuffle:SEED', then a randperm per epoch seeded SEED*1000003 + epoch); the script builds peftlab's data with
  peftlab's pipeline, takes its epoch-0 order of sample ids (= file rows), reorders the TRL dataset so and sets
  train_sampling_strategy='sequential' (--order trl keeps TRL's own shuffle).
- schedule: HF's warmup is s/warmup at optimizer step s (the first step runs at lr 0); peftlab's is (s+1)/warmup
  (the first step at lr/6), after warmup the two cosines agree. The script gives TRL peftlab's multiplier
  (create_scheduler overridden; --schedule hf keeps HF's).
- optimizer: torch AdamW (optim adamw_torch; the default adamw_torch_fused is the same update), betas (0.9, 0.999),
  eps 1e-8, weight decay 0, gradient clipping at norm 1.0 (peftlab's defaults = HF's).
- precision and speed: bf16=False (DPOConfig defaults to bf16), gradient_checkpointing=False (DPOConfig defaults to
  True; peftlab's recipe has it off), use_cpu, save_strategy no, report_to none.
- truncation: DPOConfig max_length 1024 -> 80 (data.max_seq_len). TRL keeps the first 80 tokens of prompt+answer;
  peftlab cuts the prompt from the left to max_prompt_len (40), then the answers. No pair here is longer than 80
  (the script counts them and says so), so neither rule fires.
- loss averaging: TRL takes the batch mean of the per-pair losses, peftlab sum/pairs of the step: the same without
  accumulation. The sft term is the micro-batch's token mean over chosen tokens in both.
- padding-free: off in TRL 1.16 (falls back to padding), peftlab pads too; right padding in both.
- dropout: TRL's disable_dropout (default True) and lora_dropout 0; peftlab adapter.dropout 0.
- eval: the recipe's held-out pairs (recipes/data/preference/eval.jsonl) every 30 steps, batch 16. TRL averages each
  eval figure over batches (the last batch has 8 pairs), peftlab over pairs: figures can differ in the 3rd digit.
- logged train loss: TRL's 'loss' is the mean over the 10 steps of a log window, peftlab's the loss of the logged
  step; the rewards/logps figures are window means in both.

    OMP_NUM_THREADS=1 .venv/bin/python -P bench/dpo_vs_trl.py --out /tmp/dpo-trl-s42 --seed 42      # TRL's side
    OMP_NUM_THREADS=1 .venv/bin/peftlab train /tmp/dpo-trl-s42/recipe.yaml --set output.dir=/tmp/dpo-pl-s42
    .venv/bin/python -P recipes/preference_style.py /tmp/dpo-trl-s42/recipe.yaml --adapter /tmp/dpo-trl-s42/adapter
    .venv/bin/python -P recipes/preference_style.py /tmp/dpo-trl-s42/recipe.yaml --adapter /tmp/dpo-pl-s42/adapter

Measured 2026-12-02/03 on the 2-core CPU machine (shared with other sessions), one thread per run, one run at a
time; TRL 1.16.0, transformers 5.24.0, peft 0.21.2, torch 2.13 (CPU). 188 steps each. Train figures are 10-step
window means (TRL / peftlab):

    step  rewards/chosen   rewards/rejected   logps/chosen      logps/rejected     (seed 42)
      10   0.011 /  0.011  -0.000 / -0.000   -9.477 / -9.477   -3.656 / -3.656
      30   0.254 /  0.254  -0.027 / -0.027   -8.993 / -8.993   -3.719 / -3.719
      50   0.929 /  0.884  -0.425 / -0.504   -7.764 / -7.853   -4.642 / -4.800
      70   1.436 /  1.564  -0.934 / -1.146   -6.682 / -6.425   -5.583 / -6.007
     100   2.197 /  2.199  -2.717 / -2.594   -5.123 / -5.117   -9.122 / -8.878
     150   2.379 /  2.384  -2.593 / -2.616   -4.677 / -4.666   -8.781 / -8.828
     180   2.366 /  2.366  -2.530 / -2.503   -4.877 / -4.876   -8.838 / -8.784
    rewards/accuracies: 0.900 / 0.900 in the first window (seed 7: 0.894 / 0.894), 1.000 / 1.000 in every later
    one (both seeds). Seed 7's windows part as little (largest at window 80: rewards/rejected -1.912 / -2.113).

    held-out (200 pairs; style/exact/right value: recipes/preference_style.py, 100 prompts)
                         start           seed 42 end         seed 7 end          TRL seed 42, fused AdamW
    eval_loss            3.813 / 3.813   1.545 / 1.539       1.556 / 1.554       1.524
    eval_rewards/chosen  0     / 0       2.405 / 2.415       2.389 / 2.392       2.438
    eval_rewards/rejected 0    / 0      -2.582 / -2.550     -2.546 / -2.541     -2.568
    eval_logps/chosen   -9.484 / -9.486  -4.674 / -4.656     -4.707 / -4.701     -4.608
    eval_logps/rejected -3.639 / -3.641  -8.804 / -8.741     -8.731 / -8.722     -8.775
    eval_rewards/acc     0.0   / 0.0     1.0   / 1.0         1.0   / 1.0         1.0
    style rate           0.00            1.00  / 1.00        1.00  / 1.00        1.00
    exact match          0.00            0.16  / 0.18        0.19  / 0.20        0.20
    right value          0.19            0.16  / 0.18        0.19  / 0.20        0.20
    training time (s)                    331   / 303         214   / 270         (peftlab's includes generating 100
                                                                                  answers at each eval; load varied)
    TRL with its own order and warmup (--order trl --schedule hf, seed 42) ends at the same place: eval_loss 1.549,
    rewards 2.399 / -2.542, logps -4.687 / -8.723, accuracy 1.0, style 1.00, exact match 0.20 (its first windows
    differ: 0.800 accuracy, logps/chosen -9.553 at step 10). The alignments make the steps comparable; the end
    result does not depend on them.

Conclusion: DPO (+ sft) agrees end to end. peftlab draws the same LoRA init as PEFT under the same seed (max |diff|
0 against TRL's init_adapter), so with the aligned order and schedule the two runs start identical and stay so
step by step (per-step logs, seed 7: loss, rewards and logps within 1.2e-6 to step 15 and 6e-5 to step 30, grad
norms within 4e-4) until a gradient spike at step 36 (grad norm 3.18 in TRL, 1.09 in peftlab, both clipped to 1), after which they follow nearby
paths and end at the same place (the table). That parting is rounding, not a difference of method: (1) TRL against
itself with fused AdamW (the same update, other rounding) parts at the same window (31-40) and by as much
(window 70: rewards/rejected -0.934 TRL, -0.966 TRL fused, -1.146 peftlab; window 100: -2.717, -2.536, -2.594);
(2) on TRL's own state after step 35 (--stop-at 35; bit for bit the full run's first 35 steps), peftlab's loss and
LoRA gradients for step 36 equal TRL's (--step-check: loss 3.1387403 / 3.1387408, grad norm 3.17791 / 3.17792, the
spike included; worst relative LoRA-gradient difference 8.0e-6; the collated batches hold the same tokens and
scored positions); with seed 42's final adapter on micro-batch 0: loss 1.4167054 both, worst difference 3.4e-5.
(With a 45-step schedule, lower lr, the per-step logs agree to 3 decimals through step 45, across the step-30
eval.) Nothing suspicious found on peftlab's side.

    # seed 7 with per-step logs; the noise control; the one-step check at the spike
    OMP_NUM_THREADS=1 .venv/bin/python -P bench/dpo_vs_trl.py --out /tmp/dpo-trl-s7 --seed 7 --log-every 1
    OMP_NUM_THREADS=1 .venv/bin/peftlab train /tmp/dpo-trl-s7/recipe.yaml --set output.dir=/tmp/dpo-pl-s7 \
        --set train.log_every=1
    OMP_NUM_THREADS=1 .venv/bin/python -P bench/dpo_vs_trl.py --out /tmp/dpo-trl-s42-fused --optim adamw_torch_fused
    OMP_NUM_THREADS=1 .venv/bin/python -P bench/dpo_vs_trl.py --out /tmp/dpo-trl-s7-35 --seed 7 --stop-at 35
    OMP_NUM_THREADS=1 .venv/bin/python -P bench/dpo_vs_trl.py --out /tmp/dpo-trl-s7-35 --seed 7 \
        --step-check /tmp/dpo-trl-s7-35/adapter --micro-batch 35
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MERGED = ROOT / "runs" / "quickstart-merged"
RECIPE = ROOT / "recipes" / "dpo-quickstart.yaml"
DATA = ROOT / "recipes" / "data" / "preference"


def peftlab_recipe(seed: int) -> dict:
    """recipes/dpo-quickstart.yaml moved onto the merged SFT model (the setup TRL can run), absolute paths."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"] = {"name": str(MERGED)}
    raw["quantization"] = {"mode": "none"}
    raw["adapter"].pop("init_from", None)
    raw["data"]["train"] = [{"path": str(DATA / "train.jsonl")}]
    raw["data"]["eval"] = [{"path": str(DATA / "eval.jsonl")}]
    raw["preference"]["reference"] = "adapters_off"
    raw["train"]["seed"] = seed
    raw["output"] = {"dir": "/tmp/dpo-pl", "overwrite": True}
    return raw


def peftlab_data(recipe_path: Path, tokenizer) -> tuple[list[int], dict[int, dict], int]:
    """File rows of the recipe's train file in the order peftlab's epoch 0 trains them, peftlab's built examples by
    file row, and the number of pairs (train and eval) cut or dropped by peftlab's max_seq_len rule."""
    from peftlab.recipe.parse import load_recipe
    from peftlab.trainer import setup
    from peftlab.trainer.state import build_sampler

    with tempfile.TemporaryDirectory(prefix="pref-order-") as work:
        recipe = load_recipe(recipe_path, overrides=[f"output.dir={work}"])
        data = setup.load_data(recipe, tokenizer)
    sampler = build_sampler(data.train, recipe.train.micro_batch_size, recipe.train.seed)
    order = [i for mb in sampler.epoch_order(0) for i in mb]
    row = lambda e: int(e["sample_id"]) & 0xFFFFFFFF  # peftlab.data.build.sample_id: dataset << 32 | file row
    built = {row(data.train[i]): dict(data.train[i]) for i in range(len(data.train))}
    over = sum(d.truncated + d.dropped for d in data.stats.datasets)
    return [row(data.train[i]) for i in order], built, over


def peftlab_schedule(schedule: str, kind: str) -> type:
    """A mixin for a TRL trainer (``class T(peftlab_schedule(...), DPOTrainer)``): ``schedule`` "peftlab" replaces
    transformers' warmup + ``kind`` schedule with peftlab's (:func:`peftlab.engine.local.lr_lambda`, the first
    warmup step at lr/warmup); "hf" keeps transformers' own."""
    import torch

    from peftlab.engine.local import lr_lambda

    class PeftlabSchedule:
        def create_scheduler(self, num_training_steps, optimizer=None):
            if schedule == "hf" or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lr_lambda(kind, warmup, num_training_steps))
            self._created_lr_scheduler = True
            return self.lr_scheduler

    return PeftlabSchedule


def trl_config(raw: dict, out: Path, **kw):
    """DPOConfig of the recipe's settings (the alignments of the module docstring); ``kw`` overrides."""
    from trl import DPOConfig

    pref, tr = raw["preference"], raw["train"]
    loss_type, loss_weights = ["sigmoid"], [1.0]
    if pref.get("sft_weight"):
        loss_type, loss_weights = ["sigmoid", "sft"], [1.0, float(pref["sft_weight"])]
    settings = {
        "output_dir": str(out / "trainer"), "beta": pref["beta"], "loss_type": loss_type,
        "loss_weights": loss_weights, "max_length": raw["data"]["max_seq_len"],
        "per_device_train_batch_size": tr["micro_batch_size"], "per_device_eval_batch_size": tr["micro_batch_size"],
        "gradient_accumulation_steps": tr["grad_accum"], "learning_rate": tr["lr"],
        "warmup_steps": tr["warmup_ratio"], "lr_scheduler_type": "cosine", "num_train_epochs": tr["epochs"],
        "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0, "train_sampling_strategy": "sequential", "logging_steps": tr["log_every"],
        "eval_strategy": "steps", "eval_steps": tr["eval_every"], "report_to": [], "seed": tr["seed"],
        "use_cpu": True, "save_strategy": "no", "bf16": False, "gradient_checkpointing": False,
        "precompute_ref_log_probs": False, "disable_dropout": True}
    settings.update(kw)
    return DPOConfig(**settings)


def lora_config(raw: dict):
    from peft import LoraConfig

    ad = raw["adapter"]
    return LoraConfig(r=ad["r"], lora_alpha=ad["alpha"], lora_dropout=ad["dropout"],
                      target_modules=ad["target_modules"], task_type="CAUSAL_LM")


def _lora_name(name: str) -> str:
    """``layers.3.mlp.up_proj.lora_A`` from PEFT's and peftlab's parameter names."""
    m = re.search(r"layers\.\d+\.\w+\.\w+\.lora_[AB]", name.replace(".default", ""))
    return m.group(0) if m else name


def step_check(raw: dict, recipe_path: Path, order: list[int], rows: list[dict], adapter: Path, k: int,
               tok) -> dict:
    """One step on micro-batch ``k`` of peftlab's order with ``adapter`` loaded on both sides: the collated
    batches, losses, figures and LoRA gradients of TRL's DPOTrainer and peftlab's objective."""
    import torch
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from peftlab.recipe.parse import load_recipe
    from peftlab.trainer.loop import Trainer

    mbs = raw["train"]["micro_batch_size"]
    sel = order[k * mbs:(k + 1) * mbs]
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as work:
        ds = Dataset.from_list([{c: rows[i][c] for c in ("prompt", "chosen", "rejected")} for i in sel])
        model = AutoModelForCausalLM.from_pretrained(MERGED, dtype=torch.float32)
        trl = DPOTrainer(model=model, args=trl_config(raw, Path(work), eval_strategy="no"), train_dataset=ds,
                         processing_class=tok, peft_config=lora_config(raw))
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        if set_peft_model_state_dict(trl.model, weights).unexpected_keys:
            raise SystemExit(f"{adapter}: keys TRL's model does not have")
        batch = trl.data_collator([trl.train_dataset[i] for i in range(len(sel))])
        trl.model.train()
        loss_t = trl.compute_loss(trl.model, batch)
        loss_t.backward()
        m = trl._metrics["train"]
        fig_t = {f: m[f][-1] for f in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}
        g_t = {_lora_name(n): p.grad for n, p in trl.model.named_parameters() if p.grad is not None}

        recipe = load_recipe(recipe_path, overrides=[f"adapter.init_from={adapter}", f"output.dir={work}/peftlab",
                                                     "train.max_steps=1"])
        pl = Trainer(recipe, quiet=True)
        index = {int(e["sample_id"]) & 0xFFFFFFFF: i for i, e in enumerate(pl.data.train)}
        b = pl.batch([index[i] for i in sel])
        same = True
        for r in range(2 * len(sel)):  # the same tokens, the same scored positions (the labels)
            at, ap = batch["attention_mask"][r].bool(), b["attention_mask"][r].bool()
            ids_t, ids_p = batch["input_ids"][r][at].tolist(), b["input_ids"][r][ap].tolist()
            lab_t = [t if c else -100 for t, c in zip(ids_t, batch["completion_mask"][r][at].tolist())]
            same = same and ids_t == ids_p and lab_t == b["labels"][r][ap].tolist()
        pl.model.train()
        obj = pl.objective
        loss_p = obj.loss(pl.model, b, normalizer=obj.normalizer(b))
        loss_p.backward()
        fig_p = {f: v for f, v in obj._window.means(reduce=False).items() if f in fig_t}
        g_p = {_lora_name(n): p.grad for n, p in pl.model.named_parameters() if p.grad is not None}
    if set(g_t) != set(g_p):
        raise SystemExit(f"LoRA gradients of other modules: TRL {sorted(set(g_t) - set(g_p))[:3]}, "
                         f"peftlab {sorted(set(g_p) - set(g_t))[:3]}")
    worst = max(float((g_t[n] - g_p[n]).norm() / g_t[n].norm().clamp(min=1e-12)) for n in g_t)

    def norm(g: dict) -> float:
        return float(torch.linalg.vector_norm(torch.stack([v.norm() for v in g.values()])))

    return {"micro_batch": k, "rows": sel, "batches_equal": same, "loss": [float(loss_t), float(loss_p)],
            "figures": {f: [fig_t[f], fig_p.get(f)] for f in fig_t}, "grad_norm": [norm(g_t), norm(g_p)],
            "lora_tensors": len(g_t), "worst_relative_grad_diff": worst}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--order", choices=("peftlab", "trl"), default="peftlab",
                    help="peftlab: train the rows in peftlab's epoch order; trl: TRL's own shuffle")
    ap.add_argument("--schedule", choices=("peftlab", "hf"), default="peftlab",
                    help="warmup multiplier (s+1)/w (peftlab) or s/w (HF)")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (the schedule's length)")
    ap.add_argument("--optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch",
                    help="adamw_torch_fused: the same update with another rounding (a run-to-run noise control)")
    ap.add_argument("--stop-at", type=int, help="stop after this step, the schedule unchanged (saves that adapter: for "
                    "a one-step comparison at a given state)")
    ap.add_argument("--log-every", type=int, help="train log window (default: the recipe's train.log_every)")
    ap.add_argument("--step-check", type=Path, metavar="ADAPTER",
                    help="no training: one step on micro-batch --micro-batch of peftlab's order with this adapter, "
                    "TRL against peftlab (batch, loss, figures, LoRA gradients)")
    ap.add_argument("--micro-batch", type=int, default=0, help="with --step-check: 0-based (step k+1 of the run)")
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer


    args.out.mkdir(parents=True, exist_ok=True)
    raw = peftlab_recipe(args.seed)
    recipe_path = args.out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    tr = raw["train"]

    tok = AutoTokenizer.from_pretrained(MERGED)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in (DATA / "train.jsonl").open()]
    eval_rows = [json.loads(line) for line in (DATA / "eval.jsonl").open()]
    order, over = list(range(len(rows))), None
    if args.order == "peftlab" or args.step_check:
        order, _, over = peftlab_data(recipe_path, tok)
        if sorted(order) != list(range(len(rows))):
            raise SystemExit(f"peftlab trains {len(order)} of {len(rows)} rows: the orders cannot be aligned")
    if args.step_check:
        print(json.dumps(step_check(raw, recipe_path, order, rows, args.step_check, args.micro_batch, tok), indent=1))
        return
    keys = ("prompt", "chosen", "rejected")
    data = Dataset.from_list([{k: rows[i][k] for k in keys} for i in order])
    eval_data = Dataset.from_list([{k: r[k] for k in keys} for r in eval_rows])

    class AlignedDPOTrainer(peftlab_schedule(args.schedule, tr.get("scheduler", "cosine")), DPOTrainer):
        pass

    class StopAt(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if args.stop_at and state.global_step >= args.stop_at:
                control.should_training_stop = True

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(MERGED, dtype=torch.float32)
    cfg = trl_config(raw, args.out, max_steps=args.max_steps, optim=args.optim,
                     train_sampling_strategy="sequential" if args.order == "peftlab" else "random",
                     logging_steps=args.log_every or tr["log_every"])
    trainer = AlignedDPOTrainer(model=model, args=cfg, train_dataset=data, eval_dataset=eval_data,
                                processing_class=tok, peft_config=lora_config(raw), callbacks=[StopAt()])
    if len(trainer.train_dataset) != len(rows):
        raise SystemExit(f"TRL dropped {len(rows) - len(trainer.train_dataset)} pairs (prompt >= max_length)")
    # The starting adapter (A random, B = 0). peftlab draws the very same one under the same seed (checked: max
    # |difference| 0); kept so that a run can also start from it explicitly (adapter.init_from).
    trainer.model.save_pretrained(str(args.out / "init_adapter"))
    before = trainer.evaluate()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    final = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    after = final[-1] if final else trainer.evaluate()  # the Trainer may have evaluated the last step already
    trainer.save_model(str(args.out / "adapter"))
    history = [{"step": 0, **before}, *trainer.state.log_history]
    (args.out / "log_history.json").write_text(json.dumps(history, indent=1))

    b_norm = max(float(p.detach().norm()) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    logged = [h for h in trainer.state.log_history if "rewards/chosen" in h and "eval_loss" not in h]
    moved = any(abs(h["rewards/chosen"]) > 1e-6 for h in [*logged, after] if "rewards/chosen" in h) or \
        abs(after.get("eval_rewards/chosen", 0.0)) > 1e-6
    if b_norm == 0.0 or not moved:
        raise SystemExit(f"TRL did not train the adapter (max |lora_B| {b_norm}, rewards moved: {moved})")
    summary = {"train_s": train_s, "order": args.order, "schedule": args.schedule, "seed": args.seed,
               "pairs_over_max_length": over, "max_lora_B_norm": b_norm, "eval_before": before, "eval_after": after,
               "last_train_log": logged[-1] if logged else None}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
