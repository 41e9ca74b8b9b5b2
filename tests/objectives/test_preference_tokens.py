"""tokens_seen of a preference run counts the answer tokens it trained (chosen + rejected; KTO: its completions),
not pairs — counted here from the tokenized rows themselves — and a resumed run continues that count exactly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import short_run_recipe

from peftlab.objectives.objective import CausalLMObjective, trained_tokens
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
PAIRS = [{"prompt": [U(q)], "chosen": [AS(good)], "rejected": [AS(bad)]} for q, good, bad in [
    ("What is 2 + 3?", "5.", "It is 6, I think"), ("Letter after c?", "d.", "e"),
    ("Largest of: 1 7 3", "7.", "3 or maybe 1"), ("First of: a b c", "a.", "b"),
    ("What is 4 + 4?", "8.", "9"), ("Letter before q?", "p.", "r, surely"),
    ("Count of: x y", "2.", "3"), ("Last of: 5 6 9 2", "2.", "9 is the last one")]]


def answer_tokens(row: dict, keys: tuple[str, ...]) -> int:
    """Labelled (trained) tokens of a tokenized preference row, read from its label lists."""
    return sum(sum(1 for t in row[k] if t != -100) for k in keys)


def preference_trainer(data, out, method: str, **kw) -> Trainer:
    raw = short_run_recipe(data, out, train={"max_steps": None, "epochs": 1, "save_every": 1},
                           preference={"method": method, "beta": 0.5}, **kw)
    raw["data"]["train"][0].pop("format")
    raw["data"].pop("eval")
    return Trainer(recipe_from_dict(raw), quiet=True)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_tokens_seen_of_a_preference_run_is_its_answer_tokens(tmp_path, method):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    trainer = preference_trainer(data, tmp_path / "run", method)
    result = trainer.train()
    rows = trainer.data.train  # one epoch: every row trained once
    keys = ("completion_labels",) if method == "kto" else ("chosen_labels", "rejected_labels")
    want = sum(answer_tokens(r, keys) for r in rows)
    assert len(rows) == (16 if method == "kto" else 8) and want > 3 * len(rows)
    assert result.state.tokens_seen == want
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tokens_seen"] == want
    if method == "kto":
        return
    resumed = tmp_path / "resumed"  # from the checkpoint after step 1 of 2: the count continues exactly
    shutil.copytree(tmp_path / "run", resumed)
    again = preference_trainer(data, resumed, method, resume=str(resumed / "checkpoints" / "step-0000001"),
                               output={"overwrite": True})
    assert 0 < again.state.tokens_seen < want
    assert again.train().state.tokens_seen == want


def test_objectives_whose_targets_are_tokens_count_their_targets():
    batch = {"labels": torch.tensor([[-100, 5, 6, -100]])}
    assert trained_tokens(CausalLMObjective(), [batch, batch], 7) == 7  # the step's (all-reduced) targets
