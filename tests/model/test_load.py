"""peftlab.model.load: which device and dtype a run gets, what a model name resolves to, the weight files that are
refused unread (pickles), the attention backend an architecture can run, and the counts the trainer reports.
(Gemma-2's attention fallback and soft-capping: test_gemma2.py; the 4-bit streaming loader: test_quantized_load.py.)"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.errors import PeftlabError
from peftlab.model.load import (
    attention_implementation,
    bnb_config,
    check_weight_files,
    count_parameters,
    load_base_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_path,
)
from peftlab.recipe.schema import QuantizationConfig


def test_device_and_dtype_choice(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(PeftlabError, match="train.device=cuda but no CUDA GPU is visible; use train.device: auto or cpu"):
        pick_device("cuda")
    # on a GPU: this process's local rank picks the device; bf16 where the GPU has it, else fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert pick_device("auto") == torch.device("cuda", 1)
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert pick_dtype("auto", torch.device("cuda", 0)) == dtype


def test_model_names_resolve_or_are_refused_with_the_fix(micro_dir, tmp_path):
    assert resolve_model_path("builtin:micro-llama") == str(micro_dir)
    assert resolve_model_path(str(micro_dir)) == str(micro_dir)
    assert resolve_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"  # a hub id, for transformers
    with pytest.raises(PeftlabError, match=r"is a local path without a config.json; point it at a Hugging Face model"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(PeftlabError, match=r"model.name='./nowhere': no such directory"):
        resolve_model_path("./nowhere")


def test_pickle_weights_are_refused_unread_with_a_conversion_command(micro_dir, tmp_path):
    check_weight_files("m", str(micro_dir))  # safetensors: fine
    shutil.copy(micro_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(PeftlabError, match=r"has no weights \(\*.safetensors\); point it at a complete"):
        check_weight_files("m", str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(PeftlabError, match=r"holds only pickle weights \(pytorch_model.bin\); peftlab does not load "
                                           r"pickle files .*save_pretrained\('.*', safe_serialization=True\)"):
        load_base_model(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))


def test_attention_backend_and_its_fallback(monkeypatch, caplog):
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    assert attention_implementation(cfg, "sdpa") == "sdpa" and attention_implementation(cfg, "eager") == "eager"
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    monkeypatch.setattr(LlamaForCausalLM, "_supports_flash_attn", False)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert attention_implementation(cfg, "sdpa") == "eager"
    assert "model.attn_implementation=sdpa: LlamaForCausalLM has no SDPA attention in transformers; using eager" \
        in caplog.text
    with pytest.raises(PeftlabError, match=r"teacher.attn=flash_attention_2: LlamaForCausalLM does not support it; "
                                           r"set teacher.attn to sdpa or eager"):
        attention_implementation(cfg, "flash_attention_2", key="teacher.attn")


def test_tokenizer_gets_a_pad_token_and_a_tokenizer_dir_needs_tokenizer_files(micro_dir, tmp_path):
    tok = load_tokenizer(str(micro_dir))
    assert tok.pad_token_id is not None
    (tmp_path / "notes.txt").write_text("no tokenizer here")
    with pytest.raises(PeftlabError, match=r"the directory has no tokenizer files .*point model.tokenizer at one"):
        load_tokenizer(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(micro_dir / f, tmp_path / f)
    assert load_tokenizer(str(tmp_path))("ab").input_ids == tok("ab").input_ids  # a tokenizer-only directory


def test_bitsandbytes_config_of_the_recipe_and_its_refusals(micro_dir):
    assert bnb_config(QuantizationConfig(mode="none"), torch.float32) is None
    qc = bnb_config(QuantizationConfig(mode="fp4", double_quant=False, quant_storage="bfloat16"), torch.bfloat16)
    assert (qc.load_in_4bit, qc.bnb_4bit_quant_type, qc.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16 and qc.bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(PeftlabError, match="quantization.blocksize: transformers' bitsandbytes loader uses 64"):
        load_base_model(str(micro_dir), dtype=torch.float32, device=torch.device("cpu"),
                        quant=QuantizationConfig(blocksize=128), loader="transformers")


def test_parameter_counts_are_logical_sizes(micro_dir):
    model = load_base_model(str(micro_dir), dtype=torch.float32, device=torch.device("cpu"),
                            quant=QuantizationConfig())
    dense = LlamaForCausalLM.from_pretrained(micro_dir)
    n = sum(p.numel() for p in dense.parameters())
    assert count_parameters(model)[1] == n  # 4-bit weights count the elements they stand for
    head = dense.lm_head.weight
    head.requires_grad_(True)
    head.ds_numel = head.numel()  # a ZeRO-3 partition: empty on this rank, its whole size in ds_numel
    head.data = torch.empty(0)
    assert count_parameters(dense) == (n, n)
