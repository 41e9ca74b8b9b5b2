"""A classification / regression run refuses ``train.loss`` settings its head's loss does not apply (soft-cap,
label smoothing, z-loss) instead of silently training without them; a model's own logit soft-cap (Gemma-2's
``final_logit_softcapping``) belongs to its LM head and is not applied to the classifier head, as in
transformers' ``Gemma2ForSequenceClassification``."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer
from peftlab.model.classifier import attach_head, head_of
from peftlab.objectives.causal_lm import final_hidden_states
from peftlab.objectives.classification import classification_loss, logits_of
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

ROWS = [{"text": f"row {i} about {topic}", "label": topic} for i, topic in enumerate(["food", "sport"] * 4)]


def recipe(tmp_path, task: str = "classification", **loss):
    rows = ROWS if task == "classification" else [{**r, "label": float(i)} for i, r in enumerate(ROWS)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return recipe_from_dict({
        "task": task, "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
        "data": {"train": [{"path": str(tmp_path / "train.jsonl"), "format": "classification"}]},
        "train": {"max_steps": 1, "micro_batch_size": 4, "eval_at_start": False, "loss": loss},
        "output": {"dir": str(tmp_path / "out"), "plot": False, "report_to": ["jsonl"]}})


@pytest.mark.parametrize("task, loss, named", [
    ("classification", {"softcap": 30.0}, "train.loss.softcap=30.0"),
    ("classification", {"label_smoothing": 0.1, "z_loss": 0.001},
     "train.loss.label_smoothing=0.1, train.loss.z_loss=0.001"),
    ("regression", {"softcap": 5.0}, "train.loss.softcap=5.0")])
def test_loss_settings_the_head_ignores_are_refused(tmp_path, task, loss, named):
    """Refused when the recipe is read (so `peftlab validate` / `estimate` say it too), before anything loads."""
    with pytest.raises(PeftlabError) as err:
        recipe(tmp_path, task, **loss)
    assert (f"{named} with task: {task}: these shape a language model's token logits, and the classification "
            "head's loss does not apply them (the run would train without them). Remove them from train.loss"
            ) in str(err.value)
    Trainer(recipe(tmp_path, task), quiet=True)  # none set: accepted


def test_a_models_own_logit_softcap_is_not_applied_to_the_classifier_head():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = build_tokenizer()
    cap = 0.5
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                       final_logit_softcapping=cap, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).float()
    attach_head(model, SimpleNamespace(task="classification", label_map={"food": 0, "sport": 1}),
                SimpleNamespace(task="classification"))
    with torch.no_grad():
        head_of(model).score.weight.mul_(500.0)  # logits far beyond the model's cap
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, tok.pad_token_id]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": torch.tensor([0, 1])}
    hidden = final_hidden_states(model, batch)
    uncapped = head_of(model)(hidden[torch.arange(2), torch.tensor([3, 2])])
    assert uncapped.abs().max() > 4 * cap
    assert torch.equal(logits_of(model, batch), uncapped)
    loss = classification_loss(model, batch, normalizer=2.0)
    assert torch.allclose(loss, F.cross_entropy(uncapped, batch["labels"]))
