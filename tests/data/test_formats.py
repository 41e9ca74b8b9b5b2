"""Every format round-trips a hand-written example; every bad-row case names file:row, field, expectation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.formats import BadRow, detect_format, to_record
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

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
    from peftlab.data.collate import collate

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
    assert "bad rows skipped: 1" in __import__("peftlab.data.stats", fromlist=["format_stats"]).format_stats(b.stats)


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


# ---- preference data (DPO pairs, KTO rows): recognised and refused with what to do ----------------

U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
Q = "What colour is the sky?"
# (TRL's shape, a row, the fields the refusal must suggest, what SFT on that mapping must train)
PAIRS = [
    ("standard", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     "format: prompt_completion, fields: {completion: chosen}", "<|begin_of_text|>The sky is[[ blue.<|eot_id|>]]"),
    ("conversational", {"prompt": [U(Q)], "chosen": [AS("Blue.")], "rejected": [AS("Green.")]},
     "format: prompt_completion, fields: {completion: chosen}",
     f"<|begin_of_text|>{H}user{A}{Q}<|eot_id|>{H}assistant{A}[[Blue.<|eot_id|>]]"),
    ("implicit-prompt", {"chosen": [U(Q), AS("Blue.")], "rejected": [U(Q), AS("Green.")]},
     "format: messages, fields: {messages: chosen}",
     f"<|begin_of_text|>{H}user{A}{Q}<|eot_id|>{H}assistant{A}[[Blue.<|eot_id|>]]"),
    ("implicit-prompt-text", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     "format: text, fields: {text: chosen}", "<|begin_of_text|>[[The sky is blue.<|eot_id|>]]"),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt", "value": "Blue."},
                  "rejected": {"from": "gpt", "value": "Green."}},
     "format: prompt_completion, fields: {prompt: conversations, completion: chosen}",
     f"<|begin_of_text|>{H}user{A}{Q}<|eot_id|>{H}assistant{A}[[Blue.<|eot_id|>]]"),
]


def _mapping(suggestion: str) -> dict:
    """'format: F, fields: {a: b, c: d}' -> {"format": F, "fields": {...}} (the refusal's own words, applied)."""
    import yaml

    return yaml.safe_load("{" + suggestion + "}")


@pytest.mark.parametrize("shape,row,fix,trained", PAIRS, ids=[p[0] for p in PAIRS])
def test_preference_pairs_are_refused_with_a_mapping_that_trains_the_chosen_answers(tmp_path, tok, shape, row,
                                                                                    fix, trained):
    good = {"messages": [U("hi"), AS("hello")]}
    for fmt in ("auto", "sharegpt" if shape == "sharegpt" else "prompt_completion"):
        with pytest.raises(PeftlabError) as e:  # refused whatever on_bad_rows says: the data, not a row, is wrong
            one(tmp_path, tok, [row, row], fmt, on_bad_rows="skip")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'd.jsonl'}:1: dataset 'd' (data.train[0]) is preference data "
                              "(DPO-style pairs"), msg
        assert "which SFT cannot train on. To train on the preferences, add a preference section to the " \
               "recipe, e.g. preference: {method: dpo}" in msg and "no assistant turn" not in msg
        assert f"on the chosen answers only, map the fields of this dataset: {fix}." in msg
    if shape != "sharegpt":  # a file that starts with SFT rows is refused at its first pair
        with pytest.raises(PeftlabError, match=r"d\.jsonl:2: dataset 'd' .* is preference data"):
            one(tmp_path, tok, [{"prompt": "a", "completion": "b"}, row], "prompt_completion") \
                if "prompt" in row else one(tmp_path, tok, [good, row])
    m = _mapping(fix)
    b = one(tmp_path, tok, [row], m["format"], spec={"fields": m["fields"]})
    assert decode_marked(tok, b.train[0]) == trained
    assert "green" not in tok.decode(b.train[0]["input_ids"]).lower()


