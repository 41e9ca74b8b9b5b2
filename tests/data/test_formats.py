"""Every format round-trips a hand-written example; every bad-row case names file:row, field, expectation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.builtin import build_tokenizer
from peftlab.data import DataConfig, build_data
from peftlab.data.formats import BadRow, detect_format, to_record
from peftlab.errors import PeftlabError

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def one(tmp_path: Path, tok, rows: list, fmt: str = "auto", **cfg):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = DataConfig(train=[{"path": str(path), "format": fmt, **cfg.pop("spec", {})}], shuffle=False, **cfg)
    return build_data(c, tok, seed=0)


def decode_marked(tok, ex) -> str:
    from peftlab.data.preview import mark_trained

    return mark_trained(ex["input_ids"], ex["labels"], tok)


H, A = "<|start_header_id|>", "<|end_header_id|>\n\n"


def test_alpaca_roundtrip(tmp_path, tok):
    b = one(tmp_path, tok, [{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    assert decode_marked(tok, b.train[0]) == (
        f"<|begin_of_text|>{H}user{A}Add\n\n2 and 2<|eot_id|>{H}assistant{A}[[4<|eot_id|>]]")


def test_sharegpt_roundtrip(tmp_path, tok):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "R"}]}
    b = one(tmp_path, tok, [row])
    assert decode_marked(tok, b.train[0]) == (
        f"<|begin_of_text|>{H}system{A}S<|eot_id|>{H}user{A}Q<|eot_id|>{H}assistant{A}[[R<|eot_id|>]]")


def test_messages_roundtrip_with_tool_turn(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "call"},
                        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42"}]}
    b = one(tmp_path, tok, [row])
    assert decode_marked(tok, b.train[0]) == (
        f"<|begin_of_text|>{H}user{A}Q<|eot_id|>{H}assistant{A}[[call<|eot_id|>]]"
        f"{H}tool{A}42<|eot_id|>{H}assistant{A}[[It is 42<|eot_id|>]]")


def test_prompt_completion_roundtrip_text_and_conversational(tmp_path, tok):
    b = one(tmp_path, tok, [{"prompt": "The sky is", "completion": " blue."}])
    assert decode_marked(tok, b.train[0]) == "<|begin_of_text|>The sky is[[ blue.<|eot_id|>]]"
    conv = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "R"}]}
    b = one(tmp_path, tok, [conv])
    assert decode_marked(tok, b.train[0]) == f"<|begin_of_text|>{H}user{A}Q<|eot_id|>{H}assistant{A}[[R<|eot_id|>]]"


def test_text_roundtrip(tmp_path, tok):
    b = one(tmp_path, tok, [{"text": "Once upon a time."}])
    assert decode_marked(tok, b.train[0]) == "<|begin_of_text|>[[Once upon a time.<|eot_id|>]]"


def test_classification_labels_and_regression(tmp_path, tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "fine", "label": "pos"}]
    b = one(tmp_path, tok, rows)
    assert b.task == "classification" and b.label_map == {"neg": 0, "pos": 1}
    assert [e["label"] for e in b.train] == [1, 0, 1]
    assert tok.decode(b.train[0]["input_ids"]) == "<|begin_of_text|>good"
    assert "labels" not in b.train[0]
    b = one(tmp_path, tok, [{"text": "a", "label": 0.5}, {"text": "b", "label": 2}])
    assert b.task == "regression" and [e["label"] for e in b.train] == [0.5, 2.0]
    b = one(tmp_path, tok, [{"text": "a", "label": 3}, {"text": "b", "label": 1}], label_type="class")
    assert b.label_map == {"1": 1, "3": 3} and [e["label"] for e in b.train] == [3, 1]
    from peftlab.data import collate

    batch = collate(b.train, pad_token_id=b.pad_token_id)
    assert batch["labels"].tolist() == [3, 1] and batch["input_ids"].shape == (2, 2)


def test_field_remap(tmp_path, tok):
    rows = [{"question": "Q", "answer": "R"}]
    b = one(tmp_path, tok, rows, "alpaca", spec={"fields": {"instruction": "question", "output": "answer"}})
    assert decode_marked(tok, b.train[0]).endswith("[[R<|eot_id|>]]")
    rows = [{"dialog": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}]}]
    b = one(tmp_path, tok, rows, spec={"fields": {"messages": "dialog"}})
    assert decode_marked(tok, b.train[0]).endswith("[[R<|eot_id|>]]")


def test_system_prompt_added_when_missing(tmp_path, tok):
    b = one(tmp_path, tok, [{"instruction": "Q", "output": "R"}], system_prompt="Be nice.")
    assert decode_marked(tok, b.train[0]).startswith(f"<|begin_of_text|>{H}system{A}Be nice.<|eot_id|>")


@pytest.mark.parametrize("row,expected", [
    ({"a": 1}, None),
    ({"messages": [], "conversations": []}, "several formats fit"),
])
def test_detect_format_errors(row, expected):
    with pytest.raises(PeftlabError, match=r"f\.jsonl:3: cannot detect the format.*Set `format:`") as e:
        detect_format(row, {}, "f.jsonl:3", "d")
    if expected:
        assert expected in str(e.value)


BAD_ROWS = [
    ("alpaca", {"instruction": "x"}, "output", "missing; expected a string"),
    ("alpaca", {"instruction": "x", "output": 3}, "output", "expected a string, got int"),
    ("alpaca", {"instruction": " ", "output": "y"}, "instruction", "is empty"),
    ("messages", {"messages": "hi"}, "messages", "non-empty list of turns"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "unknown role 'bot'"),
    ("messages", {"messages": [{"role": "user"}]}, "messages[0].content", "expected a string"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from", "unknown role"),
    ("sharegpt", {"conversations": ["x"]}, "conversations[0]", "expected an object"),
    ("prompt_completion", {"prompt": "p"}, "completion", "missing"),
    ("text", {"text": ""}, "text", "is empty"),
    ("classification", {"text": "t", "label": [1]}, "label", "expected a class name"),
]


@pytest.mark.parametrize("fmt,row,field,expected", BAD_ROWS, ids=[f"{b[0]}-{b[2]}" for b in BAD_ROWS])
def test_bad_row_messages(tmp_path, tok, fmt, row, field, expected):
    good = {"alpaca": {"instruction": "a", "output": "b"},
            "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            "prompt_completion": {"prompt": "a", "completion": "b"}, "text": {"text": "a"},
            "classification": {"text": "a", "label": "x"}}[fmt]
    with pytest.raises(PeftlabError) as e:
        one(tmp_path, tok, [good, good, row], fmt)
    msg = str(e.value)
    assert f"d.jsonl:3: bad row in dataset 'd' (data.train[0], format {fmt}): field {field!r}" in msg
    assert expected in msg and "data.on_bad_rows: skip" in msg
    b = one(tmp_path, tok, [good, row, good], fmt, on_bad_rows="skip")
    assert len(b.train) == 2 and b.stats.bad_rows == 1
    assert "bad rows skipped: 1" in __import__("peftlab.data", fromlist=["format_stats"]).format_stats(b.stats)


def test_all_rows_bad_or_empty_dataset(tmp_path, tok):
    with pytest.raises(PeftlabError, match="all 2 rows were bad"):
        one(tmp_path, tok, [{"text": ""}, {"text": ""}], "text", on_bad_rows="skip")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(PeftlabError, match=r"data\.train\[0\]: dataset 'e' .* is empty"):
        build_data(DataConfig(train=[str(tmp_path / "e.jsonl")]), tok, seed=0)


def test_template_rejection_is_a_bad_row(tmp_path, tok):
    # the mistral template refuses tool turns: reported as a bad row naming the template
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "t"},
                        {"role": "assistant", "content": "b"}]}
    with pytest.raises(PeftlabError, match=r"d\.jsonl:1: .*chat template \(mistral\) rejected it"):
        one(tmp_path, tok, [row], template="mistral")


def test_to_record_unknown_format():
    with pytest.raises(PeftlabError, match="unknown data format"):
        to_record({}, "yaml", {})
    with pytest.raises(BadRow):
        to_record([1], "alpaca", {})
