"""Canonical records -> token ids and labels.

Each record becomes one string plus the character spans to train on (chat: the assistant turns'
spans from :mod:`peftlab.data.templates`; completion: the completion and EOS; text: everything), and
that string is tokenized ONCE with ``return_offsets_mapping``. A token is a label iff its character
range overlaps a trained span, so the end-of-turn token closing each trained turn is a label whatever
its id (also when pad == eos), and prompt tokens never are.

BOS: exactly one leading BOS. Templates that print ``bos_token`` give it through the text (tokenized
without special tokens, so the tokenizer does not add a second); otherwise it is prepended when the
tokenizer's own convention adds one (``tok("x")`` starts with BOS: Llama, Mistral; not GPT-2).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftlab.data.formats import BadRow
from peftlab.data.templates import ChatRenderer, Span, TemplateRenderError
from peftlab.errors import PeftlabError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized record (``labels`` unshifted, aligned with ``input_ids``)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodedClass:
    """One tokenized classification record (the label is mapped later, once all labels are known)."""

    input_ids: list[int]
    label: Any


def labels_from_spans(ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                      spans: Sequence[tuple[int, int]]) -> list[int]:
    """``ids[i]`` where token ``i``'s characters overlap a span, else -100 (spans sorted, disjoint)."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    n = len(spans)
    for i, (s, e) in enumerate(offsets):
        if e <= s:  # tokens with no characters (added BOS, some specials) are never labels
            continue
        while j < n and spans[j][1] <= s:
            j += 1
        if j < n and spans[j][0] < e:
            labels[i] = ids[i]
    return labels


class Encoder:
    """Tokenizes canonical records for one tokenizer, template and ``train_on`` setting."""

    def __init__(self, tokenizer: Any, *, template: str | None = None, train_on: str = "assistant",
                 system_prompt: str | None = None):
        if not getattr(tokenizer, "is_fast", True):
            raise PeftlabError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} cannot report character offsets (not a "
                "`tokenizers`-backed fast tokenizer); loss masks need them: load it with use_fast=True"
            )
        self.tok = tokenizer
        self.template = template
        self.train_on = train_on
        self.system_prompt = system_prompt
        self._renderer: ChatRenderer | None = None
        self.bos_id: int | None = tokenizer.bos_token_id
        probe = tokenizer("x")["input_ids"]
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self.eos_token: str = tokenizer.eos_token or ""

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:  # lazily: text-only datasets need no chat template
            self._renderer = ChatRenderer(self.tok, self.template)
        return self._renderer

    # ---- records -> (text, spans) ----
    def _messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def text_and_spans(self, record: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        kind = record["kind"]
        if kind == "chat":
            messages = self._messages(record["messages"])
            if self.train_on != "all" and not any(m["role"] == "assistant" for m in messages):
                raise BadRow("messages", "has no assistant turn to train on (all tokens would be masked); "
                                         "add one or set data.train_on: all")
            try:
                text, spans = self.renderer.render_with_spans(messages)
            except TemplateRenderError as e:
                raise BadRow("messages", f"the chat template ({self.renderer.name}) rejected it: {e}") from e
            return text, self._select(text, spans)
        if kind == "completion":
            text = record["prompt"] + record["completion"] + self.eos_token
            start = 0 if self.train_on == "all" else len(record["prompt"])
            return text, [(start, len(text))]
        if kind == "text":
            text = record["text"] + self.eos_token
            return text, [(0, len(text))]
        raise ValueError(f"not a token-level record: {kind}")

    def _select(self, text: str, spans: list[Span]) -> list[tuple[int, int]]:
        if self.train_on == "all":
            return [(0, len(text))]
        if self.train_on == "last_turn":
            spans = spans[-1:]
        return [(s.start, s.end) for s in spans]

    def prompt_text(self, record: dict[str, Any]) -> tuple[str, str] | None:
        """(prompt for generation, reference answer) when the record ends with an assistant turn."""
        if record["kind"] == "chat":
            messages = self._messages(record["messages"])
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                return None
            return self.renderer.render(messages[:-1], add_generation_prompt=True), messages[-1]["content"]
        if record["kind"] == "completion":
            return record["prompt"], record["completion"]
        return None

    # ---- tokenization ----
    def _with_bos(self, ids: list[int], offsets: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        if self.bos_id is None:
            return ids, offsets
        if ids and ids[0] == self.bos_id:
            k = 1
            while k < len(ids) and ids[k] == self.bos_id:  # a template BOS + a tokenizer BOS
                k += 1
            return ids[k - 1:], offsets[k - 1:]
        if self.adds_bos:
            return [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def encode_texts(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [self._with_bos(list(i), [tuple(o) for o in off])
                for i, off in zip(enc["input_ids"], enc["offset_mapping"])]

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode_texts([text])[0][0]

    def encode_batch(self, records: Sequence[dict[str, Any]]) -> list[Encoded | EncodedClass | BadRow]:
        """Encode many records with one tokenizer call (the Rust tokenizer batches them)."""
        out: list[Encoded | EncodedClass | BadRow | None] = [None] * len(records)
        texts: list[str] = []
        spans: list[list[tuple[int, int]]] = []
        slots: list[int] = []
        cls_slots: list[int] = []
        for k, rec in enumerate(records):
            if rec["kind"] == "classification":
                cls_slots.append(k)
                continue
            try:
                t, s = self.text_and_spans(rec)
            except BadRow as e:
                out[k] = e
                continue
            texts.append(t)
            spans.append(s)
            slots.append(k)
        if texts:
            for k, (ids, offs), sp in zip(slots, self.encode_texts(texts), spans):
                labels = labels_from_spans(ids, offs, sp)
                if all(x == IGNORE_INDEX for x in labels):
                    out[k] = BadRow("messages" if records[k]["kind"] == "chat" else records[k]["kind"],
                                    "produces no trained tokens (every token is masked)")
                else:
                    out[k] = Encoded(ids, labels)
        if cls_slots:
            enc = self.tok([records[k]["text"] for k in cls_slots], add_special_tokens=True, verbose=False)
            for k, ids in zip(cls_slots, enc["input_ids"]):
                out[k] = EncodedClass(list(ids), records[k]["label"])
        return out  # type: ignore[return-value]
