"""peftlab.data.preference_batch through collate: B pairs -> 2B rows (chosen first, then rejected) of one padded
batch with the prompt masked; KTO: the completions, then each prompt with the previous example's completion."""
from __future__ import annotations

from peftlab.data.collate import collate

P1, P2 = [1, 5, 6], [1, 7]


def pair(sid, prompt, chosen, rejected):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "chosen_labels": chosen, "rejected_ids": rejected,
            "rejected_labels": rejected, "sample_id": sid, "dataset": 0, "loss_weight": 1.0}


def test_pairs_become_chosen_rows_then_rejected_rows():
    b = collate([pair(10, P1, [20, 21], [30]), pair(11, P2, [22], [31, 32, 33])], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 20, 21], [1, 7, 22, 0, 0],
                                       [1, 5, 6, 30, 0], [1, 7, 31, 32, 33]]
    assert b["labels"].tolist() == [[-100, -100, -100, 20, 21], [-100, -100, 22, -100, -100],
                                    [-100, -100, -100, 30, -100], [-100, -100, 31, 32, 33]]
    assert b["attention_mask"].sum(1).tolist() == [5, 3, 4, 5]
    assert int(b["pairs"]) == 2 and b["sample_ids"].tolist() == [10, 11]


def test_kto_rows_add_mismatched_completions_for_the_kl_estimate():
    exs = [{"prompt_ids": P1, "completion_ids": [20, 21], "completion_labels": [20, 21], "desirable": True,
            "sample_id": 1, "loss_weight": 1.0},
           {"prompt_ids": P2, "completion_ids": [30, 31, 32, 33], "completion_labels": [30, 31, 32, 33],
            "desirable": False, "sample_id": 2, "loss_weight": 1.0}]
    b = collate(exs, pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 20, 21, 0], [1, 7, 30, 31, 32, 33],
                                       [1, 5, 6, 30, 31, 32], [1, 7, 20, 21, 0, 0]]  # cut to the longest row
    assert b["labels"][2].tolist() == [-100, -100, -100, 30, 31, 32]
    assert b["desirable"].tolist() == [True, False] and int(b["pairs"]) == 2
