"""Streaming 4-bit loading (peftlab/streaming.py): bitwise the same quantised model, a fraction of the memory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.model.builtin import resolve_builtin
from peftlab.model.quantized_load import (
    QuantSettings,
    load_quantized,
    quantize_weight,
    random_quantized,
    save_random_checkpoint,
)
from peftlab.model.shards import iter_tensors

REPO = Path(__file__).resolve().parents[2]


def _assert_same_4bit(a: torch.nn.Module, b_weight: torch.nn.Parameter, name: str) -> None:
    qa, qb = a.weight.quant_state, b_weight.quant_state
    # compared as bytes: packed nibbles stored as bf16/fp16 may read as NaN
    assert torch.equal(a.weight.data.view(torch.uint8), b_weight.data.view(torch.uint8)), f"{name}: packed differ"
    assert torch.equal(qa.absmax, qb.absmax), f"{name}: absmax differs"
    assert (qa.blocksize, qa.quant_type, qa.dtype, tuple(qa.shape)) == \
        (qb.blocksize, qb.quant_type, qb.dtype, tuple(qb.shape)), name
    assert torch.equal(qa.code, qb.code), name
    assert qa.nested == qb.nested, name
    if qa.nested:
        assert torch.equal(qa.offset, qb.offset), name
        assert torch.equal(qa.state2.absmax, qb.state2.absmax), f"{name}: nested absmax differs"
        assert torch.equal(qa.state2.code, qb.state2.code), name


@pytest.mark.parametrize("settings", [
    QuantSettings(),  # NF4, double quant, blocksize 64, fp32 compute (the CPU default)
    QuantSettings("fp4", False, 128, torch.bfloat16, torch.bfloat16),
], ids=["nf4-dq-64-fp32", "fp4-128-bf16-storage"])
def test_sharded_stream_equals_quantising_the_in_memory_model(tmp_path, settings):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(resolve_builtin("builtin:micro-llama")), dtype=torch.float32)
    dense.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3  # really sharded

    streamed = load_quantized(tmp_path, settings)
    dense_params = dict(dense.named_parameters())
    n4 = 0
    for name, module in streamed.named_modules():
        if type(module).__name__ == "Linear4bit":
            expected = quantize_weight(dense_params[name + ".weight"].data, settings)
            _assert_same_4bit(module, expected, name)
            assert module.compute_dtype == settings.compute_dtype
            assert module.support_avx512bf16_for_cpu is False  # keep_compute_dtype was applied
            n4 += 1
    assert n4 == 7 * dense.config.num_hidden_layers  # every linear but the head
    assert streamed.lm_head.weight.dtype == settings.compute_dtype
    assert torch.equal(streamed.lm_head.weight, dense.lm_head.weight.to(settings.compute_dtype))


def test_stream_matches_transformers_4bit_load(tmp_path):
    """The streaming loader gives transformers' 4-bit model: same tensors, same logits, bit for bit."""
    from peftlab.model.load import load_base_model
    from peftlab.recipe.schema import QuantizationConfig

    path = str(resolve_builtin("builtin:micro-llama"))
    kw = {"dtype": torch.float32, "device": torch.device("cpu"), "quant": QuantizationConfig()}
    ours = load_base_model(path, **kw)
    ref = load_base_model(path, loader="transformers", **kw)
    assert type(ours.model.layers[0].mlp.up_proj) is type(ref.model.layers[0].mlp.up_proj)
    ref_params = dict(ref.named_parameters())
    assert set(dict(ours.named_parameters())) == set(ref_params)
    for name, p in ours.named_parameters():
        if getattr(p, "quant_state", None) is not None:
            _assert_same_4bit(ours.get_submodule(name.rsplit(".", 1)[0]), ref_params[name], name)
        else:
            assert torch.equal(p, ref_params[name]), name
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)


def test_random_init_is_seeded_and_equals_its_saved_checkpoint(tmp_path):
    """random_quantized(config, seed) == load_quantized(save_random_checkpoint(config, seed)) bitwise."""
    config = resolve_builtin("builtin:micro-llama")
    settings = QuantSettings()
    a = random_quantized(config, settings, seed=5)
    save_random_checkpoint(config, tmp_path, dtype=torch.float32, seed=5, max_shard_size=256 << 10)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    b = load_quantized(tmp_path, settings)
    c = random_quantized(config, settings, seed=6)
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[k].data, pb[k].data) for k in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"].data,
                           pc["model.layers.0.self_attn.q_proj.weight"].data)
    assert abs(float(pa["lm_head.weight"].std()) - a.config.initializer_range) < 2e-3


