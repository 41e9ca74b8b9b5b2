"""The report of `peftlab estimate` (peftlab/engine/estimate_report.py): sizes, the text report and the
"does not fit" message."""
from __future__ import annotations

import json

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main
from peftlab.engine.estimate_report import (
    Estimate,
    GiB,
    MiB,
    does_not_fit_message,
    fmt,
    format_estimate,
    parse_size,
)
from peftlab.errors import PeftlabError


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB and parse_size("80GB") == 80 * 10**9 and parse_size("512") == 512
    with pytest.raises(PeftlabError, match="expected a size"):
        parse_size("lots")


def test_report_lists_components_ranks_budget_and_notes():
    est = Estimate({"baseline": 200 * MiB, "activations": GiB}, "cuda", 2, 512, budget=GiB,
                   per_rank={"no_zero": 1224 * MiB}, max_seq_len=300, max_micro_batch_size=None, notes=["n1"])
    assert est.total == 1224 * MiB and not est.fits and est.to_dict()["fits"] is False
    assert fmt(GiB / 4) == "0.25 GiB" and fmt(GiB / 4 - 1) == "256.0 MiB"
    assert format_estimate(est, gpus=1).splitlines() == [
        "predicted peak GPU memory per rank, micro_batch_size=2 seq_len=512:",
        "  baseline                200.0 MiB",
        "  activations              1.00 GiB",
        "  total                    1.20 GiB",
        "per rank with 1 rank(s):",
        "  no_zero                              1.20 GiB",
        "budget 1.00 GiB: DOES NOT FIT",
        "  largest seq_len at micro_batch_size=2: 300",
        "  largest micro_batch_size at seq_len=512: none",
        does_not_fit_message(est),
        "note: n1"]
    assert does_not_fit_message(est) == (
        "does not fit: the run needs 1.20 GiB on the cuda, the budget is 1.00 GiB (short by 200.0 MiB). Try "
        "data.max_seq_len: 300; or model.gradient_checkpointing: true, kernels: auto (fused loss), or a ZeRO config "
        "with --gpus")


def test_too_small_budget_says_what_it_needs(tmp_path, capsys):
    data = make_quickstart_data(tmp_path / "data", n_train=16, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out")
    raw["output"].update(report_to=["jsonl"], plot=False)
    raw["train"].update(max_steps=2, grad_accum=1)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))  # JSON is YAML
    assert main(["estimate", str(path), "--device-memory", "100MiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: the run needs" in out and "the budget is 100.0 MiB" in out
