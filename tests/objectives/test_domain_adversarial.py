"""DANN: the reversal layer's gradient is exactly -λ x the identity's; λ follows the DANN ramp; the domain head
never receives task labels (its gradients do not move when the task labels change, and target rows carry none);
the micro-batch loss is the documented sum over the step's normaliser; a resumed DANN run ends exactly like an
uninterrupted one (LoRA, head, domain head, losses bit for bit). The measured DANN-vs-source-only effect:
test_dann_beats_source_only_on_the_target_domain."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftlab.data.target_domain import TargetData
from peftlab.model.classifier import HEAD_ATTR, ClassificationHead, head_of
from peftlab.model.domain_head import attach_domain_head, domain_head_of, separate_domain_head_group
from peftlab.objectives.classification import pooled_hidden
from peftlab.objectives.domain_adversarial import (
    DomainAdversarialObjective,
    dann_lambda,
    reverse_gradient,
    token_batch,
)
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer import setup
from peftlab.trainer.loop import Trainer, accumulate_gradients

REPO = Path(__file__).resolve().parents[2]


def _gen():
    spec = importlib.util.spec_from_file_location("make_dann_data", REPO / "recipes" / "make_dann_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dann_recipe(data: Path, out: Path, *, steps: int = 4, seed: int = 7, **dann) -> dict:
    return {"task": "classification", "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"path": str(data / "source_train.jsonl"), "format": "classification"}],
                     "eval": [{"path": str(data / "source_eval.jsonl"), "format": "classification"}],
                     "max_seq_len": 48},
            "dann": {"target": [str(data / "target_train.jsonl")], "target_eval": [str(data / "target_eval.jsonl")],
                     "head": {"hidden_size": 16, "lr": 1e-2}, **dann},
            "train": {"max_steps": steps, "micro_batch_size": 6, "grad_accum": 1, "lr": 3e-3, "log_every": 1,
                      "seed": seed, "warmup_steps": 0, "eval_at_start": False},
            "eval": {"metric": "accuracy"},
            "output": {"dir": str(out), "plot": False, "report_to": ["jsonl"]},
            "guards": {"loss_spike_action": "off"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _gen().write_all(tmp_path_factory.mktemp("dann-data"), n_train=24, n_eval=8, seed=5)


@pytest.fixture(scope="module")
def trainer(data, tmp_path_factory) -> Trainer:
    return Trainer(recipe_from_dict(dann_recipe(data, tmp_path_factory.mktemp("dann-run"))), quiet=True)


def test_the_reversal_gradient_is_minus_lambda_times_the_identitys():
    g = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for lam in (0.0, 0.37, 1.0, 2.5):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = reverse_gradient(a, lam)
        assert torch.equal(y, a)                       # forward: the identity
        (y * upstream).sum().backward()
        (b * upstream).sum().backward()                # the identity's gradient
        assert torch.equal(a.grad, -lam * b.grad)


def test_lambda_follows_the_dann_ramp_or_stays_constant():
    assert dann_lambda(0, 100, schedule="dann", lambda_max=1.0) == 0.0
    assert dann_lambda(50, 100, schedule="dann", lambda_max=0.5) == pytest.approx(0.5 * (2 / (1 + math.exp(-5)) - 1))
    assert dann_lambda(100, 100, schedule="dann", lambda_max=2.0) == pytest.approx(2 * (2 / (1 + math.exp(-10)) - 1))
    assert dann_lambda(3, 100, schedule="constant", lambda_max=0.7) == 0.7


def _grads(model, objective, batch, normalizer):
    model.zero_grad(set_to_none=True)
    objective.loss(model, batch, normalizer=normalizer).backward()
    dom = {n: p.grad.clone() for n, p in domain_head_of(model).named_parameters()}
    task = {n: p.grad.clone() for n, p in head_of(model).named_parameters()}
    model.zero_grad(set_to_none=True)
    return dom, task


def test_the_domain_head_never_receives_task_labels(trainer):
    objective, model = trainer.objective, trainer.model
    assert isinstance(objective, DomainAdversarialObjective)
    # target training rows hold token ids only (target_train.jsonl of this data has no labels; a label in the
    # files would be dropped the same way: tests/data/test_target_domain.py)
    assert all(set(r) == {"input_ids", "sample_id"} for r in objective.target.train)
    objective.begin_step(3, 10)
    batch = trainer.batch([0, 1, 2, 3, 4, 5])
    dom_a, task_a = _grads(model, objective, batch, 6.0)
    flipped = {**batch, "labels": (batch["labels"] + 1) % 3}
    dom_b, task_b = _grads(model, objective, flipped, 6.0)
    assert all(torch.equal(dom_a[k], dom_b[k]) for k in dom_a)          # the domain head: untouched by labels
    assert not torch.equal(task_a["score.weight"], task_b["score.weight"])  # the task head: moved by them


def test_the_loss_is_the_documented_sum_and_accumulates_exactly(trainer):
    objective, model = trainer.objective, trainer.model
    objective.begin_step(2, 10)
    batch = trainer.batch([0, 1, 2, 3, 4, 5])
    batch["loss_weights"] = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0, 1.5])
    assert objective.targets(batch) == 6 and objective.normalizer(batch) == 6.0
    with torch.no_grad():
        got = objective.loss(model, batch, normalizer=4.0)
        target = token_batch([objective.target.train[i] for i in objective.target_rows(batch)], 0, torch.device("cpu"))
        src = pooled_hidden(model, batch)
        tgt = pooled_hidden(model, {**target, "input_ids": target["input_ids"]})
        task = F.cross_entropy(head_of(model)(src), batch["labels"], reduction="none")
        d_src = F.binary_cross_entropy_with_logits(domain_head_of(model)(src), torch.zeros(6), reduction="none")
        d_tgt = F.binary_cross_entropy_with_logits(domain_head_of(model)(tgt), torch.ones(6), reduction="none")
        w = batch["loss_weights"]
        want = ((w * task).sum() + 0.5 * (w * (d_src + d_tgt)).sum()) / 4.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # two micro-batches over the step's normaliser = the step's sum over its normaliser
        halves = [trainer.batch([0, 1, 2]), trainer.batch([3, 4, 5])]
        whole = sum(objective.loss(model, h, normalizer=1.0) for h in halves) / 6.0
        split = sum(objective.loss(model, h, normalizer=6.0) for h in halves)
        torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    # a resumed run draws the same target rows: the draw depends on the seed, the step and the source rows only
    again = objective.target_rows(batch)
    objective.begin_step(3, 10)
    assert objective.target_rows(batch) != again
    objective.begin_step(2, 10)
    assert objective.target_rows(batch) == again


def test_eval_reports_source_target_and_domain_figures(trainer):
    trainer.objective.begin_step(5, 10)
    m = trainer.evaluate()
    for key in ("accuracy", "f1_macro", "target_accuracy", "target_f1_macro", "domain_accuracy", "dann_lambda"):
        assert key in m, key
    assert m["target_samples"] == 8 and 0.0 <= m["domain_accuracy"] <= 1.0
    assert m["dann_lambda"] == pytest.approx(dann_lambda(5, 10, schedule="dann", lambda_max=1.0))


def test_the_adapters_recipe_names_the_target_files_absolutely(data):
    """peftlab_recipe.yaml beside the adapter is used from other directories: relative target paths (relative to
    the recipe file) are stored resolved, like data.train's."""
    raw = dann_recipe(data, data / "run")
    raw["dann"].update(target=["target_train.jsonl"], target_eval=["target_eval.jsonl"])
    resolved = setup.resolved_recipe(recipe_from_dict(raw, base_dir=data), SimpleNamespace(dtype=torch.float32))
    assert [s.path for s in (*resolved.dann.target, *resolved.dann.target_eval)] == [
        str((data / "target_train.jsonl").resolve()), str((data / "target_eval.jsonl").resolve())]


