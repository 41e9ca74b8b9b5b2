"""peftlab.export.gguf: GGUF read back with gguf.GGUFReader matches the merged model; the q/k permutation
is llama.cpp's rotary convention; everything the export refuses is refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

gguf = pytest.importorskip("gguf")

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.adapters.peft_format import save_adapter
from peftlab.cli.main import main
from peftlab.errors import PeftlabError
from peftlab.export.gguf import export_gguf, llama_permute
from peftlab.export.merge import merge_adapter
from peftlab.model.builtin import CHAT_TEMPLATE, SPECIAL_TOKENS

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
    merge_adapter(adapter, out, report_samples=0)
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


# --------------------------------------------------------------------------------------------------
# SentencePiece vocabularies (Llama-2, Mistral): scores and types as SentencePiece has them, so that
# llama.cpp's tokenizer splits text as the HF tokenizer does


def alpaca_texts(shared_data: Path, n: int = 200) -> list[str]:
    rows = json.loads((shared_data / "datasets" / "alpaca" / "alpaca_small.json").read_text())[:n]
    return ["\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows]


def tiny_llama_dir(out: Path, tokenizer, **config) -> Path:
    """A random 1-layer Llama with the tokenizer's vocabulary, saved as a merge saves it (safetensors +
    ``tokenizer.save_pretrained``: transformers 5 writes tokenizer.json and chat_template.jinja only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id} | config
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class LlamaCppSpm:
    """llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm``) over a GGUF vocabulary, written from its
    description: spaces become "▁" (one prefixed), the text is split into characters, and the adjacent
    pair whose concatenation is the highest-scoring vocabulary entry is merged (ties: leftmost) until
    no pair is in the vocabulary; characters outside it become their UTF-8 byte tokens ``<0xNN>``."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.scores, self.add_space_prefix = scores, add_space_prefix
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.BYTE}

    def encode(self, text: str) -> list[int]:
        import heapq

        ids, scores = self.ids, self.scores
        syms: list[str | None] = list((" " + text if self.add_space_prefix else text).replace(" ", "\u2581"))
        nxt = list(range(1, len(syms))) + [-1]
        prev = list(range(-1, len(syms) - 1))
        heap: list[tuple[float, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                merged = syms[left] + syms[right]
                if merged in ids:
                    heapq.heappush(heap, (-scores[ids[merged]], left, right, merged))

        for i in range(len(syms) - 1):
            add(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if syms[left] is None or syms[right] is None or nxt[left] != right or syms[left] + syms[right] != merged:
                continue  # stale: one side was merged elsewhere since
            syms[left], syms[right] = merged, None
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out, i = [], 0 if syms else -1
        while i >= 0:
            s = syms[i]
            out.extend([ids[s]] if s in ids else [self.byte_ids[b] for b in s.encode("utf-8")])
            i = nxt[i]
        return out


def spm_reference(tokenizer_dir: Path) -> tuple[list[float], list[int]]:
    """Scores and types of every piece, read by the sentencepiece library (types as llama.cpp's converter
    derives them from it)."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is the reference for SentencePiece scores")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    t = gguf.TokenType
    types = [t.UNKNOWN if sp.IsUnknown(i) else t.CONTROL if sp.IsControl(i) else t.UNUSED if sp.IsUnused(i)
             else t.BYTE if sp.IsByte(i) else t.NORMAL for i in range(sp.vocab_size())]
    return [sp.GetScore(i) for i in range(sp.vocab_size())], [int(x) for x in types]


