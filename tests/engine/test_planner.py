"""The memory planner: breakdown, budget search, the report of `peftlab estimate`, and prediction vs measured RSS."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main
from peftlab.engine.model_shape import model_shape
from peftlab.engine.planner import GiB, MiB, estimate, parse_size
from peftlab.errors import PeftlabError
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


def test_too_small_budget_says_what_it_needs(tmp_path, capsys):
    raw = _raw(tmp_path)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))  # JSON is YAML
    assert main(["estimate", str(path), "--device-memory", "100MiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: the run needs" in out and "the budget is 100.0 MiB" in out


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB and parse_size("80GB") == 80 * 10**9 and parse_size("512") == 512
    with pytest.raises(PeftlabError, match="expected a size"):
        parse_size("lots")


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
@pytest.mark.parametrize("allocator, checkpointing", [("default", False), ("default", True), ("bounded", False)])
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
    assert plain.total - off.total == 6 * per_layer_input
    assert any("pinned host memory" in n for n in off.notes)
    r.train.offload_activations = False
    cpu_plain = estimate(r, **{**kw, "device": "cpu"}).total
    r.train.offload_activations = True
    assert estimate(r, **{**kw, "device": "cpu"}).total == cpu_plain  # nothing moves on the CPU
    r.train.mlp_chunk_tokens = 1024
    chunked = estimate(r, **kw)
    mlp_saved = 4 * shape.intermediate * 2 * (4096 - 1024)  # the recomputed layer's gate/silu/up/product
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
    assert capsys.readouterr().out.strip() == (
        f"longest context that fits 0.59 GiB (predicted, micro_batch_size=1): {n} tokens")
    assert main(["estimate", str(path), "--max-context"]) == 2
    assert "--max-context needs a budget: --gpu-memory 24GB" in capsys.readouterr().err
