"""Text generation with a (LoRA-adapted) causal LM: greedy or sampled decoding, batched.

Prompts are rendered with the tokenizer's chat template (as a single user turn) unless they are
already token ids; batches are left-padded so every row's continuation starts at the same column.
Decoding itself is transformers' ``generate`` (KV cache, stopping at the tokenizer's eos / end of
turn).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def chat_prompt_ids(tokenizer: Any, text: str, system: str | None = None) -> list[int]:
    """Token ids of ``text`` as one user turn plus the assistant header (plain text when the tokenizer has
    no chat template), encoded exactly as training encodes its held-out prompts (one BOS, see
    :class:`peftlab.data.tokenize.Encoder`) — so an adapter is sampled with the prompts it was trained on."""
    from peftlab.data.templates import ChatRenderer
    from peftlab.data.tokenize import Encoder

    encoder = Encoder(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = ChatRenderer(tokenizer).render(messages, add_generation_prompt=True)
    return encoder.encode_prompt(text)


def stop_token_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(eos if isinstance(eos, list) else [eos])
    for tok in ("<|eot_id|>", "<|im_end|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, batch_size: int = 16) -> list[list[int]]:
    """Continuations (token ids, without the prompt and without the stop token) of each prompt."""
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    if do_sample and seed is not None:
        torch.manual_seed(seed)
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                          "eos_token_id": stops, "pad_token_id": pad, "use_cache": True}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row in res[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stops), len(row))
                out.append(row[:cut])
    finally:
        model.train(was_training)
    return out


def generate_text(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, system: str | None = None,
                  **kwargs: Any) -> list[str]:
    ids = [chat_prompt_ids(tokenizer, p, system) for p in prompts]
    return [tokenizer.decode(c, skip_special_tokens=True) for c in generate_ids(model, tokenizer, ids, **kwargs)]
