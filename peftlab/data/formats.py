"""Row formats: turn one raw row into one canonical record.

Canonical records (plain dicts, ``kind`` says which):

- ``{"kind": "chat", "messages": [{"role", "content", ...}]}`` — alpaca, sharegpt, messages, and
  prompt/completion rows whose prompt and completion are message lists;
- ``{"kind": "completion", "prompt": str, "completion": str}`` — raw prompt/completion text;
- ``{"kind": "text", "text": str}`` — continued pre-training;
- ``{"kind": "classification", "text": str, "label": str | int | float | bool}``.

A row that does not fit raises :class:`BadRow` naming the field and what was expected; the caller
adds the ``file:row`` location and applies ``on_bad_rows``.

``fields:`` maps canonical names to columns; a column may be a path into nested rows
(``data.question``, ``turns[0].text`` or ``turns.0.text``; see :func:`field_value`).

Preference data (DPO-style ``chosen``/``rejected`` pairs, KTO's labelled completions) has no SFT
meaning: :func:`refuse_preference_data` recognises TRL's shapes of it in an SFT run and refuses them with
what to do; a recipe with a ``preference:`` section reads them through :mod:`peftlab.data.preference_rows`.
"""
from __future__ import annotations

import functools
import re
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


_MISSING = object()
_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[-?\d+\])*)")


@functools.lru_cache(maxsize=1024)
def parse_field_path(name: str) -> tuple[str | int, ...]:
    """``"data.question"`` -> ``("data", "question")``; ``"turns[0].text"`` -> ``("turns", 0, "text")``.

    Dot-separated keys, each optionally followed by ``[N]`` list indices (negative counts from the
    end); a key that is all digits (``turns.0.text``) also indexes a list. Raises ValueError.
    """
    parts: list[str | int] = []
    for seg in name.split("."):
        m = _SEGMENT.fullmatch(seg)
        if m is None:
            raise ValueError(f"{name!r} is not a column name or a path into nested rows; use keys joined by dots "
                             "and [N] for list items, e.g. data.question or turns[0].text")
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"-?\d+", m.group(2))]
    return tuple(parts)


def _step(cur: Any, part: str | int) -> Any:
    if isinstance(cur, Mapping) and isinstance(part, str):
        return cur.get(part, _MISSING)
    if isinstance(cur, list):
        if isinstance(part, str):
            if not re.fullmatch(r"-?\d+", part):
                return _MISSING
            part = int(part)
        return cur[part] if -len(cur) <= part < len(cur) else _MISSING
    return _MISSING


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    if name in row:  # a column whose own name has dots or brackets wins over a path
        return row[name]
    if not any(c in name for c in ".["):
        return _MISSING
    try:
        parts = parse_field_path(name)
    except ValueError:  # DatasetSpec validates `fields:`; a direct caller's bad path is just absent
        return _MISSING
    cur: Any = row
    for part in parts:
        cur = _step(cur, part)
        if cur is _MISSING:
            break
    return cur


def field_value(row: Mapping[str, Any], name: str) -> Any:
    """The value of column ``name`` of ``row`` (``None`` when absent): a column of exactly that name,
    else a path into nested objects and lists (``data.question``, ``turns[0].text``, ``turns.-1.text``)."""
    v = _lookup(row, name)
    return None if v is _MISSING else v


def _missing_detail(row: Mapping[str, Any], name: str) -> str:
    """Where a nested path stops in this row (" (...)"), or "" for a plain column."""
    if name in row or not any(c in name for c in ".["):
        return ""
    try:
        parts = parse_field_path(name)
    except ValueError:
        return ""
    cur: Any = row
    walked = ""
    for part in parts:
        nxt = _step(cur, part)
        if nxt is _MISSING:
            at = repr(walked) if walked else "the row"
            if isinstance(cur, Mapping):
                return f" ({at} has no key {part!r}; its keys: {sorted(map(str, cur))})"
            if isinstance(cur, list):
                return f" ({at} is a list of {len(cur)} items, so it has no item {part})"
            return f" ({at} is {type(cur).__name__ if cur is not None else 'null'}, not an object or a list)"
        walked += f"[{part}]" if isinstance(part, int) else (f".{part}" if walked else str(part))
        cur = nxt
    return ""


def _get(row: Mapping[str, Any], fields: Mapping[str, str], key: str) -> tuple[str, Any]:
    name = fields.get(key, key)
    return name, field_value(row, name)


def _absent(row: Mapping[str, Any], name: str, expected: str) -> BadRow:
    return BadRow(name, f"missing{_missing_detail(row, name)}; expected {expected}")


def detect_format(row: Any, fields: Mapping[str, str], where: str, dataset: str) -> str:
    """Pick the format from the first row's keys; refuse when none or several fit."""
    if not isinstance(row, Mapping):
        raise PeftlabError(f"{where}: expected each row to be an object, got {type(row).__name__}; "
                           f"set data.train[...].format for dataset {dataset!r} or fix the file")
    keys = set(row)

    def has(*canon: str) -> bool:
        return all(_lookup(row, fields.get(c, c)) is not _MISSING for c in canon)

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
        raise _absent(row, name, "a string")
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
        # a turn written ShareGPT-style ({from, value}) uses ShareGPT's speaker names
        speaker_names = sharegpt or ("from" in t and "role" not in t)
        canon = SHAREGPT_ROLES.get(role.lower()) if speaker_names else (role if role in ROLES else None)
        if canon is None:
            allowed = sorted(SHAREGPT_ROLES) if speaker_names else list(ROLES)
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


