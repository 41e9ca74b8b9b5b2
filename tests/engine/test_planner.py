"""The memory planner: breakdown, budget search and prediction vs measured RSS (the report: test_estimate_report.py)."""
from __future__ import annotations

import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main
from peftlab.engine.estimate_report import MiB, parse_size
from peftlab.engine.model_shape import model_shape
from peftlab.engine.planner import estimate
from peftlab.recipe.parse import recipe_from_dict

REPO = Path(__file__).resolve().parents[2]

MEASURE = r"""
import json, sys
from peftlab.engine.planner import peak_rss_bytes
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer
Trainer(recipe_from_dict(json.loads(sys.argv[1])), quiet=True).train()
print(json.dumps({"peak": peak_rss_bytes()}))
"""


def _raw(tmp_path: Path, **sections) -> dict:
    data = make_quickstart_data(tmp_path / "data", n_train=16, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out", **sections)
    raw["output"].update(report_to=["jsonl"], plot=False)
    raw["train"].update(max_steps=2, grad_accum=1)
    return raw


def test_breakdown_is_non_negative_and_sums_to_total(tmp_path):
    r = recipe_from_dict(_raw(tmp_path))
    est = estimate(r, baseline=300 * MiB, device="cpu")
    assert all(v >= 0 for v in est.components.values()), est.components
    assert sum(est.components.values()) == est.total
    assert est.components["base_weights"] > 0 and est.components["adapters"] > 0
    assert est.components["optimizer_state"] == 2 * est.components["adapters"]  # AdamW: 2 fp32 moments
    for stage, total in est.per_rank.items():
        assert 0 < total <= est.per_rank["no_zero"], stage


def test_more_tokens_more_memory_and_checkpointing_saves(tmp_path):
    r = recipe_from_dict(_raw(tmp_path))
    shape = model_shape(r)
    kw = {"baseline": 0, "device": "cpu", "shape": shape}
    a = estimate(r, seq_len=64, **kw).components["activations"]
    b = estimate(r, seq_len=128, **kw).components["activations"]
    assert b > 1.9 * a
    r.model.gradient_checkpointing = True
    assert estimate(r, seq_len=128, **kw).components["activations"] < b


@pytest.mark.slow
def test_prediction_within_15_percent_of_measured_peak_rss(tmp_path):
    """The tiny run, measured in its own process (VmHWM) against the planner's total."""
    raw = _raw(tmp_path)
    est = estimate(recipe_from_dict(raw), device="cpu")
    out = subprocess.run([sys.executable, "-P", "-c", MEASURE, json.dumps(raw)], check=False, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert abs(est.total - measured) <= 0.15 * measured, (est.total / MiB, measured / MiB, est.components)


SMALL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
                "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8,
                "num_key_value_heads": 4, "vocab_size": 16000, "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A ~40M-parameter Llama (random init, bf16 safetensors) with the built-in tokenizer beside it."""
    import torch

    from peftlab.model.builtin import build_tokenizer
    from peftlab.model.quantized_load import save_random_checkpoint

    root = tmp_path_factory.mktemp("small")
    (root / "cfg").mkdir()
    (root / "cfg" / "config.json").write_text(json.dumps(SMALL_CONFIG))
    ckpt = save_random_checkpoint(root / "cfg", root / "ckpt", dtype=torch.bfloat16, seed=0)
    build_tokenizer().save_pretrained(ckpt)
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("allocator, checkpointing", [("default", False), ("bounded", False), ("auto", True)])
def test_small_model_prediction_within_15_percent(tmp_path, small_checkpoint, allocator, checkpointing):
    """A ~40M Llama with packed 256-token rows: each host allocator, with and without checkpointing,
    against the measured peak RSS of the same run in its own process."""
    data = make_quickstart_data(tmp_path / "data", n_train=48, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out", model={"name": str(small_checkpoint), "dtype": "float32",
                                                          "gradient_checkpointing": checkpointing},
                           adapter={"r": 16, "alpha": 32})
    raw["data"].update(max_seq_len=256, packing=True)
    raw["data"].pop("eval")
    raw["output"].update(report_to=["jsonl"], plot=False)
    raw["train"].update(max_steps=2, grad_accum=1, micro_batch_size=4, host_allocator=allocator,
                        eval_at_start=False)
    raw["eval"]["metric"] = "loss"
    est = estimate(recipe_from_dict(raw), device="cpu")
    out = subprocess.run([sys.executable, "-P", "-c", MEASURE, json.dumps(raw)], check=False, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    print(f"{allocator} checkpointing={checkpointing}: predicted {est.total / MiB:.0f} MiB, measured "
          f"{measured / MiB:.0f} MiB ({est.total / measured - 1:+.1%})")
    assert abs(est.total - measured) <= 0.15 * measured, (est.total / MiB, measured / MiB,
                                                          {k: v / MiB for k, v in est.components.items()})


def test_offload_and_mlp_chunking_lower_the_gpu_peak_by_the_modelled_amount(tmp_path):
    """train.offload_activations keeps 2 layers' checkpointed inputs on the GPU instead of all of them;
    train.mlp_chunk_tokens bounds the 4 x intermediate MLP activations of the recomputed layer by the chunk."""
    raw = _raw(tmp_path, model={"gradient_checkpointing": True})
    raw["model"].update(attn_implementation="flash_attention_2")  # no seq^2 mask: the terms below stand alone
    r = recipe_from_dict(raw)
    shape = model_shape(r)
    kw = {"baseline": 0, "device": "cuda", "shape": shape, "micro_batch_size": 1, "seq_len": 4096}
    plain = estimate(r, **kw)
    r.train.offload_activations = True
    off = estimate(r, **kw)
    per_layer_input = 4096 * shape.hidden * 2  # bf16 on the GPU
    assert shape.n_layers == 2 and plain.components["activations"] == off.components["activations"]  # 2 kept anyway
    more_layers = dataclasses.replace(shape, n_layers=8)
    kw["shape"] = more_layers
    r.train.offload_activations = False
    plain = estimate(r, **kw)
    r.train.offload_activations = True
    off = estimate(r, **kw)
    assert plain.components["activations"] - off.components["activations"] == 6 * per_layer_input
    assert plain.total - off.total >= 6 * per_layer_input  # + the leaner recompute (LeanSaved)
    assert any("pinned host memory" in n for n in off.notes)
    r.train.offload_activations = False
    cpu_plain = estimate(r, **{**kw, "device": "cpu"})
    r.train.offload_activations = True
    cpu_off = estimate(r, **{**kw, "device": "cpu"})
    assert cpu_off.components["activations"] == cpu_plain.components["activations"]  # nothing moves on the CPU
    assert cpu_off.total <= cpu_plain.total
    r.train.mlp_chunk_tokens = 1024
    chunked = estimate(r, **kw)
    mlp_saved = 4 * shape.intermediate * 2 * (4096 - 1024)  # the recomputed layer's gate/silu/up/product
    # ... less the MLP's input, which the chunk checkpoints keep whole (the lean recompute would drop it)
    mlp_saved -= 4096 * shape.hidden * 2
    assert off.components["temporary_buffers"] - chunked.components["temporary_buffers"] >= mlp_saved


def test_max_context_is_the_longest_length_that_fits(tmp_path, capsys):
    raw = _raw(tmp_path, model={"gradient_checkpointing": True})
    r = recipe_from_dict(raw)
    budget = 600 * MiB
    from peftlab.engine.planner import max_context

    n = max_context(r, budget, device="cuda")
    assert n is not None and n > 1000
    assert estimate(r, device="cuda", micro_batch_size=1, seq_len=n).total <= budget
    assert estimate(r, device="cuda", micro_batch_size=1, seq_len=n + 1).total > budget
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    assert main(["estimate", str(path), "--max-context", "--gpu-memory", "600MiB"]) == 0
    assert n > 1024  # the built-in model's max_position_embeddings: the line says the whole context fits
    assert capsys.readouterr().out.strip() == (
        f"longest context that fits 0.59 GiB (predicted, micro_batch_size=1): {n} tokens — more than the model's "
        "1024 positions (max_position_embeddings): its whole context fits")
    assert main(["estimate", str(path), "--max-context", "--gpu-memory", "600MiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"max_context": n, "budget": budget, "micro_batch_size": 1,
                                                   "model_max_positions": 1024}
    assert main(["estimate", str(path), "--max-context"]) == 2
    assert "--max-context needs a budget: --gpu-memory 24GB" in capsys.readouterr().err


def _long_context(tmp_path, *, dropout=0.05, **train):
    raw = _raw(tmp_path, model={"gradient_checkpointing": True, "attn_implementation": "flash_attention_2"},
               adapter={"dropout": dropout})
    raw["train"].update({"offload_activations": True, "mlp_chunk_tokens": 1024, **train})
    r = recipe_from_dict(raw)
    import torch

    shape = dataclasses.replace(model_shape(r, torch.bfloat16, device="cuda"), n_layers=8)
    return r, shape


def test_layer_backward_moment_holds_the_stream_gradient_in_the_compute_dtype(tmp_path):
    """At a long context the peak is a decoder layer's backward. The fused loss's fp32 hidden-state gradient is
    freed by then (its backward hands the compute-dtype gradient on), so the loss head's share is the residual
    stream's bf16 gradient; the layers keep the two inputs in flight and RoPE's cos / sin."""
    r, shape = _long_context(tmp_path)
    n = 16384
    est = estimate(r, device="cuda", baseline=0, shape=shape, micro_batch_size=1, seq_len=n)
    assert est.components["loss_head"] == n * shape.hidden * 2
    assert est.components["activations"] == 2 * n * shape.hidden * 2 + 2 * n * shape.head_dim * 2


@pytest.mark.parametrize("offload", [False, True])
def test_lora_dropout_on_the_kernel_path_costs_its_one_byte_masks(tmp_path, offload):
    """fused_lora_linear keeps a bool keep-mask per input element of each adapted layer, never a dropped copy
    (tests/engine/test_model_shape.py checks that against autograd); the MLP's masks exist for one chunk; the
    offloaded recompute redraws the attention side's from the RNG (tests/model/test_long_context.py)."""
    n, chunk = 16384, 1024
    r0, shape = _long_context(tmp_path, dropout=0.0, offload_activations=offload)
    r1, _ = _long_context(tmp_path, dropout=0.05, offload_activations=offload)
    kw = {"device": "cuda", "baseline": 0, "shape": shape, "micro_batch_size": 1, "seq_len": n}
    widths = shape.lora_modules_per_layer
    attn_side = sum(w for k, w in widths.items() if "mlp" not in k)
    mlp_side = sum(w for k, w in widths.items() if "mlp" in k)
    diff = estimate(r1, **kw).components["temporary_buffers"] - estimate(r0, **kw).components["temporary_buffers"]
    assert diff == (0 if offload else n * attn_side) + chunk * mlp_side


def test_fused_norm_and_kernels_off_change_the_recomputed_layer_by_what_they_keep(tmp_path):
    """transformers' 16-bit RMSNorm keeps an fp32 copy of its input (the fused norm: the input itself) and its
    backward runs in fp32; kernels: off takes the PyTorch LoRA path (an fp32 copy of each adapted layer's input,
    dropout's dropped copy + mask): the planner's totals order accordingly at a long context."""
    n = 16384
    kw = {"device": "cuda", "baseline": 0, "micro_batch_size": 1, "seq_len": n}
    eager, shape = _long_context(tmp_path, offload_activations=False)  # plain checkpointing keeps the fp32 copies
    fused, _ = _long_context(tmp_path, fused_norm=True, offload_activations=False)
    off, _ = _long_context(tmp_path, offload_activations=False)
    off.kernels = "off"
    totals = {k: estimate(rec, shape=shape, **kw).total for k, rec in (("eager", eager), ("fused", fused),
                                                                          ("off", off))}
    assert totals["fused"] < totals["eager"] < totals["off"]


def test_8b_qlora_long_context_prediction(shared_data, tmp_path):
    """The issue-18 goal as the planner sees it: Llama-3.1-8B QLoRA (the shipped recipe) with offloaded layer
    inputs, the chunked MLP, flash attention and the fused norm on a 24 GB card: predicted >= 80,000 tokens
    (a prediction; bench/gpu_check.sh measures it on a GPU)."""
    from peftlab.engine.planner import max_context
    from peftlab.recipe.parse import load_recipe

    r = load_recipe(REPO / "recipes" / "llama-3.1-8b-qlora.yaml", overrides=[
        f"model.name={shared_data / 'configs' / 'llama-3.1-8b'}",
        f"model.tokenizer={shared_data / 'tokenizers' / 'llama3-8b-instruct'}",
        "train.offload_activations=true", "train.mlp_chunk_tokens=4096", "model.attn_implementation=flash_attention_2",
        "train.fused_norm=true"])
    assert max_context(r, parse_size("24GB"), device="cuda") >= 80_000


def test_estimate_names_the_fused_norm_and_what_it_predicts(tmp_path):
    r, shape = _long_context(tmp_path)
    kw = {"device": "cuda", "baseline": 0, "shape": shape, "micro_batch_size": 1, "seq_len": 16384}
    est = estimate(r, **kw)
    r.train.fused_norm = True
    fused = estimate(r, **kw)
    from peftlab.engine.planner import fmt

    assert f"train.fused_norm: true predicts {fmt(fused.total)}" in "\n".join(est.notes) and fused.total < est.total
    assert not any("fused_norm" in n for n in fused.notes)


class _ProbeStopped(Exception):
    pass


@pytest.mark.parametrize("allocator, expected", [("auto", ["huge_pages", "build_model"]),
                                                 ("bounded", ["bound_heap", "build_model"]),
                                                 ("default", ["build_model"])])
def test_baseline_probe_sets_up_the_host_allocator_as_training_does(tmp_path, monkeypatch, allocator, expected):
    """The probe that measures the process baseline runs in a fresh interpreter; here its script runs in this one
    (subprocess.run replaced) up to the model build: before it, train.host_allocator is set up as the trainer does
    on the CPU — auto requests huge pages, bounded bounds the heap, default changes nothing."""
    from peftlab.engine import hostmem, planner
    from peftlab.model import builtin, load

    calls: list[str] = []
    monkeypatch.setattr(hostmem, "request_huge_pages", lambda: calls.append("huge_pages"))
    monkeypatch.setattr(hostmem, "bound_host_heap", lambda: calls.append("bound_heap"))

    def build_model(recipe):
        calls.append("build_model")
        raise _ProbeStopped

    def run(args, **kw):
        assert args[1:3] == ["-P", "-c"]
        monkeypatch.setattr(sys, "argv", ["-c", *args[4:]])
        script = tmp_path / "probe.py"
        script.write_text(args[3])
        with pytest.raises(_ProbeStopped):
            runpy.run_path(str(script), run_name="__probe__")
        return subprocess.CompletedProcess(args, 0, stdout="123\n", stderr="")

    monkeypatch.setattr(load, "build_model", build_model)
    monkeypatch.setattr(builtin, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(planner.subprocess, "run", run)
    recipe = recipe_from_dict(_raw(tmp_path, train={"device": "cpu", "host_allocator": allocator}))
    assert planner._probe_baseline(recipe) == 123
    assert calls == expected


def test_unfrozen_head_is_named_in_the_notes_and_the_advice(tmp_path):
    """adapter.unfreeze: the estimate says how many base parameters train in full (their gradients and optimizer
    state are in its components: tests/engine/test_loss_head.py measures them); the advice after running out of
    memory names the key."""
    from peftlab.engine.memory_fit import out_of_memory_advice

    r = recipe_from_dict(_raw(tmp_path, adapter={"unfreeze": ["head"]}))
    shape = model_shape(r)
    est = estimate(r, device="cuda", baseline=0, shape=shape)
    assert (f"adapter.unfreeze: {shape.unfrozen_params / 1e6:.1f} M base parameters train in full; their gradients "
            "and optimizer state are counted above (the head's gradient is made by the loss, in fp32)") in est.notes
    plain = estimate(recipe_from_dict(_raw(tmp_path)), device="cuda", baseline=0)
    assert est.components["optimizer_state"] - plain.components["optimizer_state"] == 2 * 2 * shape.unfrozen_params
    assert not any("adapter.unfreeze" in n for n in plain.notes)
    assert ("adapter.unfreeze (now ['head']: an unfrozen module's gradient and AdamW state take 3x its weights)"
            in out_of_memory_advice(r, device="cuda", budget=1))