@pytest.mark.parametrize("with_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json-only"])
@pytest.mark.parametrize("name", ["llama2-7b-chat", "mistral-7b"])
def test_gguf_sentencepiece_vocab_has_sentencepiece_scores_types_and_tokenizes_like_hf(
        shared_data, tmp_path, capsys, name, with_model_file):
    """With tokenizer.model (llama.cpp's converter reads scores and types from it) and without (a merged
    directory: transformers 5 saves tokenizer.json only), the GGUF's vocabulary makes llama.cpp's
    SentencePiece tokenizer split 200 Alpaca texts exactly as the HF tokenizer does. Placeholder scores
    (-1000 everywhere) split most of them differently."""
    from transformers import AutoTokenizer

    src = shared_data / "tokenizers" / name
    hf = AutoTokenizer.from_pretrained(src)
    model = tiny_llama_dir(tmp_path / "m", hf)
    if with_model_file:
        (model / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size / 1e6:.1f} MB) -> {out}" in printed  # the file's size, tokenizer included
    _, fields = read_gguf(out)
    tokens, scores, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"], \
        fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert tokens == [hf.convert_ids_to_tokens(i) for i in range(len(hf))]
    t = gguf.TokenType
    assert types[:4] == [t.UNKNOWN, t.CONTROL, t.CONTROL, t.BYTE]  # <unk> <s> </s> <0x00>
    assert fields["tokenizer.ggml.bos_token_id"] == hf.bos_token_id and fields["tokenizer.ggml.add_bos_token"]
    if name == "mistral-7b":  # its only template is chat_template.jinja
        assert fields["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()

    texts = alpaca_texts(shared_data)
    want = [hf(t)["input_ids"] for t in texts]
    bos = [fields["tokenizer.ggml.bos_token_id"]]
    llama_cpp = LlamaCppSpm(tokens, scores, types, add_space_prefix=True)
    assert sum(bos + llama_cpp.encode(t) != w for t, w in zip(texts, want)) == 0
    placeholder = LlamaCppSpm(tokens, [-1000.0] * len(tokens), types, add_space_prefix=True)
    assert sum(bos + placeholder.encode(t) != w for t, w in zip(texts, want)) > 100  # the issue's: scores matter
    if name == "llama2-7b-chat" and not with_model_file:
        # and transformers' own GGUF tokenizer loader (merges rebuilt from the scores) agrees
        back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        assert [back(t)["input_ids"] for t in texts] == want
    # last, as it needs the sentencepiece library (a dev dependency): scores and types are SentencePiece's
    spm_scores, spm_types = spm_reference(src)
    assert types == spm_types  # <unk> UNKNOWN, <s> </s> CONTROL, <0xNN> BYTE, the rest NORMAL
    if with_model_file:
        assert scores == pytest.approx(spm_scores, abs=0)
    else:  # tokenizer.json has no scores: minus the merge rank orders the merges as SentencePiece's scores do
        merged = [i for i in range(len(tokens)) if types[i] == gguf.TokenType.NORMAL and len(tokens[i]) > 1]
        assert sorted(merged, key=lambda i: (-scores[i], i)) == sorted(merged, key=lambda i: (-spm_scores[i], i))


# --------------------------------------------------------------------------------------------------
# chat template: the one transformers loads (chat_template.jinja first), also without tokenizer_config


@pytest.mark.parametrize("layout", ["stale-config-template", "no-tokenizer-config"])
def test_gguf_embeds_chat_template_jinja_as_transformers_loads_it(merged, tmp_path, capsys, layout):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(merged, model)
    trained = "{% for m in messages %}<|trained|>{{ m['content'] }}{% endfor %}"
    (model / "chat_template.jinja").write_text(trained)
    config_file = model / "tokenizer_config.json"
    if layout == "stale-config-template":
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"chat_template": "stale"}))
        assert AutoTokenizer.from_pretrained(model).chat_template == trained  # transformers' precedence
    else:
        config_file.unlink()
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(model), "--out", str(out), "--type", "f32"]) == 0
    assert "no chat template" not in capsys.readouterr().out
    _, fields = read_gguf(out)
    assert fields["tokenizer.chat_template"] == trained
    assert fields["tokenizer.ggml.bos_token_id"] == json.loads((model / "config.json").read_text())["bos_token_id"]


