"""peftlab.data.preference_rows: TRL's preference shapes are detected, rendered with the chat template, the prompt is
never a label, chosen and rejected share their prompt tokens, and over-length pairs are cut prompt-first."""
from __future__ import annotations

import pytest

from peftlab.data.formats import BadRow
from peftlab.data.preference_rows import (
    EncodedAnswer,
    EncodedPreference,
    PreferenceEncoder,
    example_of,
    fit_pair,
    preference_records,
    preference_shape,
)
from peftlab.data.preview import mark_trained
from peftlab.data.tokenize import Encoder
from peftlab.model.builtin import build_tokenizer

U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
Q = "What colour is the sky?"
H, A = "<|start_header_id|>", "<|end_header_id|>\n\n"
CHAT_PROMPT = f"<|begin_of_text|>{H}user{A}{Q}<|eot_id|>{H}assistant{A}"
# (TRL's shape, a row, the prompt as decoded, the chosen / rejected answers with their trained tokens marked)
PAIRS = [
    ("standard", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     "<|begin_of_text|>The sky is", "[[ blue.<|eot_id|>]]", "[[ green.<|eot_id|>]]"),
    ("conversational", {"prompt": [U(Q)], "chosen": [AS("Blue.")], "rejected": [AS("Green.")]},
     CHAT_PROMPT, "[[Blue.<|eot_id|>]]", "[[Green.<|eot_id|>]]"),
    ("implicit-prompt", {"chosen": [U(Q), AS("Blue.")], "rejected": [U(Q), AS("Green.")]},
     CHAT_PROMPT, "[[Blue.<|eot_id|>]]", "[[Green.<|eot_id|>]]"),
    ("implicit-prompt-text", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     "<|begin_of_text|>The sky is", "[[ blue.<|eot_id|>]]", "[[ green.<|eot_id|>]]"),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt", "value": "Blue."},
                  "rejected": {"from": "gpt", "value": "Green."}},
     CHAT_PROMPT, "[[Blue.<|eot_id|>]]", "[[Green.<|eot_id|>]]"),
]


@pytest.fixture(scope="module")
def enc():
    return PreferenceEncoder(Encoder(build_tokenizer()))


@pytest.mark.parametrize("shape,row,prompt,chosen,rejected", PAIRS, ids=[p[0] for p in PAIRS])
def test_pairs_of_every_shape_share_their_prompt_and_label_only_the_answers(enc, shape, row, prompt, chosen,
                                                                            rejected):
    assert preference_shape(row, {}) == "pairs"
    [rec] = preference_records(row, {}, "pairs")
    ex = example_of(enc.encode(rec))
    tok = enc.enc.tok
    assert tok.decode(ex["prompt_ids"]) == prompt
    assert mark_trained(ex["chosen_ids"], ex["chosen_labels"], tok) == chosen
    assert mark_trained(ex["rejected_ids"], ex["rejected_labels"], tok) == rejected
    # the full chosen sequence is exactly what SFT on the same conversation would tokenize
    full = enc.enc.encode_prompt(prompt.removeprefix("<|begin_of_text|>") + chosen.strip("[]"))
    assert ex["prompt_ids"] + ex["chosen_ids"] == full


def test_kto_rows_and_pairs_unpaired_for_kto(enc):
    rows = [({"prompt": "The sky is", "completion": " green.", "label": False}, [False]),
            ({"prompt": [U(Q)], "completion": [AS("Blue.")], "label": True}, [True]),
            ({"messages": [U(Q), AS("Blue.")], "label": True}, [True]),
            ({"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "Green."}], "label": False},
             [False]),
            (PAIRS[1][1], [True, False])]  # a pair gives a KTO run both completions (TRL's unpairing)
    for row, want in rows:
        recs = preference_records(row, {}, "unpaired")
        assert [r["desirable"] for r in recs] == want
        ex = example_of(enc.encode(recs[-1]))
        assert set(ex) == {"prompt_ids", "completion_ids", "completion_labels", "desirable"}
        assert any(x != -100 for x in ex["completion_labels"])
    msgs = preference_records(rows[2][0], {}, "unpaired")[0]
    assert msgs["prompt"] == [U(Q)] and msgs["completion"] == [AS("Blue.")]


def test_fields_rename_and_bad_rows_name_the_field(enc):
    row = {"q": [U(Q)], "good": [AS("Blue.")], "bad": [AS("Green.")]}
    [rec] = preference_records(row, {"prompt": "q", "chosen": "good", "rejected": "bad"}, "pairs")
    assert rec["chosen"] == [AS("Blue.")]
    with pytest.raises(BadRow, match="is not preference data .*expected \\{prompt, chosen, rejected\\}"):
        preference_records({"messages": [U(Q), AS("x")]}, {}, "pairs")
    with pytest.raises(BadRow, match="use preference.method: kto") as e:
        preference_records({"prompt": "a", "completion": "b", "label": True}, {}, "pairs")
    assert e.value.field == "label"
    with pytest.raises(BadRow, match="no assistant turn"):
        preference_records({"prompt": [U(Q)], "chosen": [U("x")], "rejected": [AS("y")]}, {}, "pairs")
    with pytest.raises(BadRow, match="same conversation"):
        preference_records({"chosen": [U(Q), AS("a")], "rejected": [U(Q), AS("a")]}, {}, "pairs")


def test_over_length_pairs_cut_the_prompt_from_the_left_first_keeping_bos_then_the_answers():
    bos = 1
    enc = EncodedPreference([bos, *range(10, 20)],
                            [EncodedAnswer([30, 31, 32, 33], [30, 31, 32, 33]), EncodedAnswer([40, 41], [40, 41])])
    fitted = fit_pair(enc, 12, 6, "truncate", bos)  # 11 + 4 > 12: the prompt keeps BOS + its last 5 tokens
    assert enc.prompt_ids == [bos, 15, 16, 17, 18, 19] and fitted.prompt_cut == 5 and fitted.answer_cut == 0
    assert enc.answers[0].ids == [30, 31, 32, 33] and fitted.kept
    enc = EncodedPreference([bos, *range(10, 20)], [EncodedAnswer([30, 31, 32, 33], [30, 31, 32, 33])])
    fitted = fit_pair(enc, 8, 6, "truncate", bos)  # then the answer keeps its first 2 tokens
    assert enc.prompt_ids == [bos, 15, 16, 17, 18, 19] and enc.answers[0].ids == [30, 31] and fitted.answer_cut == 2
    short = EncodedPreference([bos, 5], [EncodedAnswer([30], [30])])
    assert fit_pair(short, 8, 6, "drop", bos).kept and short.prompt_ids == [bos, 5]
    long = EncodedPreference([bos, *range(10, 20)], [EncodedAnswer([30], [30])])
    assert not fit_pair(long, 8, 6, "drop", bos).kept
    masked = EncodedPreference([bos, *range(10, 20)], [EncodedAnswer([30, 31], [-100, 31])])
    assert not fit_pair(masked, 7, 6, "truncate", bos).kept  # no trained token left in the answer: dropped
