"""The causal-LM loss: position t is trained to predict token t+1 (targets counted after the shift), the fused
loss over hidden states + head equals cross-entropy over whole fp32 logits (label smoothing, z-loss, per-token
weights; summed and divided by the given normaliser), with the model's own path (kernels: off) too; the eval
loss is the token mean. (Gemma-2's soft-capping: tests/model/test_gemma2.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.model.load import load_base_model
from peftlab.objectives.causal_lm import (
    IGNORE_INDEX,
    LossSettings,
    causal_lm_loss,
    count_targets,
    eval_loss,
    final_hidden_states,
    loss_normalizer,
    output_head,
    shifted_labels,
)


@pytest.fixture(scope="module")
def model():
    return load_base_model("builtin:micro-llama", dtype=torch.float32, device=torch.device("cpu")).eval()


def _batch(weights: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 200, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the prompt is not trained
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if weights:
        batch["loss_weights"] = torch.tensor([1.0, 2.0, 0.5])[:, None].expand(3, 10).clone()
    return batch


def _reference(model, batch, *, label_smoothing=0.0, z_loss=0.0, normalizer=1.0) -> torch.Tensor:
    """Σ over targets of (weighted) fp32 cross-entropy on whole logits, / normalizer — written out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = shifted_labels(batch["labels"])
    keep = labels != IGNORE_INDEX
    logp = F.log_softmax(logits, -1)[keep]
    y = labels[keep]
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    loss = loss + z_loss * torch.logsumexp(logits[keep], -1).square()
    if "loss_weights" in batch:
        loss = loss * F.pad(batch["loss_weights"][:, 1:], (0, 1))[keep]
    return loss.sum() / normalizer


def test_targets_are_counted_after_the_shift():
    labels = torch.tensor([[5, 6, -100, 8], [-100, -100, 7, 9]])
    assert shifted_labels(labels).tolist() == [[6, -100, 8, -100], [-100, 7, 9, -100]]
    batch = {"labels": labels}
    assert count_targets(batch) == 4 and loss_normalizer(batch) == 4.0
    batch["loss_weights"] = torch.tensor([[9.0, 1.0, 1.0, 3.0], [0.0, 2.0, 2.0, 2.0]])
    assert loss_normalizer(batch) == 1.0 + 3.0 + 2.0 + 2.0  # the weights of the shifted targets


@pytest.mark.parametrize("backend", ["torch", "off"])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_loss_equals_cross_entropy_on_whole_logits(model, backend, kw):
    for weights in (False, True):
        batch = _batch(weights)
        n = loss_normalizer(batch) + 1.5
        with torch.no_grad():
            got = causal_lm_loss(model, batch, normalizer=n, settings=LossSettings(backend, **kw))
            want = _reference(model, batch, normalizer=n, **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_eval_loss_is_the_token_mean(model):
    batches = [_batch(), {k: v[:1] for k, v in _batch().items()}]
    with torch.no_grad():
        total = sum(float(_reference(model, b)) for b in batches)
    n = sum(count_targets(b) for b in batches)
    loss, tokens = eval_loss(model, batches + [{**_batch(), "labels": torch.full((3, 10), IGNORE_INDEX)}],
                             settings=LossSettings("torch"))
    assert tokens == n and loss == pytest.approx(total / n, rel=1e-5)


def test_hidden_states_and_head_are_the_models_own(model):
    batch = _batch()
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(output_head(model)(hidden), logits, rtol=1e-5, atol=1e-5)

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(TypeError, match="NoHead has no linear output head; the fused loss needs one"):
        output_head(NoHead())


def test_settings_from_the_recipe():
    from types import SimpleNamespace

    from peftlab.errors import PeftlabError

    recipe = SimpleNamespace(kernels="torch", train=SimpleNamespace(loss=SimpleNamespace(
        softcap=None, label_smoothing=0.05, z_loss=0.0)))
    assert LossSettings.from_recipe(recipe) == LossSettings("torch", 0.05, 0.0, None)
    capped = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
    assert LossSettings.from_recipe(recipe, capped) == LossSettings("torch", 0.05, 0.0, 30.0, model_softcaps=True)
    recipe.train.loss.softcap = 20.0
    with pytest.raises(PeftlabError, match="train.loss.softcap=20.0: the model already caps its logits at 30.0"):
        LossSettings.from_recipe(recipe, capped)