# --------------------------------------------------------------------------------------------------
# Llama-3 RoPE scaling: the rope_freqs tensor; logits of an independent llama.cpp-style forward pass
# over the GGUF equal transformers' beyond the original context length


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def llama_cpp_rope_factors(head_dim: int, rope: dict) -> list[float]:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, restated."""
    import math

    base = torch.tensor(rope["rope_theta"], dtype=torch.float32)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return out


def gguf_llama_logits(path: Path, ids: list[int], use_rope_freqs: bool = True) -> np.ndarray:
    """A Llama forward pass in float64 over a GGUF file as llama.cpp computes it: permuted q/k rows, RoPE
    on adjacent pairs with angle ``pos·base^(-2i/d) / rope_freqs[i]``, GQA, SwiGLU, RMSNorm."""
    reader, f = read_gguf(path)
    w = {t.name: np.asarray(t.data, dtype=np.float64).reshape(tuple(reversed([int(x) for x in t.shape])))
         for t in reader.tensors}
    n_head, n_kv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, base, d = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"], f["llama.rope.dimension_count"]
    factors = w["rope_freqs.weight"] if use_rope_freqs and "rope_freqs.weight" in w else np.ones(d // 2)
    pos = np.arange(len(ids))
    theta = pos[:, None] * base ** (-2.0 * np.arange(d // 2) / d)[None] / factors[None]
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x):  # x: (T, heads, d); pairs (2i, 2i+1)
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    x = w["token_embd.weight"][ids]
    T = len(ids)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(f["llama.block_count"]):
        p = f"blk.{layer}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(T, n_head, d))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(T, n_kv, d))
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, d)
        heads = []
        for hd in range(n_head):
            kv = hd // (n_head // n_kv)
            s = q[:, hd] @ k[:, kv].T / np.sqrt(d) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["output.weight"].T


@pytest.fixture(scope="module")
def llama3_dir(micro_dir, tmp_path_factory) -> Path:
    """A tiny Llama with Llama-3.1 RoPE scaling and an original context of 64 positions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_dir)
    return tiny_llama_dir(tmp_path_factory.mktemp("llama3") / "m", tok, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)


def test_gguf_llama3_rope_freqs_and_logits_beyond_the_original_context(llama3_dir, tmp_path):
    result = export_gguf(llama3_dir, tmp_path / "l3.gguf", type="f32")
    reader, fields = read_gguf(result.path)
    assert fields["llama.context_length"] == 1024 and "llama.rope.scaling.type" not in fields
    rope_freqs = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    assert rope_freqs.tensor_type.name == "F32"
    factors = np.array(rope_freqs.data)
    head_dim = 16
    np.testing.assert_allclose(factors, llama_cpp_rope_factors(head_dim, LLAMA3_ROPE), rtol=1e-6)
    assert factors[0] == 1.0 and 1.0 < factors[1] < factors[2] < 8.0 and (factors[3:] == 8.0).all()
    model = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32, attn_implementation="eager").eval()
    base = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    torch.testing.assert_close(base / torch.from_numpy(factors).double(),
                               model.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (200,), generator=torch.Generator().manual_seed(0)).tolist()  # 200 > 64
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_llama_logits(result.path, ids)
    late = slice(64, None)
    np.testing.assert_allclose(got[late], want[late], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    unscaled = gguf_llama_logits(result.path, ids, use_rope_freqs=False)
    assert np.abs(unscaled[late] - want[late]).max() > 50 * np.abs(got[late] - want[late]).max()


def test_cli_gguf_of_a_llama3_adapter_merges_and_exports(llama3_dir, tmp_path, capsys):
    """Was refused after the full merge; now merged and exported with rope_freqs."""
    model = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32)
    inject_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "a", base_model_name_or_path=str(llama3_dir))
    out = tmp_path / "l3.gguf"
    assert main(["export", "--format", "gguf", "--adapter", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out).tensors}
    assert not list(tmp_path.glob(".peftlab-merge-*"))


