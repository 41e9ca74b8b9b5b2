"""Distillation: the trainer's objective and its KD loss against a direct full-logit PyTorch computation, online
vs offline (k = V) parity, a run that moves the student towards the teacher, the typed recipe section.
(The teacher and its vocabulary checks: test_teacher.py; the offline cache: test_teacher_cache.py.)"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_recipe_dict

from peftlab.errors import PeftlabError
from peftlab.objectives.causal_lm import count_targets, loss_normalizer, shifted_labels
from peftlab.objectives.distillation import (
    DistillationObjective,
    OfflineDistillLoss,
    OnlineDistillLoss,
    build_distill_loss,
    teacher_kl,
)
from peftlab.objectives.teacher_cache import build_teacher_cache
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("distill")

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


@pytest.fixture
def trainer(kd_trainer):
    return kd_trainer


def ground_truth(s_logits, t_logits, labels, *, kind, beta, temperature, alpha, normalizer):
    """α·CE + (1−α)·T²·D on whole fp32 logits, written out from the definitions."""
    s, t = s_logits.float().flatten(0, 1), t_logits.float().flatten(0, 1)
    y = labels.flatten()
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]
    ce = -F.log_softmax(s, -1).gather(1, y[:, None]).squeeze(1)
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if kind == "forward_kl":
        d = (pt * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        d = (ps * (log_ps - log_pt)).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * (pt * (log_pt - m.log())).sum(-1) + (1 - beta) * (ps * (log_ps - m.log())).sum(-1)
    return (alpha * ce + (1 - alpha) * temperature**2 * d).sum() / normalizer


def loss_and_grads(model, fn, batch, normalizer, settings):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch, normalizer=normalizer, settings=settings)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_grads_close(got, want):
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_trainer_kd_loss_equals_direct_pytorch(trainer, kind, beta):
    """The trainer's loss (fused linear KD over hidden states) == α·CE + (1−α)·T²·D on whole logits,
    value and LoRA gradients through the real 4-bit student."""
    objective = trainer.objective
    assert isinstance(objective, DistillationObjective) and isinstance(objective.kd, OnlineDistillLoss)
    assert objective.teacher is objective.kd.teacher and objective.settings == trainer.objective.settings
    fn = objective.kd
    if kind != "forward_kl":
        fn = OnlineDistillLoss(fn.teacher, kind=kind, beta=beta, temperature=2.0, alpha=0.3)
    batch = trainer.batch([0, 5, 9, 11])
    normalizer = count_targets(batch) + 3.0
    model = trainer.model
    got, got_grads = loss_and_grads(model, fn, batch, normalizer, trainer.objective.settings)

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_logits = fn.teacher.model(**inputs).logits

    def direct(m, b, *, normalizer, settings):
        return ground_truth(m(**inputs).logits, t_logits, shifted_labels(b["labels"]), kind=kind, beta=beta,
                            temperature=2.0, alpha=0.3, normalizer=normalizer)

    want, want_grads = loss_and_grads(model, direct, batch, normalizer, trainer.objective.settings)
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(got_grads, want_grads)


def test_online_and_offline_full_vocab_give_the_same_loss_and_grads(trainer, tmp_path):
    """A cache with k = vocabulary rows (fp32) reproduces the online loss and gradients, for plain and
    packed batches (one cache serves both)."""
    from peftlab.data.collate import collate
    from peftlab.data.packing import pack

    v = trainer.model.get_output_embeddings().weight.shape[0]
    recipe = trainer.recipe.model_copy(deep=True)
    recipe.distill.mode, recipe.distill.top_k, recipe.distill.cache_dtype = "offline", v, "float32"
    recipe.distill.cache_dir = str(tmp_path / "cache")
    build_teacher_cache(recipe, quiet=True)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["top_k"] == v and manifest["n_samples"] == len(trainer.data.train)
    assert manifest["rows"] == sum(count_targets(trainer.batch([i])) for i in range(len(trainer.data.train)))
    offline = build_distill_loss(recipe, trainer.loaded)
    assert isinstance(offline, OfflineDistillLoss)
    online = trainer.objective.kd

    plain = trainer.batch([1, 2, 3, 40])
    packed = collate(pack([trainer.data.train[i] for i in range(8)], capacity=160), pad_token_id=trainer.data.pad_token_id)
    assert packed["sample_ids"].shape[1] > 1  # really packed
    for batch in (plain, packed):
        n = count_targets(batch)
        a, ga = loss_and_grads(trainer.model, online, batch, n, trainer.objective.settings)
        b, gb = loss_and_grads(trainer.model, offline, batch, n, trainer.objective.settings)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert_grads_close(gb, ga)

    # a smaller top_k reads the first columns of the same cache; it is a different (truncated) loss
    recipe.distill.top_k = 8
    small = build_distill_loss(recipe, trainer.loaded)
    assert small.cache.k == 8
    c, _ = loss_and_grads(trainer.model, small, plain, count_targets(plain), trainer.objective.settings)
    assert torch.isfinite(c) and not torch.allclose(c, a)

    # the build is skipped when nothing changed
    mtime = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    build_teacher_cache(recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"top_k": v})}),
                        quiet=True)
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_distillation_run_lowers_kl_to_the_teacher_on_held_out_data(kd_data, kd_recipe, teacher_adapter, tmp_path):
    recipe = kd_recipe(kd_data, tmp_path / "run", teacher_adapter, alpha=0.0, temperature=1.0)
    recipe.train.max_steps, recipe.train.grad_accum, recipe.train.lr = 12, 1, 1e-2
    recipe.train.eval_at_start = False
    recipe.output.plot, recipe.output.report_to = False, ["jsonl"]
    t = Trainer(recipe, quiet=True)
    held_out = t.eval_batches()
    before = teacher_kl(t.model, t.objective.teacher.model, held_out)
    result = t.train()
    after = teacher_kl(t.model, t.objective.teacher.model, held_out)
    assert after < 0.7 * before, (before, after)
    # pure distillation (alpha=0): the logged training loss is T²·KL on the training tokens and falls too
    assert sum(result.losses[-3:]) < sum(result.losses[:3]), result.losses


def test_the_objective_counts_like_plain_fine_tuning_and_evaluates_without_the_teacher(trainer):
    """Targets and normaliser are the trained tokens (so mixed runs compare), eval is held-out CE + answers."""
    objective = trainer.objective
    batch = trainer.batch([0, 1, 2])
    batch["loss_weights"] = torch.full(batch["input_ids"].shape, 2.0)
    assert objective.targets(batch) == count_targets(batch) and objective.normalizer(batch) == loss_normalizer(batch)
    assert objective.normalizer(batch) == 2 * count_targets(batch)
    metrics = objective.evaluate(trainer.model, trainer.eval_batches())
    assert {"eval_loss", "perplexity", "eval_tokens"} <= set(metrics)
    objective.save(trainer.model, trainer.out_dir / "nothing")  # no files of its own
    assert not (trainer.out_dir / "nothing").exists()


def test_distill_recipe_section_is_typed(kd_data, tmp_path):
    raw = tiny_recipe_dict(kd_data, tmp_path)
    raw["distill"] = {"teacher": "builtin:tiny-llama", "top_k": 32, "mode": "offline"}
    r = recipe_from_dict(raw)
    assert r.distill.teacher.name == "builtin:tiny-llama" and r.distill.kind == "forward_kl"
    assert (r.distill.alpha, r.distill.temperature, r.distill.beta) == (0.5, 1.0, 0.5)
    raw["distill"] = {"teacher": {"adapter": None}}
    with pytest.raises(PeftlabError, match="distill.teacher needs a name"):
        recipe_from_dict(raw)
    raw["distill"] = {"teacher": "x", "temprature": 2.0}
    with pytest.raises(PeftlabError, match="did you mean 'distill.temperature'"):
        recipe_from_dict(raw)
    raw["distill"] = {"teacher": "x", "alpha": 1.5}
    with pytest.raises(PeftlabError, match="distill.alpha"):
        recipe_from_dict(raw)
