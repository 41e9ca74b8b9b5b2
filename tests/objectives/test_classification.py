"""Sequence classification / regression: LoRA + head on the micro decoder and on a tiny BERT built from
a config learn; the objective's loss, row counting and metrics equal scikit-learn's / a direct computation.
(The head and model: tests/model/test_classifier.py; predict / eval of a saved adapter:
tests/evaluation/test_predict.py.)"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.evaluation.predict import load_classifier
from peftlab.objectives.classification import (
    ClassificationObjective,
    classification_metrics,
    logits_of,
    predict_batches,
    regression_metrics,
)
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

sklearn_metrics = pytest.importorskip("sklearn.metrics")
REPO = Path(__file__).resolve().parents[2]


def _gen():
    spec = importlib.util.spec_from_file_location("make_classify_data", REPO / "recipes" / "make_classify_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(tmp: Path, *, regression: bool = False, n_train: int = 256, n_eval: int = 64) -> Path:
    gen = _gen()
    train, held = gen.generate(n_train, n_eval, seed=3, regression=regression)
    gen.write_jsonl(train, tmp / "train.jsonl")
    gen.write_jsonl(held, tmp / "eval.jsonl")
    return tmp


def _recipe(data: Path, out: Path, *, task: str = "classification", model: str = "builtin:micro-llama",
            steps: int = 40, **model_keys) -> dict:
    return {"task": task, "model": {"name": model, **model_keys}, "quantization": {"mode": "none"},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": [{"path": str(data / "train.jsonl"), "format": "classification"}],
                     "eval": [{"path": str(data / "eval.jsonl"), "format": "classification"}], "max_seq_len": 64},
            "train": {"max_steps": steps, "micro_batch_size": 16, "grad_accum": 1, "lr": 3e-3, "log_every": 5,
                      "seed": 7, "warmup_steps": 0},
            "eval": {"metric": "accuracy" if task == "classification" else "mse"},
            "output": {"dir": str(out), "plot": False, "report_to": ["jsonl"]}}


def _sk_classification(y, p, k):
    kw = {"labels": list(range(k)), "zero_division": 0}
    return {"accuracy": sklearn_metrics.accuracy_score(y, p),
            "precision": sklearn_metrics.precision_score(y, p, average="macro", **kw),
            "recall": sklearn_metrics.recall_score(y, p, average="macro", **kw),
            "f1_macro": sklearn_metrics.f1_score(y, p, average="macro", **kw),
            "f1_micro": sklearn_metrics.f1_score(y, p, average="micro", **kw),
            "confusion_matrix": sklearn_metrics.confusion_matrix(y, p, labels=list(range(k))).tolist()}


def _assert_same(ours, theirs):
    for key, value in theirs.items():
        if isinstance(value, list):
            assert ours[key] == value, key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_equal_sklearn_including_unpredicted_and_absent_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g).tolist()
    p = [v if r > 0.4 else (v + 1) % 4 for v, r in zip(y, torch.rand(200, generator=g).tolist())]
    _assert_same(classification_metrics(y, p, 4), _sk_classification(y, p, 4))
    p_skewed = [0 if v == 3 else v for v in p]  # class 3 never predicted; class 4 never present
    _assert_same(classification_metrics(y, p_skewed, 5), _sk_classification(y, p_skewed, 5))
    t, q = torch.randn(50, generator=g).tolist(), torch.randn(50, generator=g).tolist()
    ours = regression_metrics(t, q)
    assert ours["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(t, q), rel=1e-12)
    assert ours["mae"] == pytest.approx(sklearn_metrics.mean_absolute_error(t, q), rel=1e-12)
    assert ours["r2"] == pytest.approx(sklearn_metrics.r2_score(t, q), rel=1e-12)


@pytest.mark.slow
def test_decoder_classifier_learns(tmp_path):
    data = _data(tmp_path)
    trainer = Trainer(recipe_from_dict(_recipe(data, tmp_path / "run")), quiet=True)
    result = trainer.train()
    before, after = result.eval_before, result.eval_after
    assert after["accuracy"] >= 0.55 and after["accuracy"] >= before["accuracy"] + 0.15, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    # the eval metrics are scikit-learn's on the model's own predictions
    logits, labels = predict_batches(trainer.model, trainer.eval_batches())
    preds = logits.argmax(-1).tolist()
    _assert_same({k: after[k] for k in ("accuracy", "precision", "recall", "f1_macro", "f1_micro",
                                        "confusion_matrix")}, _sk_classification(labels, preds, 3))
    assert trainer.data.label_map == {"food": 0, "sport": 1, "weather": 2}


def test_a_resumed_classification_run_ends_exactly_like_an_uninterrupted_one(tmp_path):
    """The head's weights travel in the checkpoint (trainable_modules.safetensors) with its optimizer moments:
    4 steps in one go == 2 steps, a checkpoint, and 2 more after a resume (LoRA, head and losses bit for bit).
    Before, checkpoints held the LoRA weights only and such a resume was refused."""
    data = _data(tmp_path, n_train=24, n_eval=4)
    raw = _recipe(data, tmp_path / "run", steps=4)
    raw["train"].update(micro_batch_size=6, save_every=2, log_every=1, eval_at_start=False)
    raw["adapter"]["dropout"] = 0.1  # the RNG state must be restored too
    whole = Trainer(recipe_from_dict(raw), quiet=True).train()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    ckpt = resumed_dir / "checkpoints" / "step-0000002"
    assert (ckpt / "trainable_modules.safetensors").is_file()
    resumed = Trainer(recipe_from_dict({**raw, "output": {**raw["output"], "dir": str(resumed_dir)},
                                        "resume": str(ckpt)}), quiet=True)
    assert torch.equal(resumed.model.peftlab_head.score.weight, load_file(str(ckpt / "trainable_modules.safetensors"))
                       ["peftlab_head.score.weight"])
    result = resumed.train()
    assert result.losses == whole.losses[2:]
    for name in ("adapter_model.safetensors", "classifier_head.safetensors"):
        a, b = load_file(str(whole.adapter_dir / name)), load_file(str(result.adapter_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_objective_weights_rows_and_counts_rows(tmp_path):
    """Loss = Σ w·ℓ / normaliser over rows; targets are rows, the normaliser their summed weights."""
    data = _data(tmp_path, n_train=32, n_eval=8)
    trainer = Trainer(recipe_from_dict(_recipe(data, tmp_path / "run", steps=1)), quiet=True)
    objective = trainer.objective
    assert isinstance(objective, ClassificationObjective) and objective.task == "classification"
    batch = trainer.batch([0, 1, 2, 3])
    batch["loss_weights"] = torch.tensor([1.0, 2.0, 0.5, 0.0])
    assert objective.targets(batch) == 4 and objective.normalizer(batch) == 3.5
    with torch.no_grad():
        got = objective.loss(trainer.model, batch, normalizer=3.5)
        per_row = torch.nn.functional.cross_entropy(logits_of(trainer.model, batch), batch["labels"], reduction="none")
    torch.testing.assert_close(got, (per_row * batch["loss_weights"]).sum() / 3.5)
    del batch["loss_weights"]
    assert objective.normalizer(batch) == 4.0
    metrics = objective.evaluate(trainer.model, trainer.eval_batches())
    assert metrics["eval_samples"] == len(trainer.data.eval) and "confusion_matrix" in metrics
    assert objective.evaluate(trainer.model, None) == {}


def _tiny_bert(tmp: Path) -> Path:
    from transformers import BertConfig, BertModel

    from peftlab.model.builtin import build_tokenizer

    tok = build_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id or 0)
    torch.manual_seed(0)
    d = tmp / "tiny-bert"
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.slow
def test_encoder_classifier_and_regression(tmp_path):
    bert = _tiny_bert(tmp_path)
    data = _data(_mk(tmp_path / "cls"), n_train=128, n_eval=32)
    raw = _recipe(data, tmp_path / "bert-run", model=str(bert), steps=16)
    raw["train"]["lr"] = 1e-2
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    assert trainer.model.peftlab_head.pooling == "first" and type(trainer.model).__name__ == "BertModel"
    assert trainer.loaded.lora_modules and all(".layer." in n or "pooler" in n for n in trainer.loaded.lora_modules)
    result = trainer.train()
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"], (result.eval_before, result.eval_after)
    assert {"accuracy", "f1_macro", "confusion_matrix"} <= set(result.eval_after)
    loaded, _ = load_classifier(result.adapter_dir)
    a, _ = predict_batches(loaded.model, trainer.eval_batches())
    b, _ = predict_batches(trainer.model, trainer.eval_batches())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # regression on the decoder: numeric labels, one output, MSE equal to scikit-learn's
    rdata = _data(_mk(tmp_path / "reg"), regression=True, n_train=64, n_eval=32)
    rt = Trainer(recipe_from_dict(_recipe(rdata, tmp_path / "reg-run", task="regression", steps=6)), quiet=True)
    res = rt.train()
    logits, labels = predict_batches(rt.model, rt.eval_batches())
    assert res.eval_after["mse"] == pytest.approx(sklearn_metrics.mean_squared_error(labels, logits[:, 0].tolist()),
                                                  rel=1e-6)
    assert res.eval_after["mse"] < res.eval_before["mse"]


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
