"""peftlab.export: GGUF read back with gguf.GGUFReader matches the merged model; the q/k permutation
is llama.cpp's rotary convention; PEFT-format export round-trips through PEFT and peftlab."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

from peftlab.builtin import CHAT_TEMPLATE, SPECIAL_TOKENS, resolve_builtin
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.export import export_gguf, export_peft, llama_permute
from peftlab.lora import inject_lora, load_adapter, lora_modules, save_adapter
from peftlab.merge import merge_adapter

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}"




@pytest.fixture(scope="module")
def adapter(micro_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=4, alpha=8, target_modules="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in sorted(lora_modules(model).items()):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out, base_model_name_or_path="builtin:micro-llama")
    return out


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "m"
    merge_adapter(adapter, out, report_samples=0, log=lambda *a: None)
    return out


def read_gguf(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, fields


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_gguf_reads_back_with_names_shapes_values_tokenizer_and_template(merged, tmp_path, qtype):
    result = export_gguf(merged, tmp_path / "model.gguf", type=qtype)
    reader, fields = read_gguf(result.path)
    config = json.loads((merged / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(merged.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    # metadata
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.embedding_length"] == config["hidden_size"]
    assert fields["llama.attention.head_count"] == config["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    # tokenizer + chat template
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"]
    assert "a" in tokens and SPECIAL_TOKENS["bos"] in tokens
    assert tokens.index(SPECIAL_TOKENS["bos"]) == fields["tokenizer.ggml.bos_token_id"] == config["bos_token_id"]
    assert tokens.index(SPECIAL_TOKENS["eot"]) == fields["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "tokenizer.ggml.merges" in reader.fields  # llama.cpp requires the key (empty: a merge-free vocab)
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    # tensors: llama.cpp names, GGUF's reversed dims, and values (q/k permuted as llama.cpp's converter does)
    assert sorted(t.name for t in reader.tensors) == sorted(gguf_name(k) for k in weights)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    by_name = {t.name: t for t in reader.tensors}
    for key, w in weights.items():
        t = by_name[gguf_name(key)]
        assert list(t.shape) == list(reversed(w.shape)), key
        expected = w.numpy()
        if key.endswith("q_proj.weight"):
            expected = llama_permute(expected, n_head, n_head)
        elif key.endswith("k_proj.weight"):
            expected = llama_permute(expected, n_head, n_kv)
        want_type = "F32" if (w.dim() == 1 or qtype == "f32") else "F16"
        assert t.tensor_type.name == want_type, key
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected.astype(t.data.dtype)), key


def test_gguf_quantised_types_dequantise_close(merged, tmp_path):
    weights = load_file(str(next(merged.glob("*.safetensors"))))
    w = weights["model.layers.0.mlp.up_proj.weight"].numpy()
    sizes = {}
    for qtype, tol in (("q8_0", 0.01), ("q4_0", 0.2), ("bf16", 0.01)):
        result = export_gguf(merged, tmp_path / f"{qtype}.gguf", type=qtype)
        sizes[qtype] = result.path.stat().st_size
        reader, _ = read_gguf(result.path)
        t = {x.name: x for x in reader.tensors}["blk.0.ffn_up.weight"]
        assert t.tensor_type.name == qtype.upper()
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        rel = np.abs(back - w).max() / np.abs(w).max()
        assert 0 <= rel < tol, (qtype, rel)
        assert {x.name: x for x in reader.tensors}["output_norm.weight"].tensor_type.name == "F32"
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["bf16"]


def _rope_half(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """HF Llama: rotate the first half of each head against the second half."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_pairs(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """llama.cpp's Llama RoPE (LLAMA_ROPE_TYPE_NORM): rotate adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * ang.cos() - x1 * ang.sin()
    out[..., 1::2] = x0 * ang.sin() + x1 * ang.cos()
    return out


