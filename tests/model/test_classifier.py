"""The classifier model: a head registered on the model instance for the data's label space (pooling the last
real token of a decoder, the first of an encoder), its files written and read back exactly, and the data that
cannot train it refused with one message."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import make_quickstart_data

from peftlab.errors import PeftlabError
from peftlab.model.classifier import (
    CONFIG_FILE,
    HEAD_ATTR,
    HEAD_FILE,
    ClassificationHead,
    attach_head,
    head_of,
    is_encoder,
    load_head,
    save_head,
)
from peftlab.model.load import load_base_model


def _decoder():
    return load_base_model("builtin:micro-llama", dtype=torch.float32, device=torch.device("cpu"))


def _data(task="classification", labels=("food", "sport", "weather")):
    return SimpleNamespace(task=task, label_map={name: i for i, name in enumerate(labels)})


def test_head_for_the_label_space_on_the_instance_only(tmp_path):
    model = _decoder()
    recipe = SimpleNamespace(task="classification")
    head = attach_head(model, _data(), recipe)
    assert getattr(model, HEAD_ATTR) is head and head_of(model) is head
    assert head.pooling == "last" and head.labels == ["food", "sport", "weather"]
    assert head.score.out_features == 3 and head.score.in_features == model.config.hidden_size
    assert head.score.weight.dtype == torch.float32 and not hasattr(type(model), HEAD_ATTR)
    regression = attach_head(_decoder(), _data("regression", ()), SimpleNamespace(task="regression"))
    assert regression.score.out_features == 1 and regression.labels == []
    with pytest.raises(PeftlabError, match="this model has no classification head"):
        head_of(_decoder())


@pytest.mark.parametrize("data, recipe_task, message", [
    (_data("causal_lm"), "classification", "task: classification needs classification rows"),
    (_data("regression"), "classification", "data.label_type made the labels regression; set data.label_type"),
    (_data(labels=("only",)), "classification", r"needs at least 2 classes in the data; found \['only'\]"),
])
def test_data_that_cannot_train_a_classifier_is_refused(data, recipe_task, message):
    with pytest.raises(PeftlabError, match=message):
        attach_head(_decoder(), data, SimpleNamespace(task=recipe_task))


def test_messages_data_are_refused_by_a_classification_run(tmp_path):
    from peftlab.recipe.parse import recipe_from_dict
    from peftlab.trainer.loop import Trainer

    data = make_quickstart_data(tmp_path, n_train=8, n_eval=2)
    raw = {"task": "classification", "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
           "data": {"train": [{"path": str(data / "train.jsonl"), "format": "messages"}], "max_seq_len": 64},
           "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "out")}}
    with pytest.raises(PeftlabError, match="task: classification needs classification rows"):
        Trainer(recipe_from_dict(raw), quiet=True)


def test_head_files_round_trip(tmp_path):
    model = _decoder()
    head = attach_head(model, _data(), SimpleNamespace(task="classification"))
    torch.nn.init.normal_(head.score.bias)
    save_head(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, HEAD_FILE])  # no temporaries
    other = _decoder()
    loaded = load_head(other, tmp_path, torch.device("cpu"))
    assert head_of(other) is loaded and (loaded.pooling, loaded.task, loaded.labels) == ("last", "classification",
                                                                                         head.labels)
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    pooled = torch.randn(2, head.score.in_features, dtype=torch.bfloat16)
    assert loaded(pooled).dtype == torch.float32  # fp32 whatever the backbone dtype
    assert torch.equal(loaded(pooled), head(pooled))


def test_encoders_are_recognised():
    from transformers import BertConfig, LlamaConfig

    assert is_encoder(BertConfig())
    assert not is_encoder(BertConfig(is_decoder=True)) and not is_encoder(LlamaConfig())
    assert ClassificationHead(8, 2, pooling="first", task="classification", labels=["a", "b"]).pooling == "first"
