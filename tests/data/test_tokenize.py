"""Loss masks: exactly the assistant tokens (+ their end-of-turn token) are labels, one BOS.

The oracle is independent of the masking code: the labelled tokens are cut into runs of consecutive
labels, each run is decoded, and the decoded runs must be exactly the assistant replies followed by
the template's end-of-turn marker (written out by hand per template below).
"""
from __future__ import annotations

import pytest
import torch

from peftlab.data.collate import collate
from peftlab.data.formats import BadRow
from peftlab.data.tokenize import IGNORE_INDEX, Encoder, labels_from_spans
from peftlab.model.builtin import build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "Fine. What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]


def trained_runs(ids: list[int], labels: list[int], tok) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i, "a label must be the token itself (unshifted)"
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def encode(tok, messages, template=None, train_on="assistant"):
    [enc] = Encoder(tok, template=template, train_on=train_on).encode_batch([{"kind": "chat", "messages": messages}])
    assert not isinstance(enc, BadRow), enc
    return enc.input_ids, enc.labels


# (tokenizer dir, template, drop the system turn, reply -> expected decoded run, BOS count)
REAL_CASES = [
    ("llama3-8b-instruct", None, False, lambda r: f"{r}<|eot_id|>", 1),
    # Meta's Llama 2 format opens every [INST] with <s>: one BOS at the start, one per later user turn
    ("llama2-7b-chat", None, False, lambda r: f" {r} </s>", 3),
    ("mistral-7b", None, True, lambda r: f"{r}</s>", 1),  # its template allows no system turn
    ("gpt2", "chatml", False, lambda r: f"{r}<|im_end|>", 0),  # GPT-2: no chat template, no BOS convention
    ("gpt2", "alpaca", False, lambda r: f"{r}<|endoftext|>", 0),
    ("llama3-8b-instruct", "chatml", False, lambda r: f"{r}<|im_end|>", 1),
]


@pytest.mark.parametrize("name,template,no_system,expect,n_bos", REAL_CASES,
                         ids=[f"{c[0]}-{c[1] or 'own'}" for c in REAL_CASES])
def test_masks_real_tokenizers(shared_data, name, template, no_system, expect, n_bos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / name)
    messages = CHAT[1:] if no_system else CHAT
    ids, labels = encode(tok, messages, template)
    runs = trained_runs(ids, labels, tok)
    # sentencepiece tokenizers decode a leading "▁" as a space; compare modulo that one space. When the
    # end marker is not a special token (chatml on Llama 3), byte-level BPE merges the newline after it
    # into the marker's last token ("|>\n"): that token is needed to emit the marker, so it is trained.
    assert [r.lstrip(" ").rstrip("\n") for r in runs] == [expect(r).lstrip(" ") for r in REPLIES]
    bos = tok.bos_token_id
    if n_bos:
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == n_bos
    else:  # GPT-2: bos == eos == <|endoftext|>, never prepended
        assert ids[0] != bos
    # every run ends with the end-of-turn token, which is a label
    assert all(r.rstrip("\n").endswith(expect("").strip()) for r in runs)


def test_gpt2_without_template_is_a_clear_error(shared_data):
    from transformers import AutoTokenizer

    from peftlab.errors import PeftlabError

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    with pytest.raises(PeftlabError, match=r"no chat template.*data\.template"):
        encode(tok, CHAT)


