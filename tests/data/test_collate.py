"""collate(): right padding, multiples, loss weights; packs vs plain examples."""
from __future__ import annotations

import pytest
import torch

from peftlab.data.collate import collate
from peftlab.data.packing import make_pack

IGNORE = -100


def ex(ids: list[int], labels: list[int], sid: int, lw: float = 1.0) -> dict:
    return {"input_ids": ids, "labels": labels, "sample_id": sid, "dataset": 0, "loss_weight": lw}


def test_plain_right_padding_to_multiple():
    batch = collate([ex([1, 2, 3], [IGNORE, 2, 3], 7, 0.5), ex([1, 4], [IGNORE, 4], 9)], pad_token_id=0,
                    pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [IGNORE, 4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["loss_weights"].tolist() == [[0.5, 0.5, 0.5, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert batch["sample_ids"].tolist() == [7, 9] and "position_ids" not in batch
    assert batch["input_ids"].dtype == torch.long


def test_pack_per_token_loss_weights_and_no_mixing():
    p = make_pack([ex([1, 2], [IGNORE, 2], 1, 2.0), ex([1, 3, 4], [IGNORE, 3, 4], 2, 1.0)])
    batch = collate([p], pad_token_id=0)
    assert batch["loss_weights"].tolist() == [[2.0, 2.0, 1.0, 1.0, 1.0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, IGNORE, 3, 4]]
    with pytest.raises(ValueError, match="cannot mix"):
        collate([p, ex([1], [IGNORE], 3)], pad_token_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0)
