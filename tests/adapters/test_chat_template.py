"""peftlab.adapters.chat_template: the template saved with an adapter renders exactly the ids training saw
(a BOS the tokenizer adds is written into it), it is written atomically and read back as UTF-8 text, and it
is put on one tokenizer instance only. (Eval/generate/merge using it: tests/evaluation/test_adapter_dirs.py.)"""
from __future__ import annotations

import pytest
from tokenizers import processors

from peftlab.adapters.chat_template import (
    TEMPLATE_FILE,
    read_chat_template,
    save_chat_template,
    training_template,
    use_adapter_template,
)
from peftlab.data.templates import NAMED_TEMPLATES
from peftlab.data.tokenize import Encoder
from peftlab.errors import PeftlabError
from peftlab.model.builtin import CHAT_TEMPLATE, build_tokenizer

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5"}]


def training_ids(tokenizer, template: str | None) -> list[int]:
    """The ids peftlab's encoder trains on for CHAT."""
    encoded = Encoder(tokenizer, template=template).encode_batch([{"kind": "chat", "messages": CHAT}])[0]
    return encoded.input_ids


@pytest.mark.parametrize("template", [None, "chatml", "zephyr"])
def test_the_saved_template_renders_the_ids_training_saw(template):
    """What transformers' apply_chat_template(tokenize=True) and llama.cpp do with the saved source — render,
    then tokenize without special tokens — gives the training ids, BOS included."""
    tok = build_tokenizer()  # its tokenizer adds <|begin_of_text|> to every sequence
    source = training_template(tok, template)
    if template is None:
        assert source == CHAT_TEMPLATE  # prints bos_token itself: kept as it is
    else:
        assert source == "{{ bos_token }}" + NAMED_TEMPLATES[template]
    served = build_tokenizer()
    served.chat_template = source
    ids = list(served.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    assert ids == training_ids(tok, template) and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_no_bos_is_written_for_a_tokenizer_that_adds_none():
    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS template any more
    assert tok("x")["input_ids"][0] != tok.bos_token_id
    assert training_template(tok, "chatml") == NAMED_TEMPLATES["chatml"]


def test_no_template_anywhere_is_none():
    tok = build_tokenizer()
    tok.chat_template = None
    assert training_template(tok, None) is None
    assert save_chat_template("/nonexistent", None) is None  # nothing to write, nothing written


def test_saved_read_back_and_put_on_one_tokenizer(tmp_path):
    assert read_chat_template(tmp_path) is None
    source = "{{ bos_token }}{% for m in messages %}«{{ m['content'] }}»{% endfor %}"  # not ASCII
    path = save_chat_template(tmp_path, source)
    assert path == tmp_path / TEMPLATE_FILE and path.read_bytes() == source.encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == [TEMPLATE_FILE]  # no temporary file left
    assert read_chat_template(tmp_path) == source
    tok, other = build_tokenizer(), build_tokenizer()
    assert use_adapter_template(tok, tmp_path) is True
    assert tok.chat_template == source and other.chat_template == CHAT_TEMPLATE
    assert use_adapter_template(other, None) is False and other.chat_template == CHAT_TEMPLATE
    assert use_adapter_template(other, tmp_path / "empty") is False


def test_a_template_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    (tmp_path / TEMPLATE_FILE).write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(PeftlabError, match=rf"{TEMPLATE_FILE} is not UTF-8 text; .*Delete it to use the tokenizer's "
                                           "own template, or re-save it as UTF-8"):
        read_chat_template(tmp_path)