def test_preference_pairs_with_another_prompt_column_name_it(tmp_path, tok):
    row = {"system": "Be brief.", "question": Q, "chosen": "Blue.", "rejected": "Green."}  # orca_dpo_pairs' shape
    with pytest.raises(PeftlabError, match=r"fields: \{prompt: <the prompt column, one of question, system>, "
                                           r"completion: chosen\}"):
        one(tmp_path, tok, [row])
    b = one(tmp_path, tok, [row], "prompt_completion", spec={"fields": {"prompt": "question", "completion": "chosen"}})
    assert decode_marked(tok, b.train[0]) == f"<|begin_of_text|>{Q}[[Blue.<|eot_id|>]]"


KTO = [
    ("prompt_completion", {"prompt": "The sky is", "completion": " green.", "label": False}),
    ("prompt_completion", {"prompt": [U(Q)], "completion": [AS("Green.")], "label": False}),
    ("messages", {"messages": [U(Q), AS("Blue.")], "label": True}),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "Blue."}],
                  "label": True}),
]


@pytest.mark.parametrize("fmt,row", KTO, ids=["text", "conversational", "messages", "sharegpt"])
def test_kto_rows_are_refused_not_trained_as_sft(tmp_path, tok, fmt, row):
    for given in ("auto", fmt):
        with pytest.raises(PeftlabError) as e:
            one(tmp_path, tok, [row], given, on_bad_rows="skip")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'd.jsonl'}:1: dataset 'd' (data.train[0]) is KTO data (unpaired, "
                              f"labelled: {fmt} rows, each with a boolean `label`"), msg
        assert "To train on it, add preference: {method: kto} to the recipe" in msg
        assert "undesirable answers too" in msg
        assert ("To fine-tune (SFT) on the desirable answers only, keep the rows whose `label` is true and remove "
                "that column") in msg
    # the fix the message gives: the desirable rows without the label column train as SFT
    desirable = {k: v for k, v in row.items() if k != "label"}
    assert len(one(tmp_path, tok, [desirable]).train) == 1


def test_kto_label_under_another_column_name(tmp_path, tok):
    row = {"messages": [U(Q), AS("Blue.")], "meta": {"good": False}}
    with pytest.raises(PeftlabError, match=r"boolean `meta\.good`.*select\(\.meta\.good == true\) \| del\(\.meta\.good\)"):
        one(tmp_path, tok, [row], spec={"fields": {"label": "meta.good"}})


def test_true_false_classification_still_trains(tmp_path, tok):
    rows = [{"text": "good", "label": True}, {"text": "bad", "label": False}, {"text": "fine", "label": True}]
    for fmt, extra in (("auto", {}), ("classification", {}), ("auto", {"label_type": "class"})):
        b = one(tmp_path, tok, rows, fmt, **extra)
        assert b.task == "classification" and b.label_map == {"False": 0, "True": 1}
        assert [e["label"] for e in b.train] == [1, 0, 1]


