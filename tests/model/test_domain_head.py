"""The DANN domain head: registered on the model instance, trained in an optimizer group of its own at its
learning rate (the run's schedule applied through lr_scale), its files written beside the classifier head and
read back exactly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.model.domain_head import (
    DOMAIN_CONFIG_FILE,
    DOMAIN_HEAD_ATTR,
    DOMAIN_HEAD_FILE,
    attach_domain_head,
    domain_head_of,
    load_domain_head,
    save_domain_head,
    separate_domain_head_group,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))


def test_own_optimizer_group_at_its_learning_rate():
    model = _model()
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "lr_scale": 1.0, "name": "adapters"}]
    assert separate_domain_head_group(model, groups, 1e-3) == groups  # no domain head: unchanged
    head = attach_domain_head(model, 8, 4, lr=5e-3)
    groups = [{"params": [p for p in model.parameters()], "lr": 1e-3, "lr_scale": 1.0, "name": "adapters"}]
    out = separate_domain_head_group(model, groups, 1e-3)
    assert [g["name"] for g in out] == ["adapters", "domain_head"]
    assert {id(p) for p in out[1]["params"]} == {id(p) for p in head.parameters()}
    assert not {id(p) for p in out[0]["params"]} & {id(p) for p in head.parameters()}
    assert out[1]["lr"] == 5e-3 and out[1]["lr_scale"] == pytest.approx(5.0)
    head.lr = None
    assert separate_domain_head_group(model, groups, 1e-3)[1]["lr_scale"] == 1.0  # None: train.lr


def test_files_round_trip_and_the_head_lives_on_the_instance(tmp_path):
    model = _model()
    with pytest.raises(PeftlabError, match="no domain head"):
        domain_head_of(model)
    head = attach_domain_head(model, 8, 4, lr=None)
    assert getattr(model, DOMAIN_HEAD_ATTR) is head and not hasattr(nn.Sequential, DOMAIN_HEAD_ATTR)
    x = torch.randn(5, 8)
    assert head(x).shape == (5,)
    save_domain_head(model, tmp_path)
    assert json.loads((tmp_path / DOMAIN_CONFIG_FILE).read_text()) == {"hidden_size": 8, "width": 4, "lr": None}
    other = _model()
    loaded = load_domain_head(other, tmp_path, torch.device("cpu"))
    assert (tmp_path / DOMAIN_HEAD_FILE).is_file() and torch.equal(loaded(x), head(x))
