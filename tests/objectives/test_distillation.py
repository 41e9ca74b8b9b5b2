"""Distillation: the trainer's KD loss against a direct full-logit PyTorch computation, online vs
offline (k = V) parity, a run that moves the student towards the teacher, and the user errors
(vocabulary mismatch, missing/corrupt teacher cache)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.errors import PeftlabError
from peftlab.objectives.causal_lm import count_targets, shifted_labels
from peftlab.objectives.distillation import (
    OfflineDistillLoss,
    OnlineDistillLoss,
    build_distill_loss,
    teacher_kl,
)
from peftlab.objectives.teacher_cache import TeacherCache, build_teacher_cache
from peftlab.recipe.schema import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("distill")

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("kd-data"), n_train=48, n_eval=16)


@pytest.fixture(scope="module")
def teacher_adapter(tmp_path_factory):
    """A teacher that differs from the student's base: micro-llama + a seeded random LoRA adapter."""
    from peftlab.adapters.lora_inject import inject_lora, lora_modules
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.model.load import load_base_model

    model = load_base_model("builtin:micro-llama", dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("teacher") / "adapter"
    save_adapter(model, out, base_model_name_or_path="builtin:micro-llama")
    return out


def distill_recipe(data_dir, out_dir, teacher_adapter, **distill):
    raw = tiny_recipe_dict(data_dir, out_dir)
    raw["distill"] = {"teacher": {"name": "builtin:micro-llama", "adapter": str(teacher_adapter),
                                  "quantization": {"mode": "none"}},
                      "alpha": 0.3, "temperature": 2.0, **distill}
    return recipe_from_dict(raw)


@pytest.fixture(scope="module")
def trainer(data_dir, teacher_adapter, tmp_path_factory):
    recipe = distill_recipe(data_dir, tmp_path_factory.mktemp("kd-run"), teacher_adapter)
    return Trainer(recipe, quiet=True)


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
    assert isinstance(trainer.loss_fn, OnlineDistillLoss)
    fn = trainer.loss_fn
    if kind != "forward_kl":
        fn = OnlineDistillLoss(fn.teacher, kind=kind, beta=beta, temperature=2.0, alpha=0.3)
    batch = trainer.batch([0, 5, 9, 11])
    normalizer = count_targets(batch) + 3.0
    model = trainer.model
    got, got_grads = loss_and_grads(model, fn, batch, normalizer, trainer.settings)

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_logits = fn.teacher.model(**inputs).logits

    def direct(m, b, *, normalizer, settings):
        return ground_truth(m(**inputs).logits, t_logits, shifted_labels(b["labels"]), kind=kind, beta=beta,
                            temperature=2.0, alpha=0.3, normalizer=normalizer)

    want, want_grads = loss_and_grads(model, direct, batch, normalizer, trainer.settings)
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(got_grads, want_grads)


def test_online_and_offline_full_vocab_give_the_same_loss_and_grads(trainer, tmp_path):
    """A cache with k = vocabulary rows (fp32) reproduces the online loss and gradients, for plain and
    packed batches (one cache serves both)."""
    from peftlab.data import collate
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
    online = trainer.loss_fn

    plain = trainer.batch([1, 2, 3, 40])
    packed = collate(pack([trainer.data.train[i] for i in range(8)], capacity=160), pad_token_id=trainer.pad_id)
    assert packed["sample_ids"].shape[1] > 1  # really packed
    for batch in (plain, packed):
        n = count_targets(batch)
        a, ga = loss_and_grads(trainer.model, online, batch, n, trainer.settings)
        b, gb = loss_and_grads(trainer.model, offline, batch, n, trainer.settings)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert_grads_close(gb, ga)

    # a smaller top_k reads the first columns of the same cache; it is a different (truncated) loss
    recipe.distill.top_k = 8
    small = build_distill_loss(recipe, trainer.loaded)
    assert small.cache.k == 8
    c, _ = loss_and_grads(trainer.model, small, plain, count_targets(plain), trainer.settings)
    assert torch.isfinite(c) and not torch.allclose(c, a)

    # the build is skipped when nothing changed
    mtime = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    build_teacher_cache(recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"top_k": v})}),
                        quiet=True)
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_distillation_run_lowers_kl_to_the_teacher_on_held_out_data(data_dir, teacher_adapter, tmp_path):
    recipe = distill_recipe(data_dir, tmp_path / "run", teacher_adapter, alpha=0.0, temperature=1.0)
    recipe.train.max_steps, recipe.train.grad_accum, recipe.train.lr = 12, 1, 1e-2
    recipe.train.eval_at_start = False
    recipe.output.plot, recipe.output.report_to = False, ["jsonl"]
    t = Trainer(recipe, quiet=True)
    held_out = t.eval_batches()
    before = teacher_kl(t.model, t.loss_fn.teacher.model, held_out)
    result = t.train()
    after = teacher_kl(t.model, t.loss_fn.teacher.model, held_out)
    assert after < 0.7 * before, (before, after)
    # pure distillation (alpha=0): the logged training loss is T²·KL on the training tokens and falls too
    assert sum(result.losses[-3:]) < sum(result.losses[:3]), result.losses


