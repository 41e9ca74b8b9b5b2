"""``peftlab train | data | estimate`` (peftlab/cli/training.py): a trained run's files, the data preview with
its trained spans, and the estimate printed as a report or as JSON with the exit status saying whether it fits."""
from __future__ import annotations

import json

import pytest
import yaml

from peftlab.cli.main import main
from peftlab.engine import planner

pytestmark = pytest.mark.xdist_group("cli")


def test_train_writes_the_adapter_and_its_recipe(trained):
    _, adapter = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "peftlab_recipe.yaml"} <= {
        p.name for p in adapter.iterdir()}
    stored = yaml.safe_load((adapter / "peftlab_recipe.yaml").read_text())
    assert stored["model"]["dtype"] == "float32"  # `auto` resolved to what training used
    assert stored["train"]["max_steps"] == 3
    rows = [json.loads(line) for line in (adapter.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]


def test_quiet_says_nothing_but_warnings_and_the_default_says_how_it_goes(trained, capsys, tmp_path):
    recipe, _ = trained
    short = ["--set", "train.max_steps=1", "--set", "eval.metric=loss"]
    assert main(["train", str(recipe), "--quiet", "--set", f"output.dir={tmp_path / 'quiet'}", *short]) == 0
    assert capsys.readouterr().out == ""
    assert main(["train", str(recipe), "--set", f"output.dir={tmp_path / 'loud'}", *short]) == 0
    out = capsys.readouterr().out
    assert out.startswith("peftlab: builtin:micro-llama on cpu")
    assert f"adapter (PEFT format): {tmp_path / 'loud' / 'adapter'}" in out


def test_data_preview_marks_trained_spans(trained, capsys):
    recipe, _ = trained
    assert main(["data", str(recipe), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("(trained tokens are inside [[...]])\n--- sample 0 (train, ")
    assert out.count("--- sample") == 2 and "<|eot_id|>]]" in out
    assert "\ntrain: 32 samples, " in out and "eval: 8 samples; max_seq_len 64" in out


def test_estimate_report_json_and_exit_status(trained, capsys, monkeypatch):
    recipe, _ = trained
    monkeypatch.setattr(planner, "_probe_baseline", lambda recipe: 300 * planner.MiB)  # no measuring subprocess
    assert main(["estimate", str(recipe), "--device", "cpu", "--device-memory", "100MiB", "--json"]) == 1
    est = json.loads(capsys.readouterr().out)
    assert est["fits"] is False and est["budget"] == 100 * planner.MiB and est["device"] == "cpu"
    assert est["total"] == sum(est["components"].values()) and est["components"]["baseline"] == 300 * planner.MiB
    assert main(["estimate", str(recipe), "--device", "cpu", "--device-memory", "64GiB", "--gpus", "2"]) == 0
    report = capsys.readouterr().out
    assert report.startswith("predicted peak host RSS (CPU) per rank, micro_batch_size=4 seq_len=64:\n  baseline")
    assert "per rank with 2 rank(s):" in report and "budget 64.00 GiB: fits" in report


def test_data_preview_shows_the_augmented_inputs_of_the_first_epochs(trained, capsys):
    recipe, _ = trained
    assert main(["data", str(recipe), "-n", "1", "--set", "augment.word_swap=0.5", "--set", "augment.char_noise=0.3"]) == 0
    out = capsys.readouterr().out
    assert "\naugmented training inputs (word_swap=0.5, char_noise=0.3); eval data is never augmented\n" in out
    shown = [out.split(f"--- row 0, {tag}\n")[1].split("\n---")[0] for tag in ("as tokenized", "epoch 0", "epoch 1")]
    assert len(set(shown)) == 3  # the row as cached, and a different augmentation per epoch
    assert len({s[s.index("[["):s.index("]]") + 2] for s in shown}) == 1  # the answer (trained tokens): unchanged
