"""``peftlab data RECIPE``: show what the model will be trained on.

Tokens are decoded run by run (a run = consecutive tokens that are all trained or all not), so the
marks sit exactly where the labels change, whatever the tokenizer's merges.
"""
from __future__ import annotations

from typing import Any

from peftlab.data.build import DataBundle
from peftlab.data.preference_rows import is_preference_example
from peftlab.data.tokenize import IGNORE_INDEX

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def mark_trained(ids: list[int], labels: list[int], tokenizer: Any, *, color: bool = False) -> str:
    """Decode ``ids`` with trained runs inside ``[[...]]`` (or ANSI green)."""
    out: list[str] = []
    k = 0
    while k < len(ids):
        trained = labels[k] != IGNORE_INDEX
        j = k
        while j < len(ids) and (labels[j] != IGNORE_INDEX) == trained:
            j += 1
        text = tokenizer.decode(ids[k:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained:
            out.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
        else:
            out.append(text)
        k = j
    return "".join(out)


def render_preview(bundle: DataBundle, tokenizer: Any, n: int = 3, *, color: bool = False) -> str:
    parts = []
    for k, ex in enumerate(list(bundle.train[:n]) if hasattr(bundle.train, "__getitem__")
                           else _take(bundle.train, n)):
        if is_preference_example(ex):  # a pair (or a KTO completion): the prompt, then each answer marked
            parts.append(render_preference(ex, k, bundle, tokenizer, color=color))
            continue
        if "label" in ex:
            text = tokenizer.decode(ex["input_ids"], skip_special_tokens=False)
            parts.append(f"--- sample {k} (label {ex['label']}, {len(ex['input_ids'])} tokens)\n{text}")
            continue
        trained = sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        if "seq_lens" in ex:
            head = (f"--- pack {k}: {len(ex['seq_lens'])} samples {ex['seq_lens']}, {len(ex['input_ids'])} "
                    f"tokens, {trained} trained")
            body, pos = [], 0
            for n_tok in ex["seq_lens"]:
                # show the sample's own first label (packing hides it from the shifted loss anyway)
                body.append(mark_trained(ex["input_ids"][pos:pos + n_tok], ex["labels"][pos:pos + n_tok],
                                         tokenizer, color=color))
                pos += n_tok
            parts.append(head + "\n" + "\n~~~ next sample ~~~\n".join(body))
        else:
            name = bundle.dataset_names[ex["dataset"]] if 0 <= ex["dataset"] < len(bundle.dataset_names) else "?"
            head = f"--- sample {k} ({name}, {len(ex['input_ids'])} tokens, {trained} trained)"
            parts.append(head + "\n" + mark_trained(ex["input_ids"], ex["labels"], tokenizer, color=color))
    legend = "trained tokens are green" if color else "trained tokens are inside [[...]]"
    return f"({legend})\n" + "\n".join(parts)


def render_preference(ex: dict[str, Any], k: int, bundle: DataBundle, tokenizer: Any, *, color: bool = False) -> str:
    """One preference example: its prompt once, then the chosen and rejected answers (a KTO completion and
    whether it is desirable), trained tokens marked."""
    name = bundle.dataset_names[ex["dataset"]] if 0 <= ex.get("dataset", -1) < len(bundle.dataset_names) else "?"
    prompt = tokenizer.decode(ex["prompt_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "chosen_ids" in ex:
        answers = [("chosen", ex["chosen_ids"], ex["chosen_labels"]),
                   ("rejected", ex["rejected_ids"], ex["rejected_labels"])]
    else:
        answers = [("desirable" if ex["desirable"] else "undesirable", ex["completion_ids"], ex["completion_labels"])]
    kind = "pair" if len(answers) == 2 else "completion"
    lines = [f"--- {kind} {k} ({name}, prompt {len(ex['prompt_ids'])} tokens)", prompt]
    for what, ids, labels in answers:
        lines.append(f">>> {what} ({len(ids)} tokens): " + mark_trained(ids, labels, tokenizer, color=color))
    return "\n".join(lines)


def _take(it: Any, n: int) -> list[dict[str, Any]]:
    out = []
    for ex in it:
        if len(out) >= n:
            break
        out.append(ex)
    return out