def test_tied_embeddings_stay_tied(tmp_path, shared_data):
    """A tied-head architecture (Llama-3.2-1B's config, shrunk) loads with the head tied, not zeroed."""
    cfg = json.loads((shared_data / "configs" / "llama-3.2-1b" / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=320)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    save_random_checkpoint(tmp_path / "cfg", tmp_path / "ckpt", dtype=torch.bfloat16, seed=1)
    keys = [k for k, _ in iter_tensors(tmp_path / "ckpt")]
    assert "lm_head.weight" not in keys
    m = load_quantized(tmp_path / "ckpt", QuantSettings())
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert float(m.lm_head.weight.abs().sum()) > 0


PEAK_SCRIPT = r"""
import json, sys, psutil, torch
from peftlab.engine.planner import peak_rss_bytes
from peftlab.model.quantized_load import QuantSettings, empty_model, load_quantized, quantize_weight
torch.set_num_threads(1)
quantize_weight(torch.randn(64, 64), QuantSettings())  # load bitsandbytes' CPU kernels first
empty_model(sys.argv[1], dtype=torch.float32)  # and import the architecture's modeling code
base = psutil.Process().memory_info().rss
m = load_quantized(sys.argv[1], QuantSettings())
peak = peak_rss_bytes()
model_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
model_bytes += sum(p.quant_state.absmax.nbytes for p in m.parameters() if getattr(p, "quant_state", None) is not None)
print(json.dumps({"base": base, "peak": peak, "model_bytes": model_bytes}))
"""


@pytest.mark.slow
def test_streaming_peak_memory_is_below_the_16bit_model(tmp_path):
    """A ~300 MB bf16 checkpoint (fp32 compute: 600 MB dense in memory) loads in far less than that."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
           "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
           "num_key_value_heads": 8, "vocab_size": 512, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    ckpt = save_random_checkpoint(tmp_path / "cfg", tmp_path / "ckpt", dtype=torch.bfloat16, seed=0,
                                  max_shard_size=100 << 20)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert ckpt_bytes > 280e6
    out = subprocess.run([sys.executable, "-P", "-c", PEAK_SCRIPT, str(ckpt)], check=False, capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    # peak is the child's own high-water mark (VmHWM): ru_maxrss would start at the pytest worker's
    # size and made this test flaky. The dense model in the compute dtype would be 2x the checkpoint.
    assert growth < ckpt_bytes, (growth, ckpt_bytes, r)


@pytest.mark.parametrize("quant_type, double_quant, storage", [("nf4", True, torch.uint8), ("fp4", False, torch.uint8),
                                                              ("nf4", True, torch.bfloat16)])
def test_chunked_cpu_quantisation_is_bitwise_bitsandbytes(monkeypatch, quant_type, double_quant, storage):
    """Quantising a weight in chunks (what the streaming loader does on the CPU for big weights) gives the
    same bytes and state as bitsandbytes' whole-tensor quantize_4bit, including a trailing partial block."""
    import bitsandbytes.functional as bnbf

    from peftlab.model import quantized_load as streaming

    monkeypatch.setattr(streaming, "CPU_QUANT_CHUNK", 64 * 7)  # several chunks; the last one partial
    w = torch.randn(37, 104, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 60 blocks + 8
    settings = QuantSettings(quant_type, double_quant, 64, torch.bfloat16, storage)
    packed, state = streaming.quantize_4bit_cpu_chunked(w, settings)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type,
                                         quant_storage=storage)
    assert packed.dtype == ref_packed.dtype and torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert torch.equal(state.absmax, ref.absmax) and state.shape == ref.shape and state.dtype == ref.dtype
    if double_quant:
        assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
        assert torch.equal(state.state2.code, ref.state2.code)
    param = streaming.quantize_weight(w, settings)  # the loader's entry point takes the chunked path here
    assert torch.equal(bnbf.dequantize_4bit(param.data, param.quant_state), bnbf.dequantize_4bit(ref_packed, ref))
