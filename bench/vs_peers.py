#!/usr/bin/env python3
"""peftlab against the peers a user would pick instead: the same QLoRA fine-tune through each.

Sides (each in its own fresh process, so peak memory is that process's own):

- **peftlab**: ``peftlab.trainer.Trainer`` on a recipe (``kernels: auto``: fused linear
  cross-entropy from hidden states, peftlab's LoRA layers, packing);
- **peft**: transformers ``AutoModelForCausalLM`` + ``BitsAndBytesConfig`` (NF4, double quant) +
  ``peft.prepare_model_for_kbit_training`` + ``LoraConfig(target_modules="all-linear")`` +
  ``trl.SFTTrainer`` with ``SFTConfig(packing=True)`` (BFD packing, padding-free), as TRL documents it;
- **liger** (``--gpu``, when ``liger_kernel`` imports): the same with ``use_liger_kernel=True``;
- **unsloth** (``--gpu``, when ``unsloth`` imports): ``FastLanguageModel`` + the same SFTTrainer.

What makes the two train the same thing (so "the loss curves agree" is a check, not a hope):

- one random bf16 checkpoint of one config (``peftlab.model.quantized_load.save_random_checkpoint``) with the
  tokenizer beside it, loaded by every side in NF4 + double quant (compute fp32 on CPU, bf16 on GPU);
- one initial adapter (LoRA r=16, alpha=32, dropout 0, all linear layers of the decoder; A drawn
  like PEFT's kaiming-uniform and rounded to bf16, B = 0) loaded by both sides: peftlab through
  ``adapter.init_from``, the peer into the PeftModel SFTTrainer builds;
- identical token ids and targets: Alpaca rows are rendered with the Stanford Alpaca template and
  tokenized ONCE by peftlab's data pipeline; peftlab reads the rows, the peer gets the tokens as a
  pre-tokenized dataset (``input_ids`` + ``completion_mask``, ``completion_only_loss=True``). Both
  train on the response tokens only (each library's default for instruction data);
- full-batch steps: the rows are the first Alpaca rows (seeded shuffle) that best-fit-decreasing
  packs into exactly micro_batch x grad_accum packs of max_seq_len, so every optimizer step is one
  pass over the same rows on both sides, whatever order each library draws them in. With packing
  that keeps samples apart (both do), the step loss does not depend on how samples are grouped;
- constant learning rate, no warm-up, AdamW, gradient clipping 1.0, gradient checkpointing
  (non-reentrant), the step loss is the mean over all target tokens of the step on both sides.

Figures: trained tokens/s (real, non-padding tokens through forward + backward per second; the
target-token rate is the same ratio), median over the steps after ``--warmup``; peak memory (peak
RSS of the side's process on CPU, ``torch.cuda.max_memory_allocated`` on GPU); the loss per step.

    .venv/bin/python -P bench/vs_peers.py --mode all            # CPU: compare + scaling + plot
    .venv/bin/python -P bench/vs_peers.py --gpu --mode all      # GPU: Llama-3.1-8B architecture
    .venv/bin/python -P bench/vs_peers.py --smoke --results-dir /tmp/x   # tiny, < 90 s, no ../shared
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO_ROOT, append_jsonl, print_table, watch

SHARED = REPO_ROOT.parent / "shared" / "data"
NAME = "vs_peers"
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA3_VOCAB = 128256

# Llama-architecture configs (besides the ones read from ../shared/data/configs). "small" is the CPU
# comparison model: ~155M parameters, 131M of them the 128k-vocabulary embedding and head (untied,
# like Llama 3.1 8B), which is where a fused cross-entropy matters.
CONFIGS: dict[str, dict[str, Any]] = {
    "smoke": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    # builtin:tiny-llama's dimensions with the real vocabulary
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 2},
}
TOLERANCE = {"first_step_rel": 1e-4, "curve_rel": 5e-3}  # what "the loss curves agree" means (see agreement())


# ---- setup: checkpoint, initial adapter, data ---------------------------------------------------------------

def llama_config(name: str, vocab_size: int, layers: int | None):
    """A transformers LlamaConfig: a named one from CONFIGS or a config directory (../shared/data/configs/*)."""
    from transformers import AutoConfig, LlamaConfig

    if name in CONFIGS:
        cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=16384, rope_theta=500000.0,
                          tie_word_embeddings=False, **CONFIGS[name])
    else:
        cfg = AutoConfig.from_pretrained(name)
    if layers:
        cfg.num_hidden_layers = layers
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 16384)
    return cfg


def parameter_count(cfg) -> int:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return n * per_layer + emb + h


def write_model_dir(cfg, tokenizer, out: Path) -> Path:
    from peftlab.model.quantized_load import save_random_checkpoint

    save_random_checkpoint(cfg, out, dtype=__import__("torch").bfloat16, seed=0, tokenizer=tokenizer)
    return out


def write_init_adapter(cfg, out: Path, *, r: int, alpha: float, seed: int) -> Path:
    """A PEFT-format adapter both sides start from: A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming-uniform with
    a=sqrt(5)) rounded to bf16 (TRL keeps QLoRA adapters in bf16: both then hold the same values), B = 0."""
    import torch
    from safetensors.torch import save_file

    h, inter = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for mod, (fan_out, fan_in) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            a = (torch.rand(r, fan_in, generator=g) * 2 - 1) / math.sqrt(fan_in)
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16).float()
            tensors[f"{key}.lora_B.weight"] = torch.zeros(fan_out, r)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(m.split(".")[-1] for m in LINEAR), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": False, "base_model_name_or_path": None,
    }, indent=1))
    return out


def load_rows(smoke: bool, data: str) -> tuple[list[dict[str, str]], str]:
    path = Path(data)
    if not smoke and path.exists():
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        biggest = max(files, key=lambda p: p.stat().st_size)
        return json.loads(biggest.read_text()), biggest.name
    from bench_data import generated_rows

    return generated_rows(400, seed=0), "generated"


def data_config(path: Path, max_seq_len: int, packing: bool):
    from peftlab.data.config import DataConfig

    return DataConfig(train=[{"path": str(path), "format": "alpaca"}], template="alpaca", train_on="assistant",
                      max_seq_len=max_seq_len, packing=packing)


def prepare_data(rows: list[dict[str, str]], tokenizer, max_seq_len: int, n_packs: int, out: Path,
                 seed: int) -> dict[str, Any]:
    """Pick the rows of one full-batch step (see the module docstring) and write them for both sides:
    ``rows.json`` (Alpaca rows, read by peftlab) and ``tokens.jsonl`` (the same rows as peftlab tokenizes
    them: input_ids + completion_mask, read by the peer)."""
    from peftlab.data.packing import best_fit_decreasing
    from peftlab.data.pipeline import build_data

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    every = out / "all_rows.json"
    every.write_text(json.dumps(shuffled))
    cfg = data_config(every, 1 << 20, packing=False).model_copy(update={"shuffle": False})
    examples = build_data(cfg, tokenizer, seed=0).train
    by_row = {e["sample_id"] & 0xFFFFFFFF: e for e in examples}
    chosen: list[int] = []
    lengths: list[int] = []
    for row in range(len(shuffled)):
        ex = by_row.get(row)
        if ex is None or len(ex["input_ids"]) > max_seq_len or len(ex["input_ids"]) < 2:
            continue
        n = len(ex["input_ids"])
        if len(best_fit_decreasing([*lengths, n], max_seq_len)) <= n_packs:
            chosen.append(row)
            lengths.append(n)
    if len(best_fit_decreasing(lengths, max_seq_len)) != n_packs:
        raise SystemExit(f"not enough rows to fill {n_packs} packs of {max_seq_len} tokens "
                         f"({sum(lengths)} tokens in {len(chosen)} rows)")
    (out / "rows.json").write_text(json.dumps([shuffled[i] for i in chosen]))
    targets = 0
    with (out / "tokens.jsonl").open("w") as f:
        for row in chosen:
            ex = by_row[row]
            mask = [int(lab != -100) for lab in ex["labels"]]
            targets += sum(mask[1:])  # a sample's first label is never trained (packing's rule, both sides)
            f.write(json.dumps({"input_ids": list(ex["input_ids"]), "completion_mask": mask}) + "\n")
    every.unlink()
    return {"rows": len(chosen), "tokens_per_step": sum(lengths), "targets_per_step": targets,
            "packing_fill": sum(lengths) / (n_packs * max_seq_len), "rows_path": str(out / "rows.json"),
            "tokens_path": str(out / "tokens.jsonl")}


# ---- the sides (run in a child process: python vs_peers.py --worker JOB.json) --------------------------------

class StepClock:
    """Wall time between the ends of consecutive optimizer steps (the first from when training starts)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.last: float | None = None
        self.times: list[float] = []

    def start(self) -> None:
        if self.last is None:
            self.last = time.perf_counter()

    def tick(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - (self.last if self.last is not None else now))
        self.last = now


def run_peftlab(job: dict[str, Any]) -> dict[str, Any]:
    from peftlab.recipe.parse import apply_overrides, recipe_from_dict
    from peftlab.trainer.loop import Trainer

    raw = {
        "model": {"name": job["model_dir"], "gradient_checkpointing": True, "dtype": job["dtype"]},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"r": job["r"], "alpha": job["alpha"], "dropout": 0.0, "init_from": job["adapter_dir"]},
        "data": {"train": [{"path": job["rows_path"], "format": "alpaca"}], "template": "alpaca",
                 "train_on": "assistant", "max_seq_len": job["max_seq_len"], "packing": True},
        "train": {"max_steps": job["steps"], "micro_batch_size": job["micro_batch"], "grad_accum": job["grad_accum"],
                  "lr": job["lr"], "scheduler": "constant", "warmup_steps": 0, "optimizer": "adamw",
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": job["seed"], "device": job["device"],
                  "log_every": 1, "eval_at_start": False},
        "eval": {"metric": "loss"},
        "output": {"dir": job["out_dir"], "report_to": ["jsonl"], "plot": False, "overwrite": True},
        "kernels": "auto",
    }
    raw = apply_overrides(raw, job.get("peftlab_set") or [])  # --peftlab-set KEY=VALUE (e.g. train.host_allocator)
    os.environ["PEFTLAB_DATA_CACHE"] = str(Path(job["out_dir"]) / "data-cache")
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    clock = StepClock(job["device"] == "cuda")
    steps: list[dict[str, Any]] = []
    train_step = trainer.train_step

    def timed_step() -> dict[str, Any]:  # wraps this trainer instance's step only
        clock.start()
        figs = train_step()
        clock.tick()
        steps.append({"loss": float(figs["loss"]), "tokens": int(figs["tokens"]), "targets": int(figs["targets"])})
        return figs

    trainer.train_step = timed_step
    trainer.train()
    return {"step_times": clock.times, "losses": [s["loss"] for s in steps],
            "tokens": [s["tokens"] for s in steps], "targets": [s["targets"] for s in steps]}


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    """HF PEFT + bitsandbytes + TRL SFTTrainer (``side`` peft / liger / unsloth)."""
    side = job["side"]
    if side == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers/trl to patch them)
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = job["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    peft_config = None
    if side == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(job["model_dir"], max_seq_length=job["max_seq_len"],
                                                             dtype=dtype, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=job["r"], lora_alpha=job["alpha"], lora_dropout=0.0,
                                                 target_modules=[m.split(".")[-1] for m in LINEAR], bias="none",
                                                 use_gradient_checkpointing="unsloth", random_state=job["seed"])
    else:
        from peft import LoraConfig, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            job["model_dir"], dtype=dtype, device_map={"": job["device"] if cuda else "cpu"},
            attn_implementation="sdpa",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_config = LoraConfig(r=job["r"], lora_alpha=job["alpha"], lora_dropout=0.0, target_modules="all-linear",
                                 bias="none", task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in Path(job["tokens_path"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    extra = {"use_liger_kernel": True} if side == "liger" else {}
    args = SFTConfig(
        output_dir=job["out_dir"], max_steps=job["steps"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["grad_accum"], learning_rate=job["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=job["seed"], data_seed=job["seed"],
        packing=True, packing_strategy="bfd", max_length=job["max_seq_len"], completion_only_loss=True,
        gradient_checkpointing=side != "unsloth", gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda, use_cpu=not cuda, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **extra,
    )
    clock = StepClock(cuda)
    step_losses: list[float] = []
    micro: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()
            step_losses.append(sum(micro))
            micro.clear()

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    # Start from the shared initial adapter (values are bf16-exact, so TRL's bf16 adapters hold them exactly).
    from peft import set_peft_model_state_dict

    loaded = set_peft_model_state_dict(trainer.model, load_file(str(Path(job["adapter_dir"]) /
                                                                     "adapter_model.safetensors")))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise SystemExit(f"initial adapter does not fit the peer's LoRA: missing {missing[:3]}, "
                         f"unexpected {list(loaded.unexpected_keys)[:3]}")
    training_step = trainer.training_step

    def counted_step(*a, **k):  # this instance only: the step loss = sum of its micro-batch losses
        loss = training_step(*a, **k)
        micro.append(float(loss))
        return loss

    trainer.training_step = counted_step
    trainer.train()
    n = len(clock.times)
    per_step_tokens = trainer._total_train_tokens / max(n, 1)
    return {"step_times": clock.times, "losses": step_losses, "tokens": [per_step_tokens] * n}


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB (VmHWM; see ``peftlab.engine.planner.peak_rss_bytes``)."""
    from peftlab.engine.planner import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    baseline = peak_rss_mb()  # interpreter + torch, before the side imports its library
    t0 = time.perf_counter()
    result = run_peftlab(job) if job["side"] == "peftlab" else run_trl(job)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    result["baseline_rss_mb"] = baseline
    if torch.cuda.is_available() and job["device"] == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(job["result_path"]).write_text(json.dumps(result))


# ---- the parent: one side in a child process, with an RSS watchdog -------------------------------------------

def run_side(job: dict[str, Any], work: Path, max_rss_gb: float, timeout_s: float) -> dict[str, Any]:
    """Run one side in a fresh interpreter; kill it when its RSS passes ``max_rss_gb`` (the point is then
    recorded as exceeded, not the machine brought down). Returns the side's figures (or its failure)."""
    work.mkdir(parents=True, exist_ok=True)
    job = {**job, "out_dir": str(work / "out"), "result_path": str(work / "result.json")}
    (work / "job.json").write_text(json.dumps(job))
    log = (work / "log.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), "--worker", str(work / "job.json")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    watched = watch(proc, max_rss_gb=max_rss_gb, timeout_s=timeout_s)
    status, peak_seen = watched["status"], watched["sampled_rss_gb"] * 2**30
    log.close()
    if status == "ok" and (proc.returncode != 0 or not (work / "result.json").exists()):
        status = f"failed (rc={proc.returncode})"
    if status != "ok":
        tail = (work / "log.txt").read_text()[-3000:]
        print(f"  {job['side']}: {status}\n{tail}", file=sys.stderr, flush=True)
        return {"side": job["side"], "status": status, "peak_rss_mb_seen": peak_seen / 2**20}
    return {"side": job["side"], "status": "ok", **json.loads((work / "result.json").read_text())}


def summarize(res: dict[str, Any], warmup: int, data: dict[str, Any]) -> dict[str, Any]:
    """Median tokens/s over the measured steps, peak memory, losses."""
    out = {k: v for k, v in res.items() if k not in ("step_times", "tokens", "targets")}
    if res["status"] != "ok":
        return out
    times = res["step_times"][warmup:] or res["step_times"][-1:]
    median_s = statistics.median(times)
    out.update(step_s=median_s, step_times=res["step_times"],
               tokens_per_s=data["tokens_per_step"] / median_s, target_tokens_per_s=data["targets_per_step"] / median_s,
               peak_mb=res.get("peak_gpu_mb", res["peak_rss_mb"]), measured_steps=len(times),
               final_loss=res["losses"][-1] if res["losses"] else None,
               tokens_seen_per_step=res["tokens"][0] if res.get("tokens") else None)
    # Each side's own count of what one step trained must match the data written for it (peftlab counts
    # targets; its "tokens" include the padding of packs shorter than the longest in a micro-batch).
    key, expected = ("targets", data["targets_per_step"]) if res.get("targets") else ("tokens", data["tokens_per_step"])
    if res.get(key) and any(abs(n - expected) > 0.5 for n in res[key]):
        print(f"  warning: {res['side']} trained {res[key]} {key} per step, expected {expected}", file=sys.stderr)
    return out


def agreement(a: list[float], b: list[float]) -> dict[str, Any]:
    """Step 1 is the same model, adapter and tokens on both sides: only float rounding may differ. Later
    steps add each library's optimizer arithmetic (TRL keeps QLoRA adapters in bf16, peftlab in fp32),
    so the curve tolerance is looser."""
    n = min(len(a), len(b))
    if not n:
        return {"agree": False, "steps": 0}
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n])]
    first_ok = rel[0] <= TOLERANCE["first_step_rel"]
    curve_ok = max(rel) <= TOLERANCE["curve_rel"]
    return {"agree": first_ok and curve_ok, "first_step_rel_diff": rel[0], "max_rel_diff": max(rel), "steps": n,
            "tolerance": TOLERANCE}


# ---- modes ---------------------------------------------------------------------------------------------------

class Setup:
    """One model + tokenizer + initial adapter on disk (written once per model, shared by all runs)."""

    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.cuda = args.gpu
        self.device = "cuda" if args.gpu else "cpu"
        self.dtype = "bfloat16" if args.gpu else "float32"
        if args.smoke:
            from peftlab.model.builtin import build_tokenizer

            self.tokenizer, self.tokenizer_name = build_tokenizer(), "builtin:byte"
        else:
            from transformers import AutoTokenizer

            self.tokenizer, self.tokenizer_name = AutoTokenizer.from_pretrained(args.tokenizer), Path(args.tokenizer).name
        self.vocab = LLAMA3_VOCAB if not args.smoke else (len(self.tokenizer) + 63) // 64 * 64
        self.rows, self.data_name = load_rows(args.smoke, args.data)
        self.models: dict[str, tuple[Any, Path, Path]] = {}
        self.counter = 0

    def model(self, name: str, layers: int | None = None) -> tuple[Any, Path, Path]:
        key = f"{name}:{layers}"
        if key not in self.models:
            cfg = llama_config(name, self.vocab, layers)
            d = self.tmp / f"model-{len(self.models)}"
            t0 = time.perf_counter()
            write_model_dir(cfg, self.tokenizer, d / "ckpt")
            write_init_adapter(cfg, d / "init-adapter", r=self.args.r, alpha=self.args.alpha, seed=self.args.seed)
            print(f"model {name}{f' ({layers} layers)' if layers else ''}: {parameter_count(cfg) / 1e6:.0f}M "
                  f"parameters, vocab {cfg.vocab_size}, written in {time.perf_counter() - t0:.0f} s", flush=True)
            self.models[key] = (cfg, d / "ckpt", d / "init-adapter")
        return self.models[key]

    def data(self, max_seq_len: int, n_packs: int) -> dict[str, Any]:
        d = self.tmp / f"data-{max_seq_len}-{n_packs}"
        if not (d / "meta.json").exists():
            meta = prepare_data(self.rows, self.tokenizer, max_seq_len, n_packs, d, self.args.seed)
            (d / "meta.json").write_text(json.dumps(meta))
        return json.loads((d / "meta.json").read_text())

    def run(self, side: str, model: tuple[Any, Path, Path], data: dict[str, Any], *, max_seq_len: int,
            micro_batch: int, grad_accum: int, steps: int) -> dict[str, Any]:
        self.counter += 1
        a = self.args
        job = {"side": side, "model_dir": str(model[1]), "adapter_dir": str(model[2]), "rows_path": data["rows_path"],
               "tokens_path": data["tokens_path"], "max_seq_len": max_seq_len, "micro_batch": micro_batch,
               "grad_accum": grad_accum, "steps": steps, "lr": a.lr, "r": a.r, "alpha": a.alpha, "seed": a.seed,
               "device": self.device, "dtype": self.dtype, "threads": a.threads, "peftlab_set": a.peftlab_set}
        t0 = time.perf_counter()
        res = run_side(job, self.tmp / f"run-{self.counter:03d}-{side}", a.max_rss_gb, a.timeout)
        s = summarize(res, a.warmup, data)
        print(f"  {side}: {s['status']}"
              + (f", {s['tokens_per_s']:.0f} tok/s, peak {s['peak_mb']:.0f} MB, losses "
                 + " ".join(f"{x:.4f}" for x in s["losses"]) if s["status"] == "ok" else "")
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        return s


def available_sides(gpu: bool) -> tuple[list[str], dict[str, str]]:
    sides, skipped = ["peftlab", "peft"], {}
    if not gpu:
        return sides, {"liger": "GPU only (--gpu)", "unsloth": "GPU only (--gpu)"}
    for side, module in (("liger", "liger_kernel"), ("unsloth", "unsloth")):
        probe = subprocess.run([sys.executable, "-P", "-c", f"import {module}"], capture_output=True, text=True,
                               check=False)
        if probe.returncode == 0:
            sides.append(side)
        else:
            skipped[side] = f"`import {module}` failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    for side, why in skipped.items():
        print(f"skipping {side}: {why}")
    return sides, skipped


def geometry(args) -> dict[str, Any]:
    return {"max_seq_len": args.seq, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "r": args.r, "alpha": args.alpha,
            "seed": args.seed, "peftlab_set": args.peftlab_set}


def compare(args, setup: Setup, run_id: str) -> dict[str, Any]:
    model = setup.model(args.model, args.layers)
    data = setup.data(args.seq, args.micro_batch * args.grad_accum)
    sides, skipped = available_sides(args.gpu)
    if args.only_peftlab:
        sides, skipped = ["peftlab"], {**skipped, **{s: "--only-peftlab" for s in sides[1:]}}
    print(f"\n== compare: {data['rows']} {setup.data_name} rows = {data['tokens_per_step']} tokens "
          f"({data['targets_per_step']} targets) per optimizer step, {args.steps} steps, warm-up {args.warmup}, "
          f"{args.repeats} alternating repeats", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for side in sides:  # alternate: peftlab, peer(s), peftlab, peer(s), ...
            runs[side].append(setup.run(side, model, data, max_seq_len=args.seq, micro_batch=args.micro_batch,
                                        grad_accum=args.grad_accum, steps=args.steps) | {"repeat": rep})
    rows, pairs = [], []
    ok = {s: [r for r in runs[s] if r["status"] == "ok"] for s in sides}
    for side in sides:
        rs = ok[side]
        rows.append({"side": side, "runs_ok": f"{len(rs)}/{len(runs[side])}",
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs) if rs else None,
                     "peak_mb": statistics.median(r["peak_mb"] for r in rs) if rs else None,
                     "baseline_mb": statistics.median(r["baseline_rss_mb"] for r in rs) if rs else None,
                     "final_loss": rs[0]["final_loss"] if rs else None})
    for peer in sides[1:]:
        for a, b in zip(runs["peftlab"], runs[peer]):
            if a["status"] == b["status"] == "ok":
                pairs.append({"peer": peer, "repeat": a["repeat"], "speed_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                              "memory_ratio": a["peak_mb"] / b["peak_mb"]})
    agree = {peer: agreement(ok["peftlab"][0]["losses"], ok[peer][0]["losses"])
             for peer in sides[1:] if ok["peftlab"] and ok[peer]}
    print()
    print_table(rows, ["side", "runs_ok", "tokens_per_s", "peak_mb", "baseline_mb", "final_loss"])
    if pairs:
        print()
        print_table(pairs, ["peer", "repeat", "speed_ratio", "memory_ratio"])
    for peer, ag in agree.items():
        curves = "\n".join(f"    step {i + 1}: peftlab {x:.5f}  {peer} {y:.5f}"
                           for i, (x, y) in enumerate(zip(ok["peftlab"][0]["losses"], ok[peer][0]["losses"])))
        print(f"\nloss curves peftlab vs {peer}: {'AGREE' if ag['agree'] else 'DISAGREE'} (step 1 rel. diff "
              f"{ag.get('first_step_rel_diff', float('nan')):.2e} <= {TOLERANCE['first_step_rel']:g}, max over "
              f"{ag['steps']} steps {ag.get('max_rel_diff', float('nan')):.2e} <= {TOLERANCE['curve_rel']:g})\n{curves}")
    summary = {}
    for peer in sides[1:]:
        pp = [p for p in pairs if p["peer"] == peer]
        if pp:
            summary[peer] = {"speed_ratio_median": statistics.median(p["speed_ratio"] for p in pp),
                             "memory_ratio_median": statistics.median(p["memory_ratio"] for p in pp)}
            print(f"peftlab vs {peer}: {summary[peer]['speed_ratio_median']:.2f}x tokens/s, "
                  f"{summary[peer]['memory_ratio_median']:.2f}x peak memory (median of per-pair ratios)")
    record = {"mode": "compare", "run_id": run_id, "smoke": args.smoke, "model": args.model, "layers": args.layers,
              "parameters": parameter_count(model[0]), "vocab_size": model[0].vocab_size,
              "tokenizer": setup.tokenizer_name, "data": setup.data_name, **geometry(args), **data,
              "rows_table": rows, "pairs": pairs, "ratios": summary, "agreement": agree, "skipped": skipped,
              "runs": runs}
    append_jsonl(NAME, record, args.results_dir)
    return record


def scaling(args, setup: Setup, run_id: str) -> list[dict[str, Any]]:
    sides, _ = available_sides(args.gpu)
    points: list[tuple[str, str, int | None, int]] = [("seq_len", args.model, args.layers, n) for n in args.seq_lens]
    points += [("model", m, None, args.size_seq) for m in args.sizes]
    out = []
    for axis, model_name, layers, seq in points:
        try:
            model = setup.model(model_name, layers)
            data = setup.data(seq, 1)
        except (OSError, ValueError, SystemExit) as exc:
            print(f"  scaling point {axis}={model_name}/{seq} skipped: {exc}", file=sys.stderr)
            continue
        print(f"\n== scaling {axis}: model {model_name} ({parameter_count(model[0]) / 1e6:.0f}M), seq {seq} "
              f"({data['tokens_per_step']} tokens/step)", flush=True)
        for side in sides:
            s = setup.run(side, model, data, max_seq_len=seq, micro_batch=1, grad_accum=1,
                          steps=args.warmup + args.scaling_steps)
            rec = {"mode": "scaling", "run_id": run_id, "smoke": args.smoke, "axis": axis, "model": model_name,
                   "parameters": parameter_count(model[0]), "vocab_size": model[0].vocab_size, "seq_len": seq,
                   "side": side, "status": s["status"], "tokens_per_s": s.get("tokens_per_s"),
                   "peak_mb": s.get("peak_mb"), "step_times": s.get("step_times"), "losses": s.get("losses"),
                   "tokens_per_step": data["tokens_per_step"], "warmup": args.warmup, "lr": args.lr, "r": args.r}
            append_jsonl(NAME, rec, args.results_dir)
            out.append(rec)
    print()
    print_table(out, ["axis", "model", "parameters", "seq_len", "side", "status", "tokens_per_s", "peak_mb"])
    return out


def plot(args, out_png: Path) -> Path | None:
    """Tokens/s and peak memory vs sequence length per side, from the newest scaling run in the JSON lines."""
    path = Path(args.results_dir or HERE / "results") / f"{NAME}.jsonl"
    if not path.exists():
        print(f"plot: no {path}", file=sys.stderr)
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("mode") == "scaling" and r.get("axis") == "seq_len"]
    if not recs:
        print("plot: no seq_len scaling records yet (run --mode scaling)", file=sys.stderr)
        return None
    latest = recs[-1]["run_id"]
    recs = [r for r in recs if r["run_id"] == latest]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for side in dict.fromkeys(r["side"] for r in recs):
        rs = sorted((r for r in recs if r["side"] == side), key=lambda r: r["seq_len"])
        good = [r for r in rs if r["status"] == "ok"]
        ax1.plot([r["seq_len"] for r in good], [r["tokens_per_s"] for r in good], "o-", label=side)
        line = ax2.plot([r["seq_len"] for r in good], [r["peak_mb"] / 1024 for r in good], "o-", label=side)[0]
        for r in rs:
            if r["status"] != "ok":
                ax2.annotate(f"{side}: {r['status']}", (r["seq_len"], args.max_rss_gb), color=line.get_color(),
                             fontsize=7, rotation=90, va="top")
    mem = "peak GPU memory allocated (GiB)" if "cuda" in recs[0].get("device", "") else "peak RSS (GiB)"
    for ax, ylabel in ((ax1, "trained tokens/s"), (ax2, mem)):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length (tokens per packed row)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"vs_peers scaling: {recs[0]['model']} ({recs[0]['parameters'] / 1e6:.0f}M, vocab "
                 f"{recs[0]['vocab_size']}), {recs[0]['device']}, {recs[0]['git_commit']}", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"plot: {out_png}")
    return out_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["compare", "scaling", "plot", "all"], default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny model and vocabulary, generated rows, 2 steps (< 90 s)")
    ap.add_argument("--gpu", action="store_true", help="CUDA: Llama-3.1-8B architecture in bf16, plus liger/unsloth")
    ap.add_argument("--results-dir", type=Path, default=None, help="where vs_peers.jsonl goes (default bench/results)")
    ap.add_argument("--plot-out", type=Path, default=None, help="PNG path (default bench/vs_peers_scaling.png)")
    ap.add_argument("--model", default=None, help="a name in CONFIGS (smoke/tiny/small) or a config directory")
    ap.add_argument("--layers", type=int, default=None, help="keep this many decoder layers of --model")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama3-8b-instruct"))
    ap.add_argument("--data", default=str(SHARED / "datasets" / "alpaca"))
    ap.add_argument("--seq", type=int, default=None, help="max_seq_len = pack capacity (compare)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (compare), warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    ap.add_argument("--repeats", type=int, default=None, help="alternating peftlab/peer pairs (compare)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="scaling: sequence lengths")
    ap.add_argument("--sizes", nargs="*", default=None, help="scaling: models at --size-seq (CONFIGS names / dirs)")
    ap.add_argument("--size-seq", type=int, default=512)
    ap.add_argument("--scaling-steps", type=int, default=None, help="measured steps per scaling point")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's own)")
    ap.add_argument("--max-rss-gb", type=float, default=18.0, help="kill a side whose RSS passes this")
    ap.add_argument("--timeout", type=float, default=3600.0, help="kill a side running longer (s)")
    ap.add_argument("--peftlab-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for the peftlab side (repeatable), e.g. train.host_allocator=bounded")
    ap.add_argument("--only-peftlab", action="store_true", help="compare: run the peftlab side only (no ratios)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    configs = SHARED / "configs"
    if args.smoke:
        d = {"model": "smoke", "seq": 256, "micro_batch": 1, "grad_accum": 2, "steps": 2, "repeats": 1,
             "seq_lens": [128], "sizes": [], "scaling_steps": 1}
        args.size_seq = min(args.size_seq, 256)
    elif args.gpu:
        d = {"model": str(configs / "llama-3.1-8b"), "seq": 2048, "micro_batch": 2, "grad_accum": 2, "steps": 6,
             "repeats": 2, "seq_lens": [512, 1024, 2048, 4096, 8192],
             "sizes": ["tiny", str(configs / "llama-3.2-1b")], "scaling_steps": 2}
    else:
        d = {"model": "small", "seq": 512, "micro_batch": 2, "grad_accum": 2, "steps": 6, "repeats": 2,
             "seq_lens": [512, 1024, 2048, 4096, 8192],
             "sizes": ["tiny", "small", str(configs / "llama-3.2-1b")], "scaling_steps": 1}
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA device", file=sys.stderr)
            return 2
    if not args.smoke and not Path(args.tokenizer).exists():
        print(f"tokenizer {args.tokenizer} not found (../shared/data); use --smoke or --tokenizer", file=sys.stderr)
        return 2
    run_id = time.strftime("%Y%m%dT%H%M%S")
    if args.smoke and args.results_dir is None:  # smoke figures never go into bench/results
        args.results_dir = Path(tempfile.mkdtemp(prefix="vs_peers-smoke-"))
        print(f"smoke: results in {args.results_dir}")
    plot_out = args.plot_out or (Path(args.results_dir) / "vs_peers_scaling.png" if args.smoke
                                 else HERE / "vs_peers_scaling.png")
    t0 = time.perf_counter()
    if args.mode in ("compare", "scaling", "all"):
        with tempfile.TemporaryDirectory(prefix="vs_peers-") as tmp:
            setup = Setup(args, Path(tmp))
            if args.mode in ("compare", "all"):
                compare(args, setup, run_id)
            if args.mode in ("scaling", "all"):
                scaling(args, setup, run_id)
    if args.mode in ("plot", "all"):
        plot(args, plot_out)
    print(f"\nvs_peers: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
