"""The built-in tiny model: ``builtin:tiny-llama``.

A small Llama-architecture causal LM (about 3M parameters) with a byte-level tokenizer that has a
Llama-3-style chat template. It is built locally and deterministically on first use (no network),
saved as an ordinary Hugging Face model directory under the peftlab cache, and from then on loaded
through the same ``from_pretrained`` path as any hub or local model. It is what the quickstart and
the test suite train.

Like a real base model it has seen "pre-training" text before anyone fine-tunes it: the build runs
a short, seeded full-parameter training (at most 2 threads, a fixed count so that a machine always
builds the same weights) on raw-text skills (``3 + 4 = 7``, ``after c comes d``,
``first(k z m) = k``, ``count(a b c) = 3``, ...). It has never seen the chat template; teaching it
to answer instructions in chat form is the fine-tuning the quickstart does with QLoRA. Change
``BuiltinSpec.version`` whenever what gets built changes: it is the cache key.

The tokenizer is byte-level BPE with no merges: every byte is one token, so it needs no training
data, is identical on every machine, and gives exact character offsets (which the data pipeline's
loss masks rely on).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError

BUILTIN_PREFIX = "builtin:"
BUILT_MARKER = "peftlab_builtin.json"  # written last: a directory without it is not a finished build

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
    "tiny-llama": BuiltinSpec(256, 704, 4, 8, 4, pretrain_steps=200, version=4),
    # a smaller sibling, used as a distillation student and in fast tests
    "micro-llama": BuiltinSpec(128, 384, 2, 4, 2, pretrain_steps=0),
}


BUILD_THREADS = 1  # one thread: identical weights on every machine, and no OpenMP stalls on busy CPUs


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


LETTERS = "abcdefghijklmnopqrstuvwxyz"
SKILLS = ("add", "sub", "next", "prev", "first", "last", "count", "max")


def _items(rng, alphabet: str, n_min: int = 2, n_max: int = 5) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(n_min, n_max))]


def skill_line(rng) -> str:
    """One line of the built-in model's pre-training text (raw skills, no chat template).

    Single-digit arithmetic, the letter after/before a letter, and the first item, last item,
    number of items and largest digit of a short list — the knowledge the quickstart's instruction
    task (``recipes/make_quickstart_data.py``) asks for in chat form.
    """
    k = rng.choice(SKILLS)
    if k == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b} = {a + b}"
    if k == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    if k == "next":
        i = rng.randrange(25)
        return f"after {LETTERS[i]} comes {LETTERS[i + 1]}"
    if k == "prev":
        i = rng.randrange(1, 26)
        return f"before {LETTERS[i]} comes {LETTERS[i - 1]}"
    if k == "max":
        xs = _items(rng, "0123456789")
        return f"max({' '.join(xs)}) = {max(xs)}"
    xs = _items(rng, LETTERS)
    s = " ".join(xs)
    if k == "first":
        return f"first({s}) = {xs[0]}"
    if k == "last":
        return f"last({s}) = {xs[-1]}"
    return f"count({s}) = {len(xs)}"


def pretrain(model, tokenizer, steps: int, *, seed: int, batch: int = 16, seq_len: int = 96,
             lr: float = 3e-3) -> None:
    """Seeded full-parameter training on :func:`skill_line` text (the built-in model's "pre-training").

    Each row is ``bos`` followed by newline-separated skill lines, packed to exactly ``seq_len``
    tokens (no padding, so every token trains).
    """
    import math
    import random

    import torch

    rng = random.Random(seed)
    bos = tokenizer.bos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0, foreach=False)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:  # linear warmup, then cosine decay to 5% of lr
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            ids = [bos]
            while len(ids) < seq_len:
                ids += tokenizer(skill_line(rng) + "\n", add_special_tokens=False).input_ids
            rows.append(ids[:seq_len])
        input_ids = torch.tensor(rows)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_model_dir(name: str, out_dir: Path, *, pretrain_steps: int | None = None) -> None:
    """Build the named built-in model (random init from a fixed seed, then pre-training) into ``out_dir``.

    ``pretrain_steps`` overrides the spec's step count (tests use a few steps to stay fast).
    """
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
    # A fixed thread count and a private seed: the same weights on every build on the same machine
    # (float reductions split the same way every time); at most 2 threads, so a build on a laptop
    # and on a big server agree as long as both have 2 cores or more.
    torch.set_num_threads(min(BUILD_THREADS, os.cpu_count() or 1))
    # Flush denormals to zero while pre-training: the logits of never-seen byte tokens sink until
    # their softmax outputs go subnormal, which makes CPU float math many times slower.
    torch.set_flush_denormal(True)
    torch.manual_seed(spec.seed)
    try:
        model = LlamaForCausalLM(config).to(torch.float32)
        steps = spec.pretrain_steps if pretrain_steps is None else pretrain_steps
        if steps:
            pretrain(model, tokenizer, steps, seed=spec.seed)
    finally:
        torch.random.set_rng_state(rng_state)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / BUILT_MARKER).write_text(
        json.dumps({"name": name, "version": spec.version, "spec": spec.__dict__}, indent=2)
    )


def resolve_builtin(model_id: str) -> Path:
    """Return the local directory of ``builtin:<name>``, building it on first use.

    One process builds (a file lock beside the cache entry), the others wait and find it built; the build
    goes to a temporary directory that is renamed into place (:func:`peftlab.checkpoint.atomic.atomic_directory`),
    so a crash mid-build never leaves a half-written model under the final name, and a leftover directory
    without its ``peftlab_builtin.json`` (an interrupted build of an older peftlab) is replaced.
    """
    from peftlab.checkpoint.atomic import atomic_directory, file_lock

    name = model_id[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise PeftlabError(f"unknown built-in model {model_id!r}; available: {known}")
    spec = BUILTIN_MODELS[name]
    target = cache_root() / "builtin" / f"{name}-v{spec.version}"
    if (target / BUILT_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"{target.name}.lock"):
        if not (target / BUILT_MARKER).is_file():  # else another process built it while this one waited
            with atomic_directory(target, overwrite=True) as tmp:
                build_model_dir(name, tmp)
    return target
