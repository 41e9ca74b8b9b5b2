"""Row formats: turn one raw row into one canonical record.

Canonical records (plain dicts, ``kind`` says which):

- ``{"kind": "chat", "messages": [{"role", "content", ...}]}`` — alpaca, sharegpt, messages, and
  prompt/completion rows whose prompt and completion are message lists;
- ``{"kind": "completion", "prompt": str, "completion": str}`` — raw prompt/completion text;
- ``{"kind": "text", "text": str}`` — continued pre-training;
- ``{"kind": "classification", "text": str, "label": str | int | float | bool}``.

A row that does not fit raises :class:`BadRow` naming the field and what was expected; the caller
adds the ``file:row`` location and applies ``on_bad_rows``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftlab.errors import PeftlabError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names seen in the wild -> chat roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool",
    "function": "tool", "observation": "tool", "function_response": "tool",
}
# canonical fields of each format (the keys users may remap with `fields:`)
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
}
MESSAGE_EXTRA_KEYS = ("tool_calls", "name", "tool_call_id")


class BadRow(Exception):
    """A row that does not match its format: ``field`` and what was ``expected``."""

    def __init__(self, field: str, expected: str):
        super().__init__(f"field {field!r}: {expected}")
        self.field = field
        self.expected = expected


def _get(row: Mapping[str, Any], fields: Mapping[str, str], key: str) -> tuple[str, Any]:
    name = fields.get(key, key)
    return name, row.get(name)


def detect_format(row: Any, fields: Mapping[str, str], where: str, dataset: str) -> str:
    """Pick the format from the first row's keys; refuse when none or several fit."""
    if not isinstance(row, Mapping):
        raise PeftlabError(f"{where}: expected each row to be an object, got {type(row).__name__}; "
                           f"set data.train[...].format for dataset {dataset!r} or fix the file")
    keys = set(row)

    def has(*canon: str) -> bool:
        return all(fields.get(c, c) in keys for c in canon)

    found = [
        fmt for fmt, ok in (
            ("messages", has("messages")),
            ("sharegpt", has("conversations")),
            ("alpaca", has("instruction", "output")),
            ("prompt_completion", has("prompt", "completion")),
            ("classification", has("text", "label")),
        ) if ok
    ]
    if not found and has("text"):
        found = ["text"]
    if len(found) == 1:
        return found[0]
    what = "several formats fit: " + ", ".join(found) if found else "no known format fits"
    raise PeftlabError(
        f"{where}: cannot detect the format of dataset {dataset!r} ({what}; row keys: {sorted(keys)}). "
        "Set `format:` (alpaca | sharegpt | messages | prompt_completion | text | classification) on the "
        "dataset, and `fields:` to map canonical names to your column names, e.g. "
        "fields: {instruction: question, output: answer}"
    )


def _str(row: Mapping[str, Any], fields: Mapping[str, str], key: str, *, optional: bool = False) -> str:
    name, v = _get(row, fields, key)
    if v is None:
        if optional:
            return ""
        raise BadRow(name, "missing; expected a string")
    if not isinstance(v, str):
        raise BadRow(name, f"expected a string, got {type(v).__name__}")
    return v


def _messages(turns: Any, field: str, *, sharegpt: bool) -> list[dict[str, Any]]:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise BadRow(field, "expected a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping):
            raise BadRow(f"{field}[{i}]", f"expected an object with {role_key!r} and {content_key!r}")
        # accept either key convention inside either format: real files mix them
        role = t.get(role_key, t.get("role" if sharegpt else "from"))
        content = t.get(content_key, t.get("content" if sharegpt else "value"))
        if not isinstance(role, str):
            raise BadRow(f"{field}[{i}].{role_key}", "missing; expected the speaker's role")
        canon = SHAREGPT_ROLES.get(role.lower()) if sharegpt else (role if role in ROLES else None)
        if canon is None:
            allowed = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise BadRow(f"{field}[{i}].{role_key}", f"unknown role {role!r}; expected one of {allowed}")
        if content is None and t.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise BadRow(f"{field}[{i}].{content_key}",
                         f"expected a string, got {type(content).__name__ if content is not None else 'nothing'}")
        msg: dict[str, Any] = {"role": canon, "content": content}
        for k in MESSAGE_EXTRA_KEYS:
            if t.get(k) is not None:
                msg[k] = t[k]
        out.append(msg)
    return out


def row_weight(row: Mapping[str, Any], fields: Mapping[str, str]) -> float:
    """The row's sample weight: column ``weight`` (or ``fields: {weight: <column>}``), 1.0 when absent.

    It multiplies the row's loss (with the dataset's ``loss_weight``); the step loss is normalised by
    the summed weights, so weight 2 is the same as the row appearing twice (see peftlab.loss).
    """
    import math

    name, v = _get(row, fields, "weight") if isinstance(row, Mapping) else ("weight", None)
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BadRow(name, f"expected a finite number >= 0 (the row's sample weight), got {v!r}")
    return float(v)


def to_record(row: Any, fmt: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """Convert one raw row of format ``fmt`` into a canonical record (raises :class:`BadRow`)."""
    if not isinstance(row, Mapping):
        raise BadRow("<row>", f"expected an object, got {type(row).__name__}")
    if fmt == "alpaca":
        instruction = _str(row, fields, "instruction")
        inp = _str(row, fields, "input", optional=True)
        output = _str(row, fields, "output")
        system = _str(row, fields, "system", optional=True)
        if not instruction.strip():
            raise BadRow(fields.get("instruction", "instruction"), "is empty; expected the task text")
        user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"kind": "chat", "messages": messages}
    if fmt in ("sharegpt", "messages"):
        key = "conversations" if fmt == "sharegpt" else "messages"
        name, turns = _get(row, fields, key)
        return {"kind": "chat", "messages": _messages(turns, name, sharegpt=fmt == "sharegpt")}
    if fmt == "prompt_completion":
        pname, prompt = _get(row, fields, "prompt")
        cname, completion = _get(row, fields, "completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
            msgs = _messages(prompt, pname, sharegpt=False) if prompt else []
            comp = _messages(completion, cname, sharegpt=False)
            if any(m["role"] != "assistant" for m in comp):
                raise BadRow(cname, "expected only assistant turns in a conversational completion")
            return {"kind": "chat", "messages": msgs + comp}
        return {"kind": "completion", "prompt": _str(row, fields, "prompt"),
                "completion": _str(row, fields, "completion")}
    if fmt == "text":
        text = _str(row, fields, "text")
        if not text:
            raise BadRow(fields.get("text", "text"), "is empty")
        return {"kind": "text", "text": text}
    if fmt == "classification":
        text = _str(row, fields, "text")
        name, label = _get(row, fields, "label")
        if label is None or not isinstance(label, (str, int, float, bool)):
            raise BadRow(name, "missing; expected a class name (string), a class id, or a number")
        return {"kind": "classification", "text": text, "label": label}
    raise PeftlabError(f"unknown data format {fmt!r}; expected one of {sorted(FORMAT_FIELDS)}")