def test_kto_refusal_through_the_cli(tmp_path, capsys):
    import yaml

    from peftlab.cli.main import main

    (tmp_path / "kto.jsonl").write_text(json.dumps({"prompt": "Q", "completion": "bad answer", "label": False}) + "\n")
    recipe = {"model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
              "data": {"train": ["kto.jsonl"], "max_seq_len": 64}, "train": {"max_steps": 1},
              "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for cmd in ("data", "train"):
        assert main([cmd, str(tmp_path / "r.yaml")]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # after the model loader's progress bar
        assert err.startswith(f"peftlab: error: {tmp_path / 'kto.jsonl'}:1: dataset 'kto' (data.train[0]) is KTO data")
    assert not (tmp_path / "out" / "adapter").exists()


# ---- nested field paths ---------------------------------------------------------------------------

def test_nested_field_paths(tmp_path, tok):
    rows = [{"id": 1, "data": {"question": "Q", "answer": {"text": ["R", "R2"]}}, "meta": {"w": 2.0}}]
    fields = {"instruction": "data.question", "output": "data.answer.text[0]", "weight": "meta.w"}
    for fmt in ("auto", "alpaca"):  # detection follows the paths too
        b = one(tmp_path, tok, rows, fmt, spec={"fields": fields})
        assert decode_marked(tok, b.train[0]) == f"<|begin_of_text|>{H}user{A}Q<|eot_id|>{H}assistant{A}[[R<|eot_id|>]]"
        assert b.train[0]["loss_weight"] == 2.0
    # a digit key indexes a list, negative from the end; a path into a list of turns
    b = one(tmp_path, tok, rows, "alpaca", spec={"fields": {"instruction": "data.question",
                                                            "output": "data.answer.text.-1"}})
    assert decode_marked(tok, b.train[0]).endswith("[[R2<|eot_id|>]]")
    b = one(tmp_path, tok, [{"log": {"turns": [U("Q"), AS("R")]}}], spec={"fields": {"messages": "log.turns"}})
    assert decode_marked(tok, b.train[0]).endswith("[[R<|eot_id|>]]")
    # a flat column whose name has a dot wins over the path
    b = one(tmp_path, tok, [{"data.question": "flat", "data": {"question": "nested"}, "output": "R"}], "alpaca",
            spec={"fields": {"instruction": "data.question"}})
    assert "flat" in tok.decode(b.train[0]["input_ids"]) and "nested" not in tok.decode(b.train[0]["input_ids"])


def test_nested_path_missing_says_where_it_stops(tmp_path, tok):
    good = {"data": {"question": "Q", "answers": ["R"]}}
    fields = {"instruction": "data.question", "output": "data.answers[0]"}
    cases = [({"data": {"q": "Q", "answers": ["R"]}}, "data.question",
              "('data' has no key 'question'; its keys: ['answers', 'q'])"),
             ({"data": {"question": "Q", "answers": []}}, "data.answers[0]",
              "('data.answers' is a list of 0 items, so it has no item 0)"),
             ({"data": "Q"}, "data.question", "('data' is str, not an object or a list)")]
    for row, field, detail in cases:
        with pytest.raises(PeftlabError) as e:
            one(tmp_path, tok, [good, row], "alpaca", spec={"fields": fields})
        assert f"d.jsonl:2: bad row in dataset 'd' (data.train[0], format alpaca): field {field!r} missing " \
               f"{detail}; expected a string" in str(e.value)


def test_sharegpt_style_turns_in_a_conversational_completion(tmp_path, tok):
    row = {"prompt": [{"from": "human", "value": "Q"}], "completion": {"from": "gpt", "value": "R"}}
    b = one(tmp_path, tok, [row], "prompt_completion")
    assert decode_marked(tok, b.train[0]) == f"<|begin_of_text|>{H}user{A}Q<|eot_id|>{H}assistant{A}[[R<|eot_id|>]]"


def test_preference_mapping_on_a_real_chat_template(shared_data, tmp_path):
    """The suggested mapping for ShareGPT-style pairs trains exactly the chosen reply under Llama 3's template."""
    from transformers import AutoTokenizer

    from peftlab.data.tokenize import IGNORE_INDEX

    real = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama3-8b-instruct")
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q}],
           "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "Green."}}
    with pytest.raises(PeftlabError, match="fields: {prompt: conversations, completion: chosen}"):
        one(tmp_path, real, [row])
    b = one(tmp_path, real, [row], "prompt_completion",
            spec={"fields": {"prompt": "conversations", "completion": "chosen"}})
    ex = b.train[0]
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert real.decode(trained) == "Blue.<|eot_id|>"
    assert "Green" not in real.decode(ex["input_ids"])


def test_bad_row_message_names_the_detected_format(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "hi"}]}  # no assistant turn: found at tokenization
    with pytest.raises(PeftlabError, match=r"d\.jsonl:1: bad row in dataset 'd' \(data\.train\[0\], format messages\)"):
        one(tmp_path, tok, [row])