def test_qk_permutation_makes_llama_cpp_rope_compute_hf_attention_scores():
    """Why the permutation: with permuted q/k weights, llama.cpp's pairwise RoPE gives the same q·k
    attention scores as HF's half-rotation on the original weights (GQA: k has fewer heads)."""
    g = torch.Generator().manual_seed(0)
    n_head, n_kv, d, hidden, seq = 4, 2, 16, 64, 7
    wq = torch.randn(n_head * d, hidden, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv * d, hidden, generator=g, dtype=torch.float64)
    x = torch.randn(seq, hidden, generator=g, dtype=torch.float64)
    pos = torch.arange(seq)
    wq_p = torch.from_numpy(llama_permute(wq.numpy(), n_head, n_head))
    wk_p = torch.from_numpy(llama_permute(wk.numpy(), n_head, n_kv))

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(seq, n_head, d).transpose(0, 1), pos)
        k = rope((x @ wk.T).view(seq, n_kv, d).transpose(0, 1), pos).repeat_interleave(n_head // n_kv, 0)
        return q @ k.transpose(-1, -2)

    hf = scores(wq, wk, _rope_half)
    torch.testing.assert_close(scores(wq_p, wk_p, _rope_pairs), hf)
    assert not torch.allclose(scores(wq, wk, _rope_pairs), hf)  # unpermuted weights would be wrong


def test_cli_gguf_from_adapter_merges_on_the_way(adapter, merged, tmp_path, capsys):
    out = tmp_path / "from-adapter.gguf"
    assert main(["export", "--format", "gguf", "--adapter", str(adapter), "--out", str(out), "--type", "f32"]) == 0
    assert "GGUF (f32, 21 tensors" in capsys.readouterr().out
    direct = export_gguf(merged, tmp_path / "direct.gguf", type="f32")
    a, b = gguf.GGUFReader(out), gguf.GGUFReader(direct.path)
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data))
    assert not list(tmp_path.glob(".peftlab-merge-*"))  # the intermediate merge is cleaned up
    # errors: one line, exit 2, nothing half-written
    assert main(["export", "--format", "gguf", "--model", str(merged), "--out", str(out)]) == 2
    assert "exists; choose a new file name or pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--model", str(merged), "--out", str(tmp_path / "m.bin")]) == 2
    assert "name it *.gguf" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--out", str(tmp_path / "n.gguf")]) == 2
    assert "exactly one of --model DIR" in capsys.readouterr().err


def test_cli_safetensors_export_and_push_to_hub_without_network(adapter, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["export", "--format", "safetensors", "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "bf16", "--push-to-hub", "me/merged"]) == 2
    err = capsys.readouterr().err
    assert "no network (HF_HUB_OFFLINE=1), nothing was uploaded" in err and "huggingface-cli upload me/merged" in err
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # the work is kept
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: builtin:micro-llama" in card and "max_abs_logit_diff" in card


def test_peft_export_round_trips_through_peft_and_peftlab(micro_dir, tmp_path):
    """A PEFT-trained adapter exported by peftlab loads in PEFT and in peftlab with identical logits, and
    a peftlab adapter loads in PEFT with the logits of peftlab's own layers."""
    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                        use_dora=True, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "peft", safe_serialization=False)  # legacy .bin: converted on export
    result = export_peft(tmp_path / "peft", tmp_path / "exported", base=str(micro_dir))
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert any("fit" in n for n in result.notes) and any("DoRA" in n for n in result.notes)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "exported")).eval()
        ours = copy.deepcopy(base)
        load_adapter(ours, tmp_path / "exported")
        assert torch.equal(via_peft(input_ids=ids).logits, want)
        assert torch.equal(ours.eval()(input_ids=ids).logits, want)
        # and back: peftlab's own adapter, exported, in PEFT
        save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(micro_dir))
        export_peft(tmp_path / "ours", tmp_path / "ours-exported")
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours-exported")).eval()
        assert torch.equal(again(input_ids=ids).logits, want)


def test_peft_export_rejects_adapters_that_do_not_fit(micro_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=4, alpha=8, target_modules=["v_proj"])
    save_adapter(model, tmp_path / "a", base_model_name_or_path=str(micro_dir))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8}))
    with pytest.raises(PeftlabError, match="has rank 4 but adapter_config.json says 8"):
        export_peft(tmp_path / "a", tmp_path / "o")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    tiny = resolve_builtin("builtin:tiny-llama")  # hidden 256: the micro adapter (hidden 128) does not fit
    with pytest.raises(PeftlabError, match=r"maps 128 -> 64 features but .* has 256 -> 128; wrong base model"):
        export_peft(tmp_path / "a", tmp_path / "o", base=str(tiny))