# ---- user errors ------------------------------------------------------------------------------------


def other_vocab_model(tmp_path):
    """micro-llama's weights with one extra token in its tokenizer: same head size, different vocab."""
    from peftlab.model.load import resolve_model_path

    d = tmp_path / "other-vocab"
    shutil.copytree(resolve_model_path("builtin:micro-llama"), d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(d)
    return d


def test_vocabulary_mismatch_is_a_clear_error_online_and_offline(trainer, tmp_path):
    from transformers import AutoTokenizer

    other = other_vocab_model(tmp_path)
    recipe = trainer.recipe.model_copy(deep=True)
    recipe.distill.teacher.name, recipe.distill.teacher.adapter = str(other), None
    with pytest.raises(PeftlabError) as err:
        build_distill_loss(recipe, trainer.loaded)
    msg = str(err.value)
    assert "do not share a vocabulary" in msg and str(other) in msg and "builtin:micro-llama" in msg
    assert "'<|extra|>'" in msg

    # offline: a cache written for another vocabulary is refused when training opens it
    recipe.distill.mode, recipe.distill.top_k = "offline", 4
    recipe.distill.cache_dir = str(tmp_path / "cache")
    build_teacher_cache(trainer.recipe.model_copy(update={"distill": recipe.distill.model_copy(update={
        "teacher": trainer.recipe.distill.teacher})}), quiet=True)
    with pytest.raises(PeftlabError, match="differs from the student model.name '.*other-vocab'"):
        TeacherCache.open(tmp_path / "cache", student_tokenizer=AutoTokenizer.from_pretrained(other),
                          student=str(other))


def test_missing_and_corrupt_teacher_cache_are_clear_errors(trainer, tmp_path, capsys):
    from peftlab.cli.main import main

    recipe = trainer.recipe.model_copy(deep=True)
    recipe.distill.mode, recipe.distill.top_k = "offline", 4
    recipe.distill.cache_dir = str(tmp_path / "cache")
    with pytest.raises(PeftlabError, match=r"no teacher cache at .*cache.*peftlab distill-cache RECIPE"):
        build_distill_loss(recipe, trainer.loaded)

    yaml_path = tmp_path / "recipe.yaml"  # JSON is YAML
    yaml_path.write_text(json.dumps(recipe.to_dict()))
    assert main(["distill-cache", str(yaml_path), "--quiet"]) == 0
    batch = trainer.batch([0, 1])
    cache = tmp_path / "cache"
    good = TeacherCache.open(cache)
    lp, _ = good.lookup(batch)
    assert lp.shape == (*batch["labels"].shape, 4) and bool((lp <= 0).all())

    def broken(edit):
        d = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cache, d)
        edit(d)
        return d

    manifest = json.loads((cache / "manifest.json").read_text())
    shard = cache / manifest["shards"][0]["file"]
    raw = shard.read_bytes()
    cases = [
        (lambda d: (d / "manifest.json").write_text('{"format": "peftlab-teacher'), "manifest.json is corrupt"),
        (lambda d: (d / shard.name).unlink(), f"shard {shard.name} is missing"),
        (lambda d: (d / shard.name).write_bytes(raw[:-7] + b"garbage"), "is corrupt \\(size or sha256"),
    ]
    for edit, pattern in cases:
        with pytest.raises(PeftlabError, match=pattern):
            TeacherCache.open(broken(edit)).lookup(batch)

    def other_data(d):
        m = json.loads((d / "manifest.json").read_text())
        sid = str(int(batch["sample_ids"][0]))
        m["samples"][sid][3] = "0" * 16
        (d / "manifest.json").write_text(json.dumps(m))

    with pytest.raises(PeftlabError, match="does not match the training data: sample id"):
        TeacherCache.open(broken(other_data)).lookup(batch)

    # the CLI reports a missing cache as one message and exit status 2
    raw_recipe = trainer.recipe.to_dict()
    raw_recipe["distill"].update(mode="offline", cache_dir=str(tmp_path / "nowhere"))
    yaml_path.write_text(json.dumps(raw_recipe))
    assert main(["train", str(yaml_path), "--quiet"]) == 2
    assert "no teacher cache at" in capsys.readouterr().err


def test_distill_recipe_section_is_typed(data_dir, tmp_path):
    raw = tiny_recipe_dict(data_dir, tmp_path)
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
