"""Chat templates and the character spans of trained content.

A conversation is rendered to ONE string with a Jinja chat template (the tokenizer's own, or a named
one below), and for every assistant turn we record the character span ``[start, end)`` it occupies,
from the first character the model has to generate to the end of its end-of-turn marker.
:mod:`peftlab.data.tokenize` then tokenizes the string once with offsets and labels exactly the
tokens that overlap a span, which is right for every tokenizer (no re-tokenising of fragments, whose
merges at the seams differ from the whole).

Spans come from rendering prefixes of the conversation: the prompt the model would see at inference
(``messages[:i]`` + generation prompt) is a prefix of the full text, and so is ``messages[:i + 1]``;
the difference is what the model generates for turn ``i``. This needs no ``{% generation %}`` marker
in the template. Templates that are not prefix-stable (some rewrite earlier turns) fall back to
locating the turn's content in the full text and extending to the end-of-turn token after it.

Named templates carry no BOS: whether a sequence starts with BOS is the tokenizer's convention and is
handled in one place (:func:`peftlab.data.tokenize.Encoder`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftlab.errors import PeftlabError

NAMED_TEMPLATES: dict[str, str] = {
    "llama3": (
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Mistral-Instruct v0.1/v0.2: a system prompt is folded into the first user turn.
    "mistral": (
        "{% set sys = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('the mistral template supports system, user and assistant turns') }}"
        "{% endif %}{% endfor %}"
    ),
    "llama2": (
        "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' "
        "if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
        "{% else %}{{ raise_exception('the llama2 template supports system, user and assistant turns') }}"
        "{% endif %}{% endfor %}"
    ),
    # Stanford Alpaca's prompt; multi-turn conversations repeat the instruction/response pair.
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ '### Input:\n' + m['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}
NAMED_TEMPLATES["zephyr"] = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# End-of-turn markers looked for after an assistant turn when a template is not prefix-stable.
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the rendered text that turn ``message`` generates."""

    start: int
    end: int
    message: int


def _compile(source: str) -> Any:
    try:  # the exact environment apply_chat_template uses (sandbox, loop controls, {% generation %})
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(source)
    except ImportError:  # pragma: no cover - older/newer transformers layout
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ValueError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(source)


class ChatRenderer:
    """Renders conversations with one chat template and finds the spans the model must generate."""

    def __init__(self, tokenizer: Any, template: str | None = None):
        if template is None:
            source = getattr(tokenizer, "chat_template", None)
            if isinstance(source, dict):  # several named templates: take the default one
                source = source.get("default") or next(iter(source.values()))
            if not source:
                raise PeftlabError(
                    f"data.template: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                    f"template; set data.template to one of {sorted(NAMED_TEMPLATES)} (or a Jinja template "
                    "string), or use format: text / prompt_completion"
                )
            self.name = "tokenizer"
        elif template in NAMED_TEMPLATES:
            source, self.name = NAMED_TEMPLATES[template], template
        elif "{%" in template or "{{" in template:
            source, self.name = template, "custom"
        else:
            raise PeftlabError(
                f"data.template: unknown template {template!r}; use one of {sorted(NAMED_TEMPLATES)}, a Jinja "
                "template string, or leave it unset to use the tokenizer's own chat template"
            )
        self.source = source
        self._compiled = _compile(source)
        self._specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._specials.setdefault("bos_token", tokenizer.bos_token or "")
        self._specials.setdefault("eos_token", tokenizer.eos_token or "")
        self._markers = tuple(dict.fromkeys([*END_OF_TURN_MARKERS, *([tokenizer.eos_token] if tokenizer.eos_token
                                                                      else [])]))

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except Exception as e:
            raise TemplateRenderError(str(e)) from e

    def render_with_spans(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[Span]]:
        """The full text and one :class:`Span` per assistant turn (in order)."""
        full = self.render(messages)
        spans: list[Span] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            span = self._span_by_prefix(messages, i, full)
            if span is None or span.start < cursor:
                span = self._span_by_search(messages, i, full, cursor)
            spans.append(span)
            cursor = span.end
        return full, spans

    def _span_by_prefix(self, messages: Sequence[dict[str, Any]], i: int, full: str) -> Span | None:
        try:
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
        except TemplateRenderError:
            return None
        if not prompt:  # nothing marks where the reply starts (e.g. an opening assistant turn)
            return None
        if not (full.startswith(upto) and upto.startswith(prompt)):
            return None
        end = len(upto.rstrip())  # whitespace after the end-of-turn marker belongs to the next turn
        if end <= len(prompt):
            return None
        return Span(len(prompt), end, i)

    def _span_by_search(self, messages: Sequence[dict[str, Any]], i: int, full: str, cursor: int) -> Span:
        # skip past earlier turns' content so that an assistant reply quoted by the user is not matched
        for m in messages[:i]:
            c = m["content"].strip()
            if c:
                pos = full.find(c, cursor)
                if pos >= 0:
                    cursor = pos + len(c)
        content = messages[i]["content"].strip()
        start = full.find(content, cursor) if content else -1
        if start < 0:
            raise TemplateRenderError(
                f"could not find assistant turn {i} in the rendered conversation; the chat template "
                "drops or rewrites it"
            )
        end = start + len(content)
        rest = full[end:]
        stripped = rest.lstrip()
        for marker in self._markers:
            if stripped.startswith(marker):
                end += len(rest) - len(stripped) + len(marker)
                break
        return Span(start, end, i)


class TemplateRenderError(Exception):
    """The chat template refused a conversation (e.g. roles that do not alternate)."""
