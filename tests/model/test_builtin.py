"""The built-in models and the quickstart task generator.

The built-in model is built locally on first use; the build must be deterministic (same weights in
two fresh caches), loadable through ``from_pretrained``, and its tokenizer must round-trip text and
carry the chat template. The quickstart generator must be deterministic for a seed and keep its eval
prompts out of the training set. Determinism of the pre-training loop is checked with a few steps
(the real build runs ``BUILTIN_MODELS[...].pretrain_steps``), so the module stays fast.
"""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.errors import PeftlabError
from peftlab.model import builtin
from peftlab.model.builtin import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_model_dir,
    build_tokenizer,
    cache_root,
    is_builtin,
    resolve_builtin,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert is_builtin(f"{BUILTIN_PREFIX}tiny-llama") and not is_builtin("meta-llama/Llama-3.1-8B")
    with pytest.raises(PeftlabError, match="unknown built-in model"):
        resolve_builtin("builtin:nope")


def test_one_process_builds_and_a_broken_leftover_is_replaced(tmp_path, monkeypatch):
    """Concurrent callers wait for one build (a file lock) and find it; a directory without its
    peftlab_builtin.json (an interrupted build) is replaced, and no temporary directory is left behind."""
    import threading
    import time

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    builds = []

    def fake_build(name, out_dir, **kwargs):
        builds.append(name)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        (out_dir / "config.json").write_text("{}")
        (out_dir / builtin.BUILT_MARKER).write_text("{}")

    monkeypatch.setattr(builtin, "build_model_dir", fake_build)
    target = tmp_path / "builtin" / f"micro-llama-v{BUILTIN_MODELS['micro-llama'].version}"
    target.mkdir(parents=True)
    (target / "half-written.safetensors").write_bytes(b"x")
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_builtin("builtin:micro-llama")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target] and builds == ["micro-llama"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", builtin.BUILT_MARKER]
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [target.name]


def test_micro_llama_builds_deterministically_and_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = []
    for sub in ("a", "b"):
        monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / sub))
        d = resolve_builtin("builtin:micro-llama")
        assert d.is_relative_to(tmp_path / sub)
        assert resolve_builtin("builtin:micro-llama") == d  # cached: second call does not rebuild
        meta = json.loads((d / "peftlab_builtin.json").read_text())
        assert meta["name"] == "micro-llama" and meta["version"] == BUILTIN_MODELS["micro-llama"].version
        dirs.append(d)
    _assert_same_weights(*dirs)
    assert not [p for p in dirs[0].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32)
    spec = BUILTIN_MODELS["micro-llama"]
    assert model.config.hidden_size == spec.hidden_size
    assert model.config.num_hidden_layers == spec.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(dirs[0])
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 64 == 0
    ids = tok("3 + 4 = 7", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["micro-llama", "tiny-llama"])
def test_pretraining_is_deterministic(tmp_path, name):
    """The pre-training loop (a few steps here) gives bit-identical weights twice, and moves them."""
    a, b, untrained = tmp_path / "a", tmp_path / "b", tmp_path / "untrained"
    for d in (a, b, untrained):
        d.mkdir()
    build_model_dir(name, a, pretrain_steps=3)
    build_model_dir(name, b, pretrain_steps=3)
    build_model_dir(name, untrained, pretrain_steps=0)
    _assert_same_weights(a, b)
    wa, w0 = _weights(a), _weights(untrained)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)


def test_build_restores_global_torch_state(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model_dir("micro-llama", tmp_path, pretrain_steps=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_tokenizer_round_trips_and_has_chat_template():
    tok = build_tokenizer()
    for text in ["What is 3 + 4?", "Sort: 0 1 9\n  tabs\tand ünïcödé ✓", ""]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text.encode("utf-8"))  # byte level: one token per byte
        assert tok.decode(ids) == text
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token == SPECIAL_TOKENS["eot"] and tok.pad_token == SPECIAL_TOKENS["pad"]
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1 + 1?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    for special in SPECIAL_TOKENS.values():  # each special marker is a single token
        assert len(tok(special, add_special_tokens=False).input_ids) == 1


def test_skill_lines_are_correct():
    rng = random.Random(0)
    for _ in range(500):
        line = builtin.skill_line(rng)
        if " + " in line:
            a, rest = line.split(" + ")
            b, c = rest.split(" = ")
            assert int(a) + int(b) == int(c)
        elif " - " in line:
            a, rest = line.split(" - ")
            b, c = rest.split(" = ")
            assert int(a) - int(b) == int(c) >= 0
        elif line.startswith(("after ", "before ")):
            word, x, _, y = line.split()
            assert ord(y) - ord(x) == (1 if word == "after" else -1)
        else:
            head, ans = line.split(" = ")
            fn, items = head[:-1].split("(")
            xs = items.split()
            assert ans == {"first": xs[0], "last": xs[-1], "count": str(len(xs)), "max": max(xs)}[fn]


def _generator():
    spec = importlib.util.spec_from_file_location("make_quickstart_data", RECIPES / "make_quickstart_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_generator_is_deterministic_and_holds_out_eval(tmp_path):
    gen = _generator()
    train1, eval1 = gen.generate(1500, 200, seed=7)
    train2, eval2 = gen.generate(1500, 200, seed=7)
    assert train1 == train2 and eval1 == eval2
    train3, _ = gen.generate(1500, 200, seed=8)
    assert train3 != train1
    assert len(train1) == 1500 and len(eval1) == 200

    def prompt(ex: dict) -> str:
        return ex["messages"][0]["content"]

    eval_prompts = [prompt(e) for e in eval1]
    assert len(set(eval_prompts)) == len(eval_prompts)  # no duplicate eval prompts
    assert not set(eval_prompts) & {prompt(t) for t in train1}  # held out
    assert {e["task"] for e in eval1} == set(gen.TASKS)
    assert {t["task"] for t in train1} == set(gen.TASKS)
    for ex in train1 + eval1:
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"]

    # the CLI entry point writes the same rows as JSONL
    gen.main(["--out", str(tmp_path), "--train", "50", "--eval", "20", "--seed", "7"])
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows == gen.generate(50, 20, seed=7)[1]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 50


def test_quickstart_answers_are_correct():
    gen = _generator()
    train, held_out = gen.generate(800, 100, seed=3)
    for ex in train + held_out:
        q, a = ex["messages"][0]["content"], ex["messages"][1]["content"]
        task = ex["task"]
        if task in ("add", "sub"):
            expr = q.removeprefix("What is ").removesuffix("?")
            x, op, y = expr.split()
            assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y))
        elif task in ("next_letter", "prev_letter"):
            c = q.rstrip("?").split()[-1]
            assert ord(a) - ord(c) == (1 if task == "next_letter" else -1)
        else:
            xs = q.split(": ", 1)[1].split()
            assert a == {"first": xs[0], "last": xs[-1], "count": str(len(xs)), "max": max(xs)}[task]