def test_llama3_pad_equals_eos_end_token_still_trained(shared_data):
    """Llama 3's tokenizer pads with <|end_of_text|> = eos; the mistral template ends turns with eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama3-8b-instruct")
    assert tok.pad_token_id == tok.eos_token_id
    ids, labels = encode(tok, CHAT[1:3], "mistral")
    assert labels[-1] == tok.eos_token_id
    batch = collate([{"input_ids": ids, "labels": labels, "sample_id": 0, "dataset": 0, "loss_weight": 1.0},
                     {"input_ids": ids[:5], "labels": [IGNORE_INDEX] * 4 + [ids[4]], "sample_id": 1,
                      "dataset": 0, "loss_weight": 1.0}], pad_token_id=tok.pad_token_id)
    assert batch["labels"][0, len(ids) - 1] == tok.eos_token_id
    assert (batch["labels"][1, 5:] == IGNORE_INDEX).all()  # padding with the eos id is not a label


# ---- the same guarantees on the built-in tokenizer (always run) ----
BUILTIN_CASES = [
    (None, lambda r: f"{r}<|eot_id|>"),
    ("llama3", lambda r: f"{r}<|eot_id|>"),
    ("chatml", lambda r: f"{r}<|im_end|>"),
    ("alpaca", lambda r: f"{r}<|eot_id|>"),
    ("llama2", lambda r: f" {r} <|eot_id|>"),
    ("zephyr", lambda r: f"{r}<|eot_id|>"),
]


@pytest.mark.parametrize("template,expect", BUILTIN_CASES, ids=[c[0] or "own" for c in BUILTIN_CASES])
def test_masks_builtin_tokenizer(template, expect):
    tok = build_tokenizer()
    ids, labels = encode(tok, CHAT, template)
    assert trained_runs(ids, labels, tok) == [expect(r) for r in REPLIES]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.pad_token_id not in ids


def test_builtin_mistral_template_without_system():
    tok = build_tokenizer()
    ids, labels = encode(tok, CHAT[1:], "mistral")
    assert trained_runs(ids, labels, tok) == [f"{r}<|eot_id|>" for r in REPLIES]
    assert ids.count(tok.bos_token_id) == 1


def test_train_on_last_turn_and_all():
    tok = build_tokenizer()
    ids, labels = encode(tok, CHAT, train_on="last_turn")
    assert trained_runs(ids, labels, tok) == ["6<|eot_id|>"]
    ids, labels = encode(tok, CHAT, train_on="all")
    assert labels[1:] == ids[1:]


def test_reply_quoted_in_prompt_is_not_trained():
    """An assistant reply that also occurs in the user's text must be matched in the reply."""
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "Say OK"}, {"role": "assistant", "content": "OK"}]
    ids, labels = encode(tok, msgs)
    assert trained_runs(ids, labels, tok) == ["OK<|eot_id|>"]


@pytest.mark.parametrize("template", [None, "chatml", "alpaca"])
def test_conversation_opening_with_assistant(template):
    tok = build_tokenizer()
    msgs = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}]
    ids, labels = encode(tok, msgs, template)
    end = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert trained_runs(ids, labels, tok) == [f"Welcome!{end}", f"Hello.{end}"]


def test_llama3_conversation_opening_with_assistant(shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama3-8b-instruct")
    msgs = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}]
    ids, labels = encode(tok, msgs)
    assert trained_runs(ids, labels, tok) == ["Welcome!<|eot_id|>", "Hello.<|eot_id|>"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_no_assistant_turn_is_a_bad_row():
    tok = build_tokenizer()
    [res] = Encoder(tok).encode_batch([{"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}])
    assert isinstance(res, BadRow) and "no assistant turn" in res.expected


def test_tool_turns_are_not_trained():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "call:weather()"},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    ids, labels = encode(tok, msgs)
    assert trained_runs(ids, labels, tok) == ["call:weather()<|eot_id|>", "It is sunny.<|eot_id|>"]


def test_completion_and_text_records():
    tok = build_tokenizer()
    enc = Encoder(tok)
    comp, text = enc.encode_batch([{"kind": "completion", "prompt": "2+2=", "completion": "4"},
                                   {"kind": "text", "text": "hello"}])
    assert tok.decode(comp.input_ids) == "<|begin_of_text|>2+2=4<|eot_id|>"
    assert trained_runs(comp.input_ids, comp.labels, tok) == ["4<|eot_id|>"]
    assert trained_runs(text.input_ids, text.labels, tok) == ["hello<|eot_id|>"]


def test_labels_from_spans_overlap_rule():
    # tokens: [bos(0,0)] "ab"(0,2) "cd"(2,4) "ef"(4,6); span covers "d" only -> token "cd" trained
    assert labels_from_spans([9, 1, 2, 3], [(0, 0), (0, 2), (2, 4), (4, 6)], [(3, 4)]) == [-100, -100, 2, -100]
    assert labels_from_spans([1, 2, 3], [(0, 2), (2, 4), (4, 6)], [(0, 1), (4, 6)]) == [1, -100, 3]
    assert torch.tensor(labels_from_spans([1], [(0, 1)], [])).eq(-100).all()
