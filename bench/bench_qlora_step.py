#!/usr/bin/env python3
"""One full QLoRA training step (forward + backward) of a Llama-architecture model: peftlab vs HF PEFT.

Both sides load the SAME 16-bit checkpoint (random init from a real config, written once to a temp
dir) in NF4 with double quantisation through bitsandbytes, put LoRA r=16 on all linear layers, use
non-reentrant gradient checkpointing, and run a forward + backward on the same batch:

- **peftlab**: our LoRA layers (`kernels: auto` → Triton fused QLoRA linear on CUDA) and the fused
  linear cross-entropy from final hidden states (logits never whole);
- **peft**: `peft.get_peft_model` on transformers' bitsandbytes model, loss from `model(labels=...)`
  (full logits + cross-entropy), as the PEFT/TRL docs set it up.

The two run alternately (A/B/A/B…) after a warm-up; figures are medians, peak memory is
`torch.cuda.max_memory_allocated` of each side's step (on CPU: separate processes are needed for RSS,
so the CPU mode reports time only and is for smoke runs).

    python bench/bench_qlora_step.py --gpu [--config ../shared/data/configs/llama-3.1-8b --layers 8 --seq 2048]
    python bench/bench_qlora_step.py --smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, environment, print_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs"


def write_checkpoint(config_dir: str | None, layers: int, out: Path, smoke: bool) -> None:
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    if smoke or config_dir is None:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = AutoConfig.from_pretrained(config_dir)
        cfg.num_hidden_layers = layers
    cfg.torch_dtype = "bfloat16"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    from peftlab.model.builtin import build_tokenizer  # any tokenizer will do: the batch is random token ids

    build_tokenizer().save_pretrained(out)


def peftlab_side(path: Path, device: torch.device):
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss
    from peftlab.recipe.parse import recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"name": str(path), "gradient_checkpointing": True, "dtype": "bfloat16" if device.type == "cuda"
                  else "float32"},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": ["unused.jsonl"]},
        "train": {"device": device.type},
    })
    model = build_model(recipe).model
    model.train()
    settings = LossSettings(backend="auto")

    def step(batch):
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = causal_lm_loss(model, batch, normalizer=n, settings=settings)
        loss.backward()
        return float(loss)

    return model, step


def peft_side(path: Path, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map={"": device},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()

    def step(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        return float(out.loss)

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--config", default=str(SHARED / "llama-3.1-8b"))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers kept from the config (time/memory per layer scale)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    device = torch.device("cuda") if args.gpu else torch.device("cpu")
    if args.smoke:
        args.seq, args.iters, args.batch = 64, 1, 2
    config_dir = args.config if Path(args.config).is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        write_checkpoint(config_dir, args.layers, path, args.smoke)
        vocab = __import__("json").loads((path / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                 "labels": labels.to(device)}
        sides = {"peftlab": peftlab_side(path, device), "peft": peft_side(path, device)}
        times = {k: [] for k in sides}
        peaks = {k: 0 for k in sides}
        losses = {}
        for it in range(args.iters + 1):  # first round is warm-up
            for name, (model, step) in sides.items():
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                losses[name] = step(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - base)
                if it:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    tokens = args.batch * args.seq
    rows = []
    for name in sides:
        ms = statistics.median(times[name])
        rows.append({"side": name, "median_ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3),
                     "step_peak_mb": round(peaks[name] / 2**20, 1), "loss": round(losses[name], 5)})
    ratio = statistics.median(times["peft"]) / statistics.median(times["peftlab"])
    print_table(rows, ["side", "median_ms", "tokens_per_s", "step_peak_mb", "loss"])
    print(f"peftlab speed-up over peft: {ratio:.2f}x; memory ratio (peftlab/peft): "
          f"{(peaks['peftlab'] / peaks['peft']) if peaks['peft'] else float('nan'):.2f}")
    append_jsonl("bench_qlora_step", {"config": config_dir, "layers": args.layers, "seq": args.seq,
                                      "batch": args.batch, "rows": rows, "speedup": ratio, **environment()},
                 results_dir=args.results_dir)


if __name__ == "__main__":
    main()