# --------------------------------------------------------------------------------------------------
# refusals before the merge: unknown architectures, other RoPE scalings, an unwritable --out


def tiny_model_dir(out: Path, micro_dir: Path, model_type: str, **config) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                               bos_token_id=256, eos_token_id=257, pad_token_id=258, **config)  # micro's ids
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(micro_dir).save_pretrained(out)
    return out


def _no_merge(*args, **kwargs):
    raise AssertionError("the merge started although the export is refused")


@pytest.mark.parametrize("model_type,config", [("qwen2", {}), ("gemma2", {"head_dim": 16}), ("phi3", {}),
                                               ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                              "rope_theta": 10000.0}})],
                         ids=["qwen2", "gemma2", "phi3", "llama-yarn"])
def test_cli_gguf_refuses_what_it_cannot_export_before_merging_and_names_a_command_that_works(
        micro_dir, tmp_path, capsys, monkeypatch, model_type, config):
    import shlex

    import peftlab.export.merge

    base = tiny_model_dir(tmp_path / "base", micro_dir, model_type, **config)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inject_lora(model, r=2, alpha=4, target_modules="all-linear")
    save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base))
    out = tmp_path / "out" / "model.gguf"
    monkeypatch.setattr(peftlab.export.merge, "merge_adapter", _no_merge)
    capsys.readouterr()
    assert main(["export", "--format", "gguf", "--adapter", str(tmp_path / "a"), "--base", str(base),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "convert_hf_to_gguf.py" in err
    assert (f"is '{model_type}'" in err) if model_type != "llama" else ("rope type 'yarn'" in err)
    assert not out.exists() and not list(out.parent.glob(".peftlab-merge-*"))
    # --model: the same refusal, naming the converter on that directory
    assert main(["export", "--format", "gguf", "--model", str(base), "--out", str(out)]) == 2
    assert f"convert_hf_to_gguf.py {base} --outfile {out} --outtype f16" in capsys.readouterr().err
    # the peftlab step of the advice works as written
    monkeypatch.undo()
    step = err.split("`")[1]
    assert step == f"peftlab export --format safetensors --adapter {tmp_path / 'a'} --base {base} --out " \
                   f"{out.parent / 'model-merged'}"
    assert main(shlex.split(step)[1:]) == 0
    merged = Path(shlex.split(step)[-1])
    assert json.loads((merged / "config.json").read_text())["model_type"] == model_type


def test_cli_gguf_unwritable_out_is_refused_before_merging(adapter, tmp_path, capsys, monkeypatch):
    import peftlab.export.merge

    monkeypatch.setattr(peftlab.export.merge, "merge_adapter", _no_merge)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    candidates = [blocker / "model.gguf"]
    if Path("/sys").is_dir():  # permission denied even for root (sysfs)
        candidates.append(Path("/sys/peftlab-test/model.gguf"))
    for out in candidates:
        assert main(["export", "--format", "gguf", "--adapter", str(adapter), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}: cannot write to {out.parent}" in err
        assert "choose a --out in a directory you can write to" in err
    assert blocker.read_text() == "not a directory"


def test_cli_gguf_export_failing_after_the_merge_keeps_the_merge(adapter, tmp_path, capsys, monkeypatch):
    import peftlab.export.gguf

    def disk_full(model_dir, out, **kwargs):
        raise PeftlabError(f"--out {out}: writing the GGUF file failed (No space left on device).")

    monkeypatch.setattr(peftlab.export.gguf, "export_gguf", disk_full)
    out = tmp_path / "model.gguf"
    assert main(["export", "--format", "gguf", "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    kept = tmp_path / "model-merged"
    assert f"The merged model is kept in {kept}: export it with --model {kept}" in err
    assert (kept / "config.json").is_file() and not list(tmp_path.glob(".peftlab-merge-*"))
    monkeypatch.undo()
    assert main(["export", "--format", "gguf", "--model", str(kept), "--out", str(out)]) == 0