def chat_turns(turns: Any, field: str, *, sharegpt: bool = False) -> list[dict[str, Any]]:
    """A list of turn objects (``role``/``content`` or ShareGPT's ``from``/``value``) -> canonical messages;
    raises :class:`BadRow` naming ``field``. Used for preference data too (:mod:`peftlab.data.preference_rows`)."""
    return _messages(turns, field, sharegpt=sharegpt)


def row_weight(row: Mapping[str, Any], fields: Mapping[str, str]) -> float:
    """The row's sample weight: column ``weight`` (or ``fields: {weight: <column>}``), 1.0 when absent.

    It multiplies the row's loss (with the dataset's ``loss_weight``); the step loss is normalised by
    the summed weights, so weight 2 is the same as the row appearing twice (see peftlab.objectives.causal_lm).
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
        if isinstance(completion, Mapping):  # one turn object, e.g. a ShareGPT-style pair's chosen turn
            completion = [completion]
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
            raise BadRow(name, f"missing{_missing_detail(row, name) if label is None else ''}; expected a class "
                               "name (string), a class id, or a number")
        return {"kind": "classification", "text": text, "label": label}
    raise PeftlabError(f"unknown data format {fmt!r}; expected one of {sorted(FORMAT_FIELDS)}")


# formats whose rows are trained as text to imitate (refused when they carry preference data)
SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")


def _pair_fix(row: Mapping[str, Any], fields: Mapping[str, str]) -> str:
    """The ``format:``/``fields:`` that train SFT on a preference row's chosen answer (TRL's shapes)."""
    chosen = row["chosen"]
    if "conversations" in row:  # ShareGPT style: the chosen turn continues `conversations`
        return "format: prompt_completion, fields: {prompt: conversations, completion: chosen}"
    prompt = fields.get("prompt", "prompt")
    if prompt in row:  # explicit prompt: strings, or message lists
        extra = "" if prompt == "prompt" else f"prompt: {prompt}, "
        return f"format: prompt_completion, fields: {{{extra}completion: chosen}}"
    if isinstance(chosen, list):  # implicit prompt: chosen is the whole conversation
        return "format: messages, fields: {messages: chosen}"
    others = sorted(str(k) for k, v in row.items() if k not in ("chosen", "rejected") and isinstance(v, str))
    if others:
        return ("format: prompt_completion, fields: {prompt: <the prompt column, one of " + ", ".join(others)
                + ">, completion: chosen}")
    return "format: text, fields: {text: chosen}"


def refuse_preference_data(row: Any, fmt: str, fields: Mapping[str, str], where: str, dataset: str,
                           key: str) -> None:
    """Raise PeftlabError when ``row`` is preference data, which SFT would silently mistrain on.

    Recognised (TRL's dataset shapes): pairs with ``chosen`` and ``rejected`` (with a ``prompt`` of text
    or messages, an implicit prompt inside chosen/rejected conversations, or ShareGPT-style
    ``conversations`` plus chosen/rejected turn objects), unless ``fields:`` already maps a field to
    one of them; and KTO rows, an SFT-format row (``fmt`` detected or given) with a boolean ``label``.
    ``fmt == "auto"`` checks pairs only (they fit no SFT format, so detection would fail first).
    Classification rows (``{text, label}``) are never refused.
    """
    if not isinstance(row, Mapping) or fmt not in ("auto", *SFT_FORMATS):
        return
    if "chosen" in row and "rejected" in row and not (
            {str(v).split(".")[0].split("[")[0] for v in fields.values()} & {"chosen", "rejected"}):
        raise PeftlabError(
            f"{where}: dataset {dataset!r} ({key}) is preference data (DPO-style pairs: a `chosen` and a "
            "`rejected` answer to each prompt), which SFT cannot train on. To train on the preferences, add a "
            "preference section to the recipe, e.g. preference: {method: dpo} (dpo | ipo | robust | orpo | simpo "
            f"| kto). To fine-tune (SFT) on the chosen answers only, map the fields of this dataset: "
            f"{_pair_fix(row, fields)}."
        )
    if fmt == "auto":
        return
    lname = fields.get("label", "label")
    label = field_value(row, lname)
    if isinstance(label, bool):
        raise PeftlabError(
            f"{where}: dataset {dataset!r} ({key}) is KTO data (unpaired, labelled: {fmt} rows, each with a "
            f"boolean `{lname}` saying whether its answer is desirable); as plain SFT it would learn the "
            "undesirable answers too. To train on it, add preference: {method: kto} to the recipe. To "
            f"fine-tune (SFT) on the desirable answers only, keep the rows whose `{lname}` is true and remove "
            f"that column (e.g. jq -c 'select(.{lname} == true) | del(.{lname})' IN.jsonl > OUT.jsonl). (A text "
            "classifier over true/false labels: format: classification, rows {text, label}.)"
        )