def test_a_resumed_dann_run_ends_exactly_like_an_uninterrupted_one(data, tmp_path):
    raw = dann_recipe(data, tmp_path / "run", steps=4)
    raw["train"]["save_every"] = 2
    whole = Trainer(recipe_from_dict(raw), quiet=True).train()
    adapter = whole.adapter_dir
    assert {"domain_head.safetensors", "domain_head_config.json", "classifier_head.safetensors"} <= {
        p.name for p in adapter.iterdir()}
    assert not [k for k in load_file(str(adapter / "adapter_model.safetensors")) if "peftlab" in k or "score" in k
                or "net." in k]                          # the heads are not in the PEFT file
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    ckpt = resumed_dir / "checkpoints" / "step-0000002"
    result = Trainer(recipe_from_dict({**raw, "output": {**raw["output"], "dir": str(resumed_dir)},
                                       "resume": str(ckpt)}), quiet=True).train()
    assert result.losses == whole.losses[2:]
    for name in ("adapter_model.safetensors", "classifier_head.safetensors", "domain_head.safetensors"):
        a, b = load_file(str(adapter / name)), load_file(str(result.adapter_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert result.eval_after["target_accuracy"] == whole.eval_after["target_accuracy"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["dann_lambda"] for r in train] == [dann_lambda(s, 4, schedule="dann", lambda_max=1.0) for s in (1, 2, 3, 4)]
    assert all(0.0 <= r["domain_accuracy"] <= 1.0 for r in train)


# ---- the effect, measured: DANN vs source-only on the quickstart's generated domains ---------------------


class _BagOfWords(nn.Module):
    """The smallest feature extractor the objective runs on (an encoder's interface: ``last_hidden_state``,
    pooled at the first position): trainable word embeddings averaged, then tanh(linear)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.emb, self.proj = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        pooled = torch.tanh(self.proj((self.emb(input_ids) * m).sum(1) / m.sum(1)))
        return SimpleNamespace(last_hidden_state=pooled.unsqueeze(1))


def _target_accuracy(gen, seed: int, lambda_max: float, steps: int = 200, hidden: int = 32, lr: float = 3e-3) -> float:
    words = sorted({w for d in (gen.SOURCE_WORDS, gen.TARGET_WORDS, gen.CUES) for v in d.values() for w in v}
                   | set(gen.FILLER))
    vocab, labels = {w: i + 1 for i, w in enumerate(words)}, {"food": 0, "sport": 1, "weather": 2}

    def rows(raw):
        return [{"input_ids": [vocab[w] for w in r["text"].split()], "sample_id": i,
                 **({"label": labels[r["label"]]} if "label" in r else {})} for i, r in enumerate(raw)]

    def batch(rs):
        out = token_batch(rs, 0, torch.device("cpu"))
        return {**out, "labels": torch.tensor([r["label"] for r in rs]),
                "sample_ids": torch.tensor([r["sample_id"] for r in rs])}

    source = rows(gen.generate(256, 0, domain="source"))
    target = TargetData(rows(gen.generate(256, 2, domain="target", labelled=False)),
                        rows(gen.generate(128, 3, domain="target")), "dann.target_eval")
    torch.manual_seed(seed)
    model = _BagOfWords(len(vocab) + 1, hidden)
    model.add_module(HEAD_ATTR, ClassificationHead(hidden, 3, pooling="first", task="classification",
                                                   labels=sorted(labels)))
    attach_domain_head(model, hidden, 16, lr=lr)
    objective = DomainAdversarialObjective(task="classification", label_map=labels, target=target, pad_token_id=0,
                                           seed=seed, lambda_max=lambda_max)
    opt = torch.optim.AdamW(separate_domain_head_group(model, [{"params": list(model.parameters())}], lr), lr=lr)
    order = random.Random(seed)
    for step in range(1, steps + 1):
        objective.begin_step(step, steps)
        accumulate_gradients(model, [batch(order.sample(source, 16))], objective)
        opt.step()
        opt.zero_grad()
    return objective.evaluate(model, [batch(rows(gen.generate(128, 1, domain="source")))])["target_accuracy"]


def test_dann_beats_source_only_on_the_target_domain():
    """On the DANN quickstart's domains (recipes/make_dann_data.py: source and target name the topics with
    different words; shared cue words, loose in the source, reliable in the target), DANN's mean target accuracy
    over seeds 1-3 beats source-only (λ = 0: the same objective, nothing reversed into the features) by >= 0.05.

    A transformer run that shows it takes minutes on a CPU, so this runs the real objective (pairing, gradient
    reversal, domain head in its own optimizer group, the loop's accumulate_gradients, evaluate) on the smallest
    feature extractor: trainable word embeddings averaged (hidden 32), 200 steps of 16 source rows, AdamW 3e-3.
    Measured (DANN vs source-only target accuracy): seed 1 0.359 vs 0.430, seed 2 0.727 vs 0.492, seed 3 0.711 vs
    0.547 — mean +0.109 (seed 1 loses: DANN is not a free win on every seed). On the micro-llama quickstart itself
    (160 steps, LoRA r=8): README, section "Domain-adversarial adaptation (DANN)"."""
    gen = _gen()
    gains = [_target_accuracy(gen, s, 1.0) - _target_accuracy(gen, s, 0.0) for s in (1, 2, 3)]
    assert sum(gains) / 3 >= 0.05, gains
