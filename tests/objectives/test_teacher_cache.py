"""The offline teacher cache: written once (atomically, skipped when up to date), read by sample id and checked
against the batch; a missing, corrupt or mismatched cache (other data, other vocabulary) is one clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_teacher import other_vocab_model

from peftlab.errors import PeftlabError
from peftlab.objectives.distillation import build_distill_loss
from peftlab.objectives.teacher_cache import TeacherCache, batch_segments, build_teacher_cache, sample_key

pytestmark = pytest.mark.xdist_group("distill")


def test_a_cache_of_another_vocabulary_is_refused(kd_trainer, tmp_path):
    from transformers import AutoTokenizer

    other = other_vocab_model(tmp_path)
    recipe = kd_trainer.recipe.model_copy(deep=True)
    recipe.distill.mode, recipe.distill.top_k, recipe.distill.cache_dir = "offline", 4, str(tmp_path / "cache")
    build_teacher_cache(recipe, quiet=True)
    with pytest.raises(PeftlabError, match="differs from the student model.name '.*other-vocab'"):
        TeacherCache.open(tmp_path / "cache", student_tokenizer=AutoTokenizer.from_pretrained(other),
                          student=str(other))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_samples_are_found_in_plain_and_packed_batches():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    labels = torch.tensor([[-100, 6, 7, -100, 9, 1]])
    plain = {"input_ids": ids, "labels": labels, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
             "sample_ids": torch.tensor([4])}
    assert batch_segments(plain) == [[(4, 0, 5)]]
    packed = {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
              "sample_ids": torch.tensor([[4, 2, -1]])}
    assert batch_segments(packed) == [[(4, 0, 3), (2, 3, 5)]]
    assert sample_key(ids[0, 3:5].numpy(), labels[0, 3:5].numpy()) != sample_key(ids[0, 3:5].numpy(),
                                                                                 labels[0, :2].numpy())
    with pytest.raises(PeftlabError, match="needs the batch's sample_ids"):
        batch_segments({"input_ids": ids, "labels": labels})


def test_missing_and_corrupt_teacher_cache_are_clear_errors(kd_trainer, tmp_path, capsys):
    trainer = kd_trainer
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


