"""Preference data: TRL's shapes of it -> canonical records -> tokenized pairs (or labelled completions).

Recognised row shapes (auto-detected from the keys; ``fields:`` may rename any of them):

- pairs, TRL style: ``{prompt, chosen, rejected}`` with strings (raw text, no chat template, EOS after each
  answer) or message lists (the chat template renders them); without ``prompt`` the conversations in
  ``chosen``/``rejected`` carry it implicitly: their shared leading turns are the prompt;
- pairs, ShareGPT style: ``{conversations, chosen, rejected}`` where chosen/rejected are single turn objects
  (``{from: gpt, value: ...}``) continuing the conversation;
- unpaired (KTO): ``{prompt | messages, completion, label: bool}``, or ``{messages, label}`` whose last
  assistant turn is the completion. A KTO run also takes pairs: each gives a desirable and an undesirable
  completion (TRL's ``unpair_preference_dataset``).

A record is ``{"kind": "pair", "prompt", "chosen", "rejected"}`` or ``{"kind": "unpaired", "prompt",
"completion", "desirable"}``; the prompt and answers are all strings (text) or all message lists (chat).

Tokenized (:class:`PreferenceEncoder`), as TRL does it: the prompt (chat: rendered up to and including the
assistant header, i.e. the generation prompt) and each answer are tokenized separately, so chosen and rejected
share their prompt tokens exactly; answer labels are the answer's own ids (the assistant turns and their
end-of-turn marker), the prompt is never a label. Over-length pairs (:func:`fit_pair`): the prompt is cut from
the left first (keeping its end, and BOS) down to ``max_prompt_len``, then the answers keep their first tokens.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftlab.data.formats import BadRow, chat_turns, field_value
from peftlab.data.templates import TemplateRenderError
from peftlab.data.tokenize import IGNORE_INDEX, Encoder, labels_from_spans

PAIRED, UNPAIRED = "pairs", "unpaired"


def _field(row: Mapping[str, Any], fields: Mapping[str, str], key: str) -> tuple[str, Any]:
    name = fields.get(key, key)
    return name, field_value(row, name)


def preference_shape(row: Any, fields: Mapping[str, str]) -> str | None:
    """``"pairs"`` / ``"unpaired"`` when ``row`` holds preference data in one of the shapes above, else None."""
    if not isinstance(row, Mapping):
        return None
    if _field(row, fields, "chosen")[1] is not None and _field(row, fields, "rejected")[1] is not None:
        return PAIRED
    if isinstance(_field(row, fields, "label")[1], bool) and any(
            _field(row, fields, k)[1] is not None for k in ("completion", "messages", "conversations", "prompt")):
        return UNPAIRED
    return None


def _turns(value: Any, name: str) -> list[dict[str, Any]]:
    """Message list (``role``/``content`` or ShareGPT ``from``/``value``) or one turn object -> messages."""
    if isinstance(value, Mapping):
        value = [value]
    return chat_turns(value, name)


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, Mapping))


def _common_prefix(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _text_prefix(a: str, b: str) -> int:
    """Where two strings part, moved back to the last whitespace (TRL's implicit string prompt)."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and not a[k - 1].isspace():
        k -= 1
    return max(k - 1, 0) if k and a[k - 1] == " " else k  # the space stays with the answer, as in TRL


def _answer(value: Any, name: str, chat: bool) -> Any:
    if chat:
        msgs = _turns(value, name)
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadRow(name, "has no assistant turn: expected the answer to the prompt")
        return msgs
    if not isinstance(value, str):
        raise BadRow(name, f"expected a string (the prompt is text), got {type(value).__name__}")
    if not value.strip():
        raise BadRow(name, "is empty; expected an answer")
    return value


def _prompt(row: Mapping[str, Any], fields: Mapping[str, str], key: str, chat: bool) -> Any:
    name, value = _field(row, fields, key)
    if chat:
        msgs = _turns(value, name) if value else []
        if msgs and msgs[-1]["role"] == "assistant":
            raise BadRow(name, "ends with an assistant turn; the prompt must end before the answer")
        return msgs
    if not isinstance(value, str):
        raise BadRow(name, f"expected a string (the answers are text), got {type(value).__name__}")
    return value


def pair_record(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """A pair row (any of the shapes in the module docstring) -> ``{"kind": "pair", ...}`` (raises BadRow)."""
    cname, chosen = _field(row, fields, "chosen")
    rname, rejected = _field(row, fields, "rejected")
    chat = _is_chat(chosen) or _is_chat(rejected)
    for key in ("conversations", "prompt"):
        if _field(row, fields, key)[1] is not None:
            prompt = _prompt(row, fields, key, chat)
            return {"kind": "pair", "prompt": prompt, "chosen": _answer(chosen, cname, chat),
                    "rejected": _answer(rejected, rname, chat)}
    # implicit prompt: the shared start of the two conversations (or texts)
    if chat:
        c, r = _turns(chosen, cname), _turns(rejected, rname)
        k = _common_prefix(c, r)
        prompt, c_rest, r_rest = c[:k], c[k:], r[k:]
        if not c_rest or not r_rest:
            raise BadRow(cname, "and rejected are the same conversation; expected them to differ in the answer")
        return {"kind": "pair", "prompt": prompt, "chosen": _answer(c_rest, cname, True),
                "rejected": _answer(r_rest, rname, True)}
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise BadRow(cname, "expected strings or message lists for chosen and rejected")
    k = _text_prefix(chosen, rejected)
    return {"kind": "pair", "prompt": chosen[:k], "chosen": _answer(chosen[k:], cname, False),
            "rejected": _answer(rejected[k:], rname, False)}


def unpaired_record(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """A KTO row -> ``{"kind": "unpaired", ...}`` (raises BadRow)."""
    lname, label = _field(row, fields, "label")
    if not isinstance(label, bool):
        raise BadRow(lname, f"expected true or false (is the completion desirable?), got {label!r}")
    cname, completion = _field(row, fields, "completion")
    key = next((k for k in ("prompt", "messages", "conversations") if _field(row, fields, k)[1] is not None),
               "prompt")
    if completion is None:  # {messages, label}: the last assistant turn is the completion
        mname, msgs = _field(row, fields, key)
        if msgs is None:
            raise BadRow(cname, "missing; expected the completion (or `messages` ending with the answer)")
        msgs = _turns(msgs, mname)
        if msgs[-1]["role"] != "assistant":
            raise BadRow(mname, "does not end with an assistant turn; expected it to hold the completion")
        return {"kind": "unpaired", "prompt": msgs[:-1], "completion": msgs[-1:], "desirable": label}
    chat = _is_chat(completion)
    return {"kind": "unpaired", "prompt": _prompt(row, fields, key, chat),
            "completion": _answer(completion, cname, chat), "desirable": label}


def preference_records(row: Mapping[str, Any], fields: Mapping[str, str], mode: str) -> list[dict[str, Any]]:
    """The canonical records of one row for a ``mode`` (``pairs`` | ``unpaired``) run; a pair row gives a KTO run
    two records (its chosen answer desirable, its rejected one not). Raises BadRow."""
    shape = preference_shape(row, fields)
    if shape == PAIRED:
        rec = pair_record(row, fields)
        if mode == PAIRED:
            return [rec]
        return [{"kind": "unpaired", "prompt": rec["prompt"], "completion": rec[k], "desirable": k == "chosen"}
                for k in ("chosen", "rejected")]
    if shape == UNPAIRED and mode == UNPAIRED:
        return [unpaired_record(row, fields)]
    if shape == UNPAIRED:
        raise BadRow(fields.get("label", "label"), "marks an unpaired (KTO) row, but this method trains on pairs "
                                                   "{prompt, chosen, rejected}; use preference.method: kto")
    expected = ("{prompt, chosen, rejected}, {conversations, chosen, rejected}" if mode == PAIRED else
                "{prompt|messages, completion, label: true/false} or a pair {prompt, chosen, rejected}")
    raise BadRow("<row>", f"is not preference data (keys {sorted(map(str, row))}); expected {expected}. An SFT "
                          "dataset trains without the recipe's preference: section")


@dataclass
class EncodedAnswer:
    ids: list[int]
    labels: list[int]


@dataclass
class EncodedPreference:
    """One tokenized record: the prompt ids, and one answer (unpaired) or two (chosen, rejected)."""

    prompt_ids: list[int]
    answers: list[EncodedAnswer] = field(default_factory=list)
    desirable: bool | None = None


class PreferenceEncoder:
    """Tokenizes preference records with a data :class:`~peftlab.data.tokenize.Encoder`'s tokenizer, template,
    BOS convention and system prompt."""

    def __init__(self, encoder: Encoder):
        self.enc = encoder

    def _split(self, prompt: Any, answer: Any, name: str) -> tuple[str, str, list[tuple[int, int]]]:
        """(prompt text, answer text, the answer's trained character spans relative to the answer text)."""
        if isinstance(prompt, str):
            text = answer + self.enc.eos_token
            return prompt, text, [(0, len(text))]
        sp = self.enc.system_prompt
        messages = ([{"role": "system", "content": sp}] if sp and not (prompt and prompt[0]["role"] == "system")
                    else []) + [*prompt, *answer]
        first = len(messages) - len(answer)
        try:
            full, spans = self.enc.renderer.render_with_spans(messages)
        except TemplateRenderError as e:
            raise BadRow(name, f"the chat template ({self.enc.renderer.name}) rejected it: {e}") from e
        mine = [s for s in spans if s.message >= first]
        if not mine:
            raise BadRow(name, "produces no trained tokens (no assistant turn in the answer)")
        cut = mine[0].start
        return full[:cut], full[cut:], [(s.start - cut, s.end - cut) for s in mine]

    def encode(self, record: dict[str, Any]) -> EncodedPreference:
        keys = ("chosen", "rejected") if record["kind"] == "pair" else ("completion",)
        parts = [self._split(record["prompt"], record[k], k) for k in keys]
        if any(p[0] != parts[0][0] for p in parts):
            raise BadRow("rejected", "the chat template renders its prompt differently from chosen's; the pair "
                                     "must share its prompt")
        prompt_ids = self.enc.encode_prompt(parts[0][0])  # BOS as the SFT path gives it
        tok = self.enc.tok([p[1] for p in parts], add_special_tokens=False, return_offsets_mapping=True,
                           verbose=False)
        answers = []
        for k, (ids, offs, part) in enumerate(zip(tok["input_ids"], tok["offset_mapping"], parts)):
            labels = labels_from_spans(ids, [tuple(o) for o in offs], part[2])
            if all(x == IGNORE_INDEX for x in labels):
                raise BadRow(keys[k], "produces no trained tokens")
            answers.append(EncodedAnswer(list(ids), labels))
        return EncodedPreference(list(prompt_ids), answers, record.get("desirable"))


@dataclass
class Fitted:
    """What :func:`fit_pair` did to one record."""

    kept: bool = True
    prompt_cut: int = 0     # prompt tokens removed from the left
    answer_cut: int = 0     # answer tokens removed from the right (summed over the answers)


def fit_pair(enc: EncodedPreference, max_seq_len: int, max_prompt_len: int, overlength: str,
             bos_id: int | None) -> Fitted:
    """Make prompt + every answer fit ``max_seq_len`` (in place): the prompt first, cut from the left to
    ``max_prompt_len`` tokens (its BOS kept), then each answer cut to the room left. ``overlength: drop`` drops
    an over-length record instead; a record whose answer keeps no trained token is dropped too."""
    longest = len(enc.prompt_ids) + max(len(a.ids) for a in enc.answers)
    if longest <= max_seq_len:
        return Fitted()
    if overlength == "drop":
        return Fitted(kept=False)
    fitted = Fitted()
    p = enc.prompt_ids
    if len(p) > max_prompt_len:
        keep_bos = bos_id is not None and p and p[0] == bos_id and max_prompt_len > 1
        tail = p[len(p) - (max_prompt_len - 1 if keep_bos else max_prompt_len):]
        fitted.prompt_cut = len(p) - max_prompt_len
        enc.prompt_ids = ([p[0]] if keep_bos else []) + tail
    room = max_seq_len - len(enc.prompt_ids)
    for a in enc.answers:
        if len(a.ids) > room:
            fitted.answer_cut += len(a.ids) - room
            a.ids, a.labels = a.ids[:room], a.labels[:room]
    # the first answer token is predicted from the prompt's last position, so every label of an answer counts
    fitted.kept = all(any(x != IGNORE_INDEX for x in a.labels) for a in enc.answers)
    return fitted


def example_of(enc: EncodedPreference) -> dict[str, Any]:
    """The example dict stored in the data bundle (and the data cache): plain lists and numbers."""
    if len(enc.answers) == 2:
        c, r = enc.answers
        return {"prompt_ids": enc.prompt_ids, "chosen_ids": c.ids, "chosen_labels": c.labels,
                "rejected_ids": r.ids, "rejected_labels": r.labels}
    a = enc.answers[0]
    return {"prompt_ids": enc.prompt_ids, "completion_ids": a.ids, "completion_labels": a.labels,
            "desirable": bool(enc.desirable)}


def example_length(ex: dict[str, Any]) -> int:
    """Tokens of the longest sequence an example becomes (prompt + its longest answer)."""
    answers = [ex[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in ex]
    return len(ex["prompt_ids"]) + max(len(a) for a in answers)


def is_preference_example(ex: dict[str, Any]) -> bool:
    return "prompt_ids" in ex and ("chosen_ids" in ex or "completion_ids" in ex)
