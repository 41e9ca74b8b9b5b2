"""Chat templates (peftlab/data/templates.py): every named template renders a conversation and each assistant
turn's span covers exactly what the model must generate — its reply and end-of-turn marker, nothing of the
prompt; templates that rewrite earlier turns fall back to finding the reply; and the template mistakes a user
can make end in one message that names data.template and the choices."""
from __future__ import annotations

import pytest

from peftlab.data.templates import NAMED_TEMPLATES, ChatRenderer, TemplateRenderError
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "Fine. What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]
EOS = "<|eot_id|>"  # the built-in tokenizer's eos, which templates that write eos_token use

# template -> (what precedes a reply, the reply as generated with its end-of-turn marker)
EXPECTED = {
    None: ("<|start_header_id|>assistant<|end_header_id|>\n\n", lambda r: f"{r}<|eot_id|>"),  # the tokenizer's own
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", lambda r: f"{r}<|eot_id|>"),
    "chatml": ("<|im_start|>assistant\n", lambda r: f"{r}<|im_end|>"),
    "mistral": (" [/INST]", lambda r: f"{r}{EOS}"),
    "llama2": (" [/INST]", lambda r: f" {r} {EOS}"),
    "alpaca": ("### Response:\n", lambda r: f"{r}{EOS}"),
    "zephyr": ("<|assistant|>\n", lambda r: f"{r}{EOS}"),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_every_named_template_is_covered():
    assert set(EXPECTED) - {None} == set(NAMED_TEMPLATES)


@pytest.mark.parametrize("template", list(EXPECTED), ids=[t or "tokenizer" for t in EXPECTED])
def test_spans_land_on_the_assistant_turns(tok, template):
    messages = CHAT[1:] if template == "mistral" else CHAT  # mistral folds a system prompt into the first turn
    renderer = ChatRenderer(tok, template)
    full, spans = renderer.render_with_spans(messages)
    header, generated = EXPECTED[template]
    assert full == renderer.render(messages)
    assert [full[s.start:s.end] for s in spans] == [generated(r) for r in REPLIES]
    assert [messages[s.message]["content"] for s in spans] == REPLIES
    for s in spans:  # the prompt up to the reply ends with the template's assistant header
        assert full[:s.start].endswith(header)
    assert "Hi there" not in "".join(full[s.start:s.end] for s in spans)
    # the generation prompt is where training's first span starts: what the model sees at inference
    prompt = renderer.render(messages[:spans[0].message], add_generation_prompt=True)
    assert full.startswith(prompt) and len(prompt) == spans[0].start


def test_named_templates_carry_no_bos(tok):
    """Whether a sequence starts with BOS is the tokenizer's convention (peftlab.data.tokenize.Encoder)."""
    for name in NAMED_TEMPLATES:
        assert not ChatRenderer(tok, name).render(CHAT[1:3]).startswith(tok.bos_token)


REWRITES_EARLIER_TURNS = (  # marks the last message: every prefix renders the earlier turns differently
    "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>"
    "{% endfor %}"
)


def test_a_prefix_unstable_template_falls_back_to_finding_the_reply(tok):
    renderer = ChatRenderer(tok, REWRITES_EARLIER_TURNS)
    assert renderer.name == "custom"
    full, spans = renderer.render_with_spans(CHAT)
    assert not full.startswith(renderer.render(CHAT[:3]))  # not prefix-stable
    assert [full[s.start:s.end] for s in spans] == [f"{r}</s>" for r in REPLIES]
    # a reply that the user's turn quotes is found in the reply, not in the quote
    quoted = [{"role": "user", "content": "Say OK"}, {"role": "assistant", "content": "OK"},
              {"role": "user", "content": "Again: OK"}, {"role": "assistant", "content": "OK"}]
    full, spans = renderer.render_with_spans(quoted)
    assert [full[:s.start][-len("<assistant>"):] for s in spans] == ["<assistant>"] * 2
    assert [full[s.start:s.end] for s in spans] == ["OK</s>", "OK</s>"]


def test_a_template_that_drops_a_reply_is_refused(tok):
    drops = "{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateRenderError, match="could not find assistant turn 2 .*drops or rewrites it"):
        ChatRenderer(tok, drops).render_with_spans(CHAT)


def test_a_conversation_the_template_refuses_is_a_render_error(tok):
    with pytest.raises(TemplateRenderError, match="the mistral template supports system, user and assistant"):
        ChatRenderer(tok, "mistral").render([{"role": "tool", "content": "sunny"}])


def test_unknown_template_and_a_tokenizer_without_one(tok):
    with pytest.raises(PeftlabError) as err:
        ChatRenderer(tok, "vicuna")
    assert str(err.value) == (f"data.template: unknown template 'vicuna'; use one of {sorted(NAMED_TEMPLATES)}, a "
                              "Jinja template string, or leave it unset to use the tokenizer's own chat template")
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(PeftlabError, match=r"data.template: the tokenizer \(.*\) has no chat template; set "
                                           r"data.template to one of \['alpaca', 'chatml', .*or use format: text"):
        ChatRenderer(plain)
    assert ChatRenderer(plain, "chatml").name == "chatml"


def test_several_templates_on_a_tokenizer_take_the_default(tok):
    multi = build_tokenizer()
    multi.chat_template = {"tool_use": NAMED_TEMPLATES["zephyr"], "default": NAMED_TEMPLATES["chatml"]}
    assert ChatRenderer(multi).source == NAMED_TEMPLATES["chatml"]


@pytest.mark.parametrize("name, messages, generated", [
    ("llama3-8b-instruct", CHAT, lambda r: f"{r}<|eot_id|>"),
    ("mistral-7b", CHAT[1:], lambda r: f"{r}</s>"),  # its template allows no system turn
    ("llama2-7b-chat", CHAT, lambda r: f" {r} </s>"),
])
def test_real_tokenizers_own_templates(shared_data, name, messages, generated):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / name)
    full, spans = ChatRenderer(real).render_with_spans(messages)
    assert [full[s.start:s.end] for s in spans] == [generated(r) for r in REPLIES]
