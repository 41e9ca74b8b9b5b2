"""Where a run is: the data order is a seeded permutation per epoch, a step may cross an epoch boundary, ranks
split the global order without overlap, the position survives JSON, and the data fingerprint sees content."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.trainer.state import EpochSampler, TrainState, data_fingerprint, real_tokens


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(10, 4, seed=3)
    first = s.epoch_order(0)
    assert [len(mb) for mb in first] == [4, 4, 2] and s.micro_batches_per_epoch == 3
    assert sorted(i for mb in first for i in mb) == list(range(10))
    assert first == EpochSampler(10, 4, seed=3).epoch_order(0)  # the same order on every run and rank
    assert first != s.epoch_order(1) and first != EpochSampler(10, 4, seed=4).epoch_order(0)
    with pytest.raises(PeftlabError, match="the training set is empty after tokenisation"):
        EpochSampler(0, 4, seed=3)


def test_a_step_crosses_the_epoch_boundary_and_resumes_from_its_position():
    s = EpochSampler(10, 4, seed=3)
    state = TrainState()
    steps = [s.next_step(state, grad_accum=2) for _ in range(3)]
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert steps == [e0[0:2], [e0[2], e1[0]], e1[1:3]]
    assert [[mb.epoch for mb in step] for step in steps] == [[0, 0], [0, 1], [1, 1]]  # what augmentation keys on
    assert (state.epoch, state.micro_index) == (1, 3)
    # a resumed run continues from the saved position with exactly the same micro-batches
    again = TrainState.from_json(json.loads(json.dumps(TrainState(epoch=0, micro_index=2).to_json())))
    assert s.next_step(again, grad_accum=2) == steps[1] and s.next_step(again, grad_accum=2) == steps[2]


def test_ranks_split_the_global_order_without_overlap():
    s = EpochSampler(32, 2, seed=0)
    one = s.next_step(TrainState(), grad_accum=4, rank=0, world_size=1)  # one process, the whole global batch
    ranks = [s.next_step(TrainState(), grad_accum=2, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]


def test_train_state_round_trips_what_a_checkpoint_saves():
    state = TrainState(step=7, epoch=1, micro_index=3, tokens_seen=900, skipped_steps=1, nonfinite_streak=0,
                       recent_losses=[2.5, 2.25], history=[{"not": "saved"}])
    saved = state.to_json()
    assert "history" not in saved
    back = TrainState.from_json(json.loads(json.dumps(saved)))
    assert back.to_json() == saved and back.history == []


def test_data_fingerprint_sees_tokens_labels_and_row_count():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    fp = data_fingerprint(rows)
    assert fp == data_fingerprint([dict(r) for r in rows]) and len(fp) == 16
    assert fp != data_fingerprint([rows[0], {"input_ids": [4, 5], "labels": [-100, 5]}])  # other targets
    assert fp != data_fingerprint(rows[:1]) and fp != data_fingerprint(rows[::-1])
    pair = {"prompt_ids": [1, 7], "chosen_ids": [8], "chosen_labels": [8], "rejected_ids": [9], "rejected_labels": [9]}
    other = {**pair, "rejected_ids": [10], "rejected_labels": [10]}  # a preference pair with another rejected answer
    assert data_fingerprint([pair]) != data_fingerprint([other])
    texts = [{"input_ids": [1, 2], "label": 0}, {"input_ids": [3, 4], "label": 2.2}]
    relabelled = [texts[0], {"input_ids": [3, 4], "label": 2.7}]  # same texts, another regression target
    assert data_fingerprint(texts) != data_fingerprint(relabelled)
    assert data_fingerprint(texts) != data_fingerprint([{**texts[0], "label": 1}, texts[1]])  # another class


def test_real_tokens_counts_non_padding():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert real_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}) == 8
    assert real_tokens({"input_ids": ids, "num_tokens": 7, "attention_mask": torch.ones(2, 1, 5, 5)}) == 7
    assert real_tokens({"input_ids": ids, "attention_mask": torch.ones(2, 1, 5, 5)}) == 10  # a 4D pack mask
