"""Fitting a run to its memory: train.auto_fit shrinks the micro-batch (keeping the batch), then the sequence
length, and says so; nothing fitting is one clear message; after running out of memory the advice names the
prediction, what would fit and the recipe keys that lower memory."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.engine import memory_fit, planner
from peftlab.engine.memory_fit import apply_auto_fit, out_of_memory_advice
from peftlab.engine.planner import MiB, estimate, fmt
from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict

BASELINE = 300 * MiB


@pytest.fixture(autouse=True)
def fixed_baseline(monkeypatch):
    """The planner's process baseline without its measuring subprocess."""
    monkeypatch.setattr(planner, "_probe_baseline", lambda recipe: BASELINE)


@pytest.fixture
def messages():
    """What peftlab logs (INFO and up) while the test runs: a handler on the ``peftlab`` logger itself, since a
    training run's setup_logging stops that logger propagating to the root (where caplog listens)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("peftlab")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [r.getMessage() for r in records if r.name.startswith("peftlab.")]
    logger.removeHandler(handler)
    logger.setLevel(level)


def _recipe(tmp_path: Path, **sections):
    data = make_quickstart_data(tmp_path / "data", n_train=16, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out", **sections)
    raw["output"].update(report_to=["jsonl"], plot=False)
    raw["train"].update(max_steps=1, grad_accum=1, device="cpu")
    return recipe_from_dict(raw)


def test_auto_fit_shrinks_the_micro_batch_and_keeps_the_batch(tmp_path, messages):
    r = _recipe(tmp_path, data={"max_seq_len": 512}, train={"micro_batch_size": 64})
    budget = estimate(r, device="cpu").total - 30 * MiB
    apply_auto_fit(r, device_memory=budget)
    mbs, accum = r.train.micro_batch_size, r.train.grad_accum
    assert mbs < 64 and mbs * accum >= 64 and mbs * (accum - 1) < 64
    assert r.data.max_seq_len == 512
    peak = estimate(r, device="cpu").total
    assert peak <= budget
    assert messages() == [(f"auto_fit: micro_batch_size -> {mbs}, grad_accum -> {accum} (predicted peak "
                                 f"{fmt(peak)} of {fmt(budget)})")]


def test_auto_fit_then_shortens_the_sequences(tmp_path, messages):
    r = _recipe(tmp_path, data={"max_seq_len": 512}, train={"micro_batch_size": 2})
    one_row = estimate(r, device="cpu", micro_batch_size=1)
    budget = (one_row.total + estimate(r, device="cpu", micro_batch_size=1, seq_len=256).total) // 2
    apply_auto_fit(r, device_memory=budget)
    assert r.train.micro_batch_size == 1 and 256 <= r.data.max_seq_len < 512
    longer = estimate(r, device="cpu", seq_len=r.data.max_seq_len + 1).total
    assert estimate(r, device="cpu").total <= budget < longer
    assert messages() == [(f"auto_fit: micro_batch_size -> 1, data.max_seq_len -> {r.data.max_seq_len} "
                                 "(longer rows are truncated)")]


def test_a_run_that_fits_is_left_alone_and_nothing_fitting_is_refused(tmp_path, messages):
    r = _recipe(tmp_path)
    before = r.to_dict()
    assert apply_auto_fit(r, device_memory=estimate(r, device="cpu").total) is r and r.to_dict() == before
    with pytest.raises(PeftlabError, match=r"does not fit: the run needs .* the budget is 100\.0 MiB .*Try "):
        apply_auto_fit(r, device_memory=100 * MiB)
    assert messages() == []


def test_out_of_memory_advice(tmp_path, monkeypatch):
    r = _recipe(tmp_path, data={"max_seq_len": 512}, train={"micro_batch_size": 16})
    full = estimate(r, device="cpu")
    advice = out_of_memory_advice(r, device="cpu", budget=full.total - 30 * MiB)
    fits = estimate(r, device="cpu", device_memory=full.total - 30 * MiB)
    assert advice.startswith(f"`peftlab estimate` predicts a peak of {fmt(full.total)} for this recipe "
                             f"(micro_batch_size=16, max_seq_len=512) against {fmt(full.total - 30 * MiB)} this "
                             "process can use on the cpu (free now + what it holds); it predicts a fit with "
                             f"train.micro_batch_size: {fits.max_micro_batch_size} or data.max_seq_len: "
                             f"{fits.max_seq_len}. Recipe keys that lower memory: ")
    for key in ("train.micro_batch_size (now 16; raise train.grad_accum, now 1, to keep the batch)",
                "data.max_seq_len (now 512)", "model.gradient_checkpointing: true", "train.auto_fit: true"):
        assert key in advice
    assert "quantization.mode: nf4" not in advice  # the recipe already has a 4-bit base
    assert "train.mlp_chunk_tokens: 4096" in advice
    assert "train.offload_activations" not in advice  # on the CPU offloading moves nothing
    assert "train.fused_norm" not in advice  # on the CPU the fused norm runs transformers' ops
    ckpt = _recipe(tmp_path, model={"gradient_checkpointing": True})
    assert "train.offload_activations: true" in out_of_memory_advice(ckpt, device="cuda", budget=1)
    assert "train.fused_norm: true (RMSNorm without its fp32 copy" in out_of_memory_advice(ckpt, device="cuda",
                                                                                           budget=1)
    assert "train.offload_activations" not in out_of_memory_advice(
        _recipe(tmp_path, model={"gradient_checkpointing": True}, train={"offload_activations": True}),
        device="cuda", budget=1)
    assert "so the memory went elsewhere" in out_of_memory_advice(r, device="cpu", budget=full.total)

    def broken(*a, **k):
        raise RuntimeError("planner bug")

    monkeypatch.setattr(memory_fit, "estimate", broken)
    assert out_of_memory_advice(r, device="cpu", budget=1).startswith(
        "(the memory planner failed too: RuntimeError; run `peftlab estimate RECIPE` later). Recipe keys")


def test_out_of_memory_advice_names_fused_norm_only_where_it_saves_memory(tmp_path):
    """train.fused_norm saves transformers' fp32 copy of a 16-bit norm input (and its fp32 backward) on the
    fused-kernel path: suggested for a bf16 model on CUDA (and under kernels: triton), never for an fp32 model,
    whose norm keeps no copy, nor where the fused norm runs transformers' ops; the planner's own note agrees."""
    key = "train.fused_norm: true (RMSNorm without its fp32 copy"
    cases = [({"dtype": "auto"}, "auto", "cuda", True), ({"dtype": "bfloat16"}, "auto", "cuda", True),
             ({"dtype": "float32"}, "auto", "cuda", False), ({"dtype": "float32"}, "triton", "cuda", False),
             ({"dtype": "bfloat16"}, "torch", "cuda", False), ({"dtype": "bfloat16"}, "auto", "cpu", False),
             ({"dtype": "bfloat16"}, "triton", "cpu", True), ({"dtype": "auto"}, "auto", "cpu", False)]
    for model, kernels, device, saves in cases:
        r = _recipe(tmp_path, model={**model, "gradient_checkpointing": True})
        r.kernels = kernels
        assert (key in out_of_memory_advice(r, device=device, budget=1)) is saves, (model, kernels, device)
        notes = estimate(r, device=device).notes
        assert any(n.startswith("train.fused_norm: true predicts") for n in notes) is saves, (model, kernels, device)
        r.train.fused_norm = True
        if kernels != "torch":  # on already: nothing to suggest
            assert key not in out_of_memory_advice(r, device=device, budget=1)
    fp32 = _recipe(tmp_path, model={"dtype": "float32"})
    fused = _recipe(tmp_path, model={"dtype": "float32"}, train={"fused_norm": True})
    assert estimate(fp32, device="cuda").total == estimate(fused, device="cuda").total  # what "saves nothing" means


def test_a_training_run_with_auto_fit_trains_with_what_fits(tmp_path, monkeypatch, messages):
    """train.auto_fit through the trainer: the run is shrunk before the model is built and its stored recipe
    says what it trained with."""
    import yaml

    from peftlab.trainer.loop import train

    r = _recipe(tmp_path, train={"micro_batch_size": 8, "auto_fit": True, "eval_at_start": False})
    budget = estimate(r, device="cpu", micro_batch_size=4).total
    monkeypatch.setattr(memory_fit, "default_budget", lambda device: budget)
    train(r)
    stored = yaml.safe_load((r.output_dir / "adapter" / "peftlab_recipe.yaml").read_text())
    assert (stored["train"]["micro_batch_size"], stored["train"]["grad_accum"]) == (4, 2)
    assert any(m.startswith("auto_fit: micro_batch_size -> 4, grad_accum -> 2") for m in messages())
