"""A DANN run's ``tokens_seen`` counts the input tokens a step trained on: its source rows' and the paired target
rows' (the reversed domain gradient trains the backbone on those too), padding left out; the loss still averages
over source rows."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from peftlab.data.target_domain import TargetData
from peftlab.model.classifier import HEAD_ATTR, ClassificationHead
from peftlab.model.domain_head import attach_domain_head
from peftlab.objectives.domain_adversarial import DomainAdversarialObjective, token_batch
from peftlab.objectives.objective import trained_tokens
from peftlab.trainer.loop import accumulate_gradients


class _MeanEmbedding(nn.Module):
    """An encoder's interface (``last_hidden_state``, pooled at the first position) in one embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return SimpleNamespace(last_hidden_state=((self.emb(input_ids) * m).sum(1) / m.sum(1)).unsqueeze(1))


def test_tokens_seen_counts_source_and_paired_target_tokens_without_padding():
    torch.manual_seed(0)
    model = _MeanEmbedding()
    model.add_module(HEAD_ATTR, ClassificationHead(8, 2, pooling="first", task="classification", labels=["a", "b"]))
    attach_domain_head(model, 8, 4, lr=None)
    # target rows of lengths 1..9, so which rows are paired changes the count
    target = TargetData([{"input_ids": list(range(1, n + 1)), "sample_id": n} for n in range(1, 10)], None, "")
    objective = DomainAdversarialObjective(task="classification", label_map={"a": 0, "b": 1}, target=target,
                                           pad_token_id=0, seed=5)
    source = [{"input_ids": [3] * n, "label": n % 2, "sample_id": 100 + n} for n in (2, 5, 7)]
    batch = {**token_batch(source, 0, torch.device("cpu")), "labels": torch.tensor([r["label"] for r in source]),
             "sample_ids": torch.tensor([r["sample_id"] for r in source])}
    forwarded = []  # the target rows the loss really ran on
    draw = objective.target_batch
    objective.target_batch = lambda b: forwarded.append(draw(b)) or forwarded[-1]

    objective.begin_step(3, 10)
    _, n_targets = accumulate_gradients(model, [batch], objective)
    assert n_targets == 3 and objective.normalizer(batch) == 3.0  # the loss averages over source rows
    expected = 2 + 5 + 7 + int(forwarded[0]["attention_mask"].sum())
    assert trained_tokens(objective, [batch], n_targets) == expected  # what the loop adds to tokens_seen
    assert expected < 2 * batch["input_ids"].numel()  # padding (source rows 2/5/7 padded to 7) left out
