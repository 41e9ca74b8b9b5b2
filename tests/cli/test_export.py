"""``peftlab merge | export`` (peftlab/cli/export.py): how flags and a --config file become one combination,
what is printed (the result and where it is) and logged (notes), and the argument mistakes refused before any
work. The merge, combination and export themselves are tested in tests/export/."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from peftlab.cli.main import main
from peftlab.export import combine, peft
from peftlab.export.combine import CombineResult
from peftlab.export.peft import PeftExportResult


@pytest.fixture
def combined(monkeypatch, tmp_path):
    """combine_adapters replaced by a recorder: the keyword arguments the CLI assembled."""
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        return CombineResult(out_dir=Path(kwargs["out_dir"]), method=kwargs.get("method", "linear"), rank=8,
                             modules=14)

    monkeypatch.setattr(combine, "combine_adapters", record)
    return calls


def test_flags_make_a_combination_and_the_result_is_printed(combined, capsys, tmp_path):
    assert main(["merge", "--adapters", "a", "b", "--out", str(tmp_path / "ab"), "--method", "ties",
                 "--density", "0.5"]) == 0
    assert combined == [{"adapters": ["a", "b"], "method": "ties", "density": 0.5, "out_dir": str(tmp_path / "ab"),
                         "weights": [1.0, 1.0], "overwrite": False}]
    assert capsys.readouterr().out == f"combined 2 adapters (ties, r=8, 14 modules) -> {tmp_path / 'ab'}\n"


def test_flags_win_over_the_config_file(combined, tmp_path):
    cfg = tmp_path / "combine.yaml"
    cfg.write_text(yaml.safe_dump({"method": "dare_linear", "density": 0.3, "seed": 5, "out": "from-config",
                                   "adapters": [{"path": "x", "weight": 0.7}, {"path": "y", "weight": 0.3}]}))
    assert main(["merge", "--config", str(cfg), "--seed", "9", "--overwrite"]) == 0
    [kw] = combined
    assert (kw["method"], kw["density"], kw["seed"], kw["weights"], kw["overwrite"]) == ("dare_linear", 0.3, 9,
                                                                                         [0.7, 0.3], True)
    assert Path(kw["out_dir"]) == tmp_path / "from-config" and [Path(a).name for a in kw["adapters"]] == ["x", "y"]
    assert main(["merge", "--config", str(cfg), "--weights", "2", "1", "--out", "here"]) == 0
    assert (combined[1]["weights"], combined[1]["out_dir"]) == ([2.0, 1.0], "here")


@pytest.mark.parametrize("argv, message", [
    (["merge", "--adapter", "a", "--adapters", "b", "c", "--out", "o"],
     "--adapter merges one adapter into its base; --adapters/--config combine adapters. Use one of them"),
    (["merge", "--adapters", "a", "b"], "--out DIR is required (or `out:` in the --config file)"),
    (["merge", "--adapters", "a", "b", "--out", "o", "--weights", "1", "heavy"],
     "--weights 1 heavy: expected numbers, e.g. --weights 1.0 0.5"),
    (["merge"], "pass --adapter DIR (merge into the base) or --adapters A B ... / --config FILE (combine)"),
    (["merge", "--adapter", "a"], "--out DIR is required: where the merged model is written"),
    (["export", "--format", "gguf", "--out", "m.gguf"],
     "pass exactly one of --model DIR (a merged model) and --adapter DIR (merged on the way)"),
    (["export", "--format", "peft", "--model", "m", "--out", "o"],
     "--format peft exports an adapter: pass --adapter DIR"),
    (["export", "--format", "safetensors", "--model", "m", "--out", "o"],
     "--format safetensors writes a merged model: pass --adapter DIR (a --model directory already is one)"),
])
def test_argument_mistakes_are_refused_before_any_work(combined, capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"peftlab: error: {message}\n"
    assert combined == []


def test_peft_export_prints_where_and_logs_its_notes(monkeypatch, capsys, tmp_path):
    calls = []

    def export(adapter, out, *, base, overwrite):
        calls.append((adapter, out, base, overwrite))
        return PeftExportResult(path=Path(out), modules=14, notes=["lora_dropout kept as trained"])

    monkeypatch.setattr(peft, "export_peft", export)
    assert main(["export", "--format", "peft", "--adapter", "a", "--out", str(tmp_path / "p"), "--base", "b"]) == 0
    assert calls == [("a", tmp_path / "p", "b", False)]
    assert capsys.readouterr() == (f"adapter (14 modules) -> {tmp_path / 'p'}\nlora_dropout kept as trained\n", "")
    monkeypatch.setenv("PEFTLAB_LOG_LEVEL", "warning")  # notes are messages: the level switch silences them
    assert main(["export", "--format", "peft", "--adapter", "a", "--out", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out == f"adapter (14 modules) -> {tmp_path / 'p'}\n"
    logging.getLogger("peftlab").setLevel(logging.INFO)
