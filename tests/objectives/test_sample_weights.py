"""Per-row sample weights (``weight`` column) and per-dataset ``loss_weight``: a weight of 2 on a row
gives exactly the gradient of the same row appearing twice (fp64), because the step loss is the
weighted mean Σ w·ℓ / Σ w (peftlab.objectives.causal_lm.loss_normalizer)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_quickstart_data

from peftlab.data.collate import collate
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets
from peftlab.objectives.objective import CausalLMObjective
from peftlab.trainer.loop import accumulate_gradients


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = make_quickstart_data(tmp_path_factory.mktemp("sw"), n_train=6, n_eval=2)
    return [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    from peftlab.model.builtin import build_tokenizer

    return build_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples(tok, specs, **data):
    cfg = DataConfig(train=specs, max_seq_len=64, shuffle=False, **data)
    return list(build_data(cfg, tok, seed=0).train)


def _fp64_model():
    from transformers import AutoModelForCausalLM

    from peftlab.adapters.lora_inject import inject_lora, lora_modules
    from peftlab.model.builtin import resolve_builtin

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:micro-llama"), dtype=torch.float64)
    inject_lora(model, r=4, alpha=8, dropout=0.0, kernel_backend="torch")
    for m in lora_modules(model).values():  # B = 0 at init would make every A gradient zero
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        m.to(torch.float64)
    return model.train()


def _grads(model, examples, split, *, plain_count=False):
    model.zero_grad(set_to_none=True)
    batches, start = [], 0
    for size in split:
        batches.append(collate(examples[start:start + size], pad_token_id=0))
        start += size
    if plain_count:  # the naive normalisation: weighted sum / unweighted token count
        n = sum(count_targets(b) for b in batches)
        for b in batches:
            causal_lm_loss(model, b, normalizer=n, settings=LossSettings(backend="torch")).backward()
    else:
        accumulate_gradients(model, batches, CausalLMObjective(LossSettings(backend="torch")))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_row_weight_two_equals_duplicated_row_fp64(rows, tok, tmp_path):
    weighted = [dict(rows[0], weight=2.0), *rows[1:4]]
    duplicated = [rows[0], rows[0], *rows[1:4]]
    ex_w = _examples(tok, [{"path": str(_write(tmp_path / "w.jsonl", weighted)), "format": "messages"}])
    ex_d = _examples(tok, [{"path": str(_write(tmp_path / "d.jsonl", duplicated)), "format": "messages"}])
    assert [e["loss_weight"] for e in ex_w] == [2.0, 1.0, 1.0, 1.0]
    model = _fp64_model()
    g_w = _grads(model, ex_w, [2, 2])
    g_d = _grads(model, ex_d, [3, 2])
    assert all(g.abs().max() > 0 for g in g_w.values())
    assert _max_diff(g_w, g_d) < 1e-10
    # control: dividing by the unweighted token count (the naive way) is NOT the same as duplication
    assert _max_diff(_grads(model, ex_w, [4], plain_count=True), g_d) > 1e-6


def test_dataset_loss_weight_equals_duplicated_dataset_fp64(rows, tok, tmp_path):
    a = _write(tmp_path / "a.jsonl", rows[:2])
    b = _write(tmp_path / "b.jsonl", rows[2:4])
    ex_w = _examples(tok, [{"path": str(a), "format": "messages", "loss_weight": 2.0},
                           {"path": str(b), "format": "messages"}])
    ex_d = _examples(tok, [{"path": str(a), "format": "messages", "weight": 2.0},  # every row of a twice
                           {"path": str(b), "format": "messages"}])
    assert len(ex_w) == 4 and len(ex_d) == 6
    model = _fp64_model()
    assert _max_diff(_grads(model, ex_w, [4]), _grads(model, ex_d, [1, 5])) < 1e-10


def test_weight_column_mapping_and_bad_weight_names_the_row(rows, tok, tmp_path):
    mapped = [dict(r, importance=0.5) for r in rows[:2]]
    ex = _examples(tok, [{"path": str(_write(tmp_path / "m.jsonl", mapped)), "format": "messages",
                          "fields": {"weight": "importance"}, "loss_weight": 3.0}])
    assert [e["loss_weight"] for e in ex] == [1.5, 1.5]
    bad = [rows[0], dict(rows[1], weight="heavy")]
    with pytest.raises(PeftlabError, match=r"bad\.jsonl:2.*'weight'.*finite number"):
        _examples(tok, [{"path": str(_write(tmp_path / "bad.jsonl", bad)), "format": "messages"}])
