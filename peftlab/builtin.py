"""The built-in tiny model: ``builtin:tiny-llama``.

A small Llama-architecture causal LM (about 3M parameters) with a byte-level tokenizer that has a
Llama-3-style chat template. It is built locally and deterministically on first use (no network),
saved as an ordinary Hugging Face model directory under the peftlab cache, and from then on loaded
through the same ``from_pretrained`` path as any hub or local model. It is what the quickstart and
the test suite train.

Like a real base model it has seen "pre-training" text before anyone fine-tunes it: the build runs
a short, seeded, single-threaded full-parameter training on raw-text skills (``3 + 4 = 7``,
``sort(5 2 9) = 2 5 9``, ``after c comes d``, ...). It has never seen the chat template; teaching it
to answer instructions in chat form is the fine-tuning the quickstart does with QLoRA.

The tokenizer is byte-level BPE with no merges: every byte is one token, so it needs no training
data, is identical on every machine, and gives exact character offsets (which the data pipeline's
loss masks rely on).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError

BUILTIN_PREFIX = "builtin:"

# Llama-3 style header/turn markers; eos is the end-of-turn token so generation stops after a reply.
SPECIAL_TOKENS = {
    "bos": "<|begin_of_text|>",
    "eot": "<|eot_id|>",
    "pad": "<|pad|>",
    "end_of_text": "<|end_of_text|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture of one built-in model (a transformers LlamaConfig subset)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 1024
    seed: int = 0
    pretrain_steps: int = 0
    version: int = 2


# Hidden/intermediate sizes are multiples of 64 so every linear weight splits into whole
# bitsandbytes 4-bit blocks (blocksize 64) and the Triton tiles see realistic alignment.
BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny-llama": BuiltinSpec(256, 704, 4, 8, 4, pretrain_steps=120),
    # a smaller sibling, used as a distillation student and in fast tests
    "micro-llama": BuiltinSpec(128, 384, 2, 4, 2, pretrain_steps=0),
}


def cache_root() -> Path:
    """Where built-in models are cached: $PEFTLAB_CACHE, else ~/.cache/peftlab."""
    env = os.environ.get("PEFTLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "peftlab"


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def build_tokenizer():
    """The byte-level tokenizer with chat template, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    tok.add_special_tokens(specials)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eot"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def skill_line(rng) -> str:
    """One line of the built-in model's pre-training text (raw skills, no chat template)."""
    import string

    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    s = " ".join(map(str, xs))
    k = rng.randrange(6)
    if k == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b} = {a + b}"
    if k == 1:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    if k == 2:
        return f"reverse({s}) = {' '.join(map(str, reversed(xs)))}"
    if k == 3:
        return f"sort({s}) = {' '.join(map(str, sorted(xs)))}"
    if k == 4:
        return f"max({s}) = {max(xs)}"
    c = rng.choice(string.ascii_lowercase[:-1])
    return f"after {c} comes {chr(ord(c) + 1)}"


def pretrain(model, tokenizer, steps: int, *, seed: int, batch: int = 24, lines: int = 4, lr: float = 3e-3) -> None:
    """Seeded full-parameter training on :func:`skill_line` text (the built-in model's "pre-training")."""
    import random

    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        text = [" ; ".join(skill_line(rng) for _ in range(lines)) for _ in range(batch)]
        enc = tokenizer(text, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_model_dir(name: str, out_dir: Path) -> None:
    """Build the named built-in model (random init from a fixed seed) into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = BUILTIN_MODELS[name]
    tokenizer = build_tokenizer()
    vocab_size = _round_up(len(tokenizer), 64)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    rng_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    # One thread and a private seed: the same weights on every run of the same machine type.
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    try:
        model = LlamaForCausalLM(config).to(torch.float32)
        if spec.pretrain_steps:
            pretrain(model, tokenizer, spec.pretrain_steps, seed=spec.seed)
    finally:
        torch.random.set_rng_state(rng_state)
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "peftlab_builtin.json").write_text(
        json.dumps({"name": name, "version": spec.version, "spec": spec.__dict__}, indent=2)
    )


def resolve_builtin(model_id: str) -> Path:
    """Return the local directory of ``builtin:<name>``, building it on first use.

    The build goes to a temporary directory that is renamed into place, so a crash mid-build never
    leaves a half-written model behind and concurrent builders (test workers, ranks) are safe.
    """
    name = model_id[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise PeftlabError(f"unknown built-in model {model_id!r}; available: {known}")
    spec = BUILTIN_MODELS[name]
    target = cache_root() / "builtin" / f"{name}-v{spec.version}"
    if (target / "peftlab_builtin.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_model_dir(name, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "peftlab_builtin.json").is_file():  # lost a race to a broken dir
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
