"""peftlab.objectives.preference: the DPO loss of a fixed batch equals TRL 1.16's DPOTrainer computation on the
same model and adapter (TRL's own tokenization, collator and ``_compute_loss``, its PEFT reference), on a PEFT
model and on peftlab's own LoRA layers holding the same weights; the rewards and accuracies are TRL's; the
pipeline's batch is TRL's batch; accumulation over micro-batches gives the whole batch's loss."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.data.collate import collate
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.model.builtin import build_tokenizer
from peftlab.objectives.causal_lm import LossSettings
from peftlab.objectives.preference import FIGURES, PreferenceObjective
from peftlab.recipe.preference_config import PreferenceConfig

U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
ROWS = [{"prompt": [U("What is 2 + 3?")], "chosen": [AS("5")], "rejected": [AS("6")]},
        {"prompt": [U("Letter after c?")], "chosen": [AS("d")], "rejected": [AS("e, I think")]},
        {"prompt": [U("Largest of: 1 7 3")], "chosen": [AS("7")], "rejected": [AS("3")]}]


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """TRL's DPOTrainer around a tiny Llama with a randomised LoRA adapter, its loss and metrics on ROWS."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig

    tok = build_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=3, beta=0.5,
                         report_to=[], use_cpu=True, max_length=None)
    trainer = trl.DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an adapter that moves the policy away from the reference
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    loss = float(trainer._compute_loss(trainer.model, batch, False))
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    # RPO: TRL 1.16's loss_type [sigmoid, sft] with loss_weights [1, 0.7] on the same batch (peftlab's sft_weight)
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.7]
    metrics["rpo_loss"] = float(trainer._compute_loss(trainer.model, batch, False))
    return tok, base, trainer.model, batch, loss, metrics


def peftlab_batch(trl_batch: dict) -> dict:
    """TRL's batch in peftlab's layout (the same rows: chosen first; labels = the completion tokens)."""
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    n = len(ROWS)
    return {"input_ids": trl_batch["input_ids"], "attention_mask": trl_batch["attention_mask"], "labels": labels,
            "pairs": torch.tensor(n), "sample_ids": torch.arange(n), "loss_weights": torch.ones_like(labels.float())}


def objective(**kw) -> PreferenceObjective:
    return PreferenceObjective(PreferenceConfig(**kw), LossSettings(backend="torch"))


def test_pipeline_batch_is_trls_batch(trl_run, tmp_path):
    tok, _, _, trl_batch, _, _ = trl_run
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = build_data(DataConfig(train=["p.jsonl"], shuffle=False, preference={"mode": "pairs"}), tok, seed=0,
                      base_dir=tmp_path)
    ours = collate(list(data.train), pad_token_id=tok.pad_token_id)
    want = peftlab_batch(trl_batch)
    assert torch.equal(ours["input_ids"], want["input_ids"]) and torch.equal(ours["labels"], want["labels"])
    assert torch.equal(ours["attention_mask"], want["attention_mask"])


def test_dpo_loss_and_rewards_equal_trls_dpotrainer_on_peft_and_on_peftlab_lora(trl_run):
    _, base, peft_model, trl_batch, trl_loss, trl_metrics = trl_run
    batch = peftlab_batch(trl_batch)
    obj = objective(method="dpo", beta=0.5)
    with torch.no_grad():
        on_peft = float(obj.loss(peft_model, batch, normalizer=len(ROWS)))
    assert on_peft == pytest.approx(trl_loss, abs=1e-5) and abs(trl_loss - 0.6931) > 1e-2  # not the trivial loss
    figures = obj.step_metrics()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert figures[name] == pytest.approx(trl_metrics[name], abs=1e-5), name

    # peftlab's LoRA layers with the same weights (the reference: those layers switched off)
    ours = copy.deepcopy(base)
    inject_lora(ours, r=4, alpha=8, target_modules="all-linear")
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, layer in lora_modules(ours).items():
            layer.lora_A.weight.copy_(theirs[f"{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(theirs[f"{name}.lora_B.weight"])
    ours.eval()
    loss = obj.loss(ours, batch, normalizer=len(ROWS))
    assert float(loss) == pytest.approx(trl_loss, abs=1e-5)
    assert all(m.kernel_backend != "off" for m in lora_modules(ours).values())  # adapters back on after

    # gradient accumulation: micro-batches of 1 and 2 pairs, each divided by the step's 3 pairs, sum to the loss
    loss.backward()
    whole = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
    ours.zero_grad()
    split = [{**{k: v[[0, 3]] for k, v in batch.items() if v.dim() == 2}, "pairs": torch.tensor(1),
              "sample_ids": torch.tensor([0])},
             {**{k: v[[1, 2, 4, 5]] for k, v in batch.items() if v.dim() == 2}, "pairs": torch.tensor(2),
              "sample_ids": torch.tensor([1, 2])}]
    assert sum(obj.normalizer(b) for b in split) == 3.0 and [obj.targets(b) for b in split] == [1, 2]
    total = sum(obj.loss(ours, b, normalizer=3.0) for b in split)
    total.backward()
    assert float(total) == pytest.approx(trl_loss, abs=1e-5)
    for a, b in zip(whole, [p.grad for p in ours.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_with_an_sft_term_equals_trls_sigmoid_plus_sft_loss(trl_run):
    _, _, peft_model, trl_batch, trl_loss, trl_metrics = trl_run
    obj = objective(method="dpo", beta=0.5, sft_weight=0.7)
    with torch.no_grad():
        loss = float(obj.loss(peft_model, peftlab_batch(trl_batch), normalizer=len(ROWS)))
    assert loss == pytest.approx(trl_metrics["rpo_loss"], abs=1e-5) and abs(loss - trl_loss) > 1e-2
    assert obj.step_metrics()["nll_loss"] > 0


@pytest.mark.parametrize("method", ["ipo", "robust", "orpo", "simpo"])
def test_other_pair_methods_run_on_the_same_batch_and_log_their_figures(trl_run, method):
    _, _, peft_model, trl_batch, _, _ = trl_run
    obj = objective(method=method, label_smoothing=0.1 if method == "robust" else 0.0)
    with torch.no_grad():
        loss = obj.loss(peft_model, peftlab_batch(trl_batch), normalizer=len(ROWS))
    assert torch.isfinite(loss)
    figures = obj.step_metrics()
    assert 0.0 <= figures["rewards/accuracies"] <= 1.0 and ("nll_loss" in figures) == (method == "orpo")
    if method == "orpo":  # TRL's names: log_odds_ratio = mean logσ(log odds) <= 0; log_odds_chosen = mean log odds
        assert figures["log_odds_ratio"] < 0.0  # logσ(x) is concave: mean logσ <= logσ(mean), strictly here
        assert figures["log_odds_ratio"] < float(torch.nn.functional.logsigmoid(torch.tensor(figures["log_odds_chosen"])))


# ---- a preference run end to end: metrics, exact resume, early stopping on a reward metric, merge ----------------


def preference_data(out):
    """Quickstart conversations as pairs (the right answer chosen, a wrong one rejected), as the recipe's data."""
    import random
    import sys

    from helpers import REPO, make_quickstart_data

    make_quickstart_data(out, n_train=24, n_eval=4)
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import make_preference_data as gen
    finally:
        sys.path.pop(0)
    rng = random.Random(0)
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(gen.to_pair(r, rng)) + "\n" for r in rows))
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("trainer")
def test_dpo_run_logs_trls_metrics_resumes_exactly_and_merges(tmp_path, capsys):
    from helpers import short_run_recipe

    from peftlab.export.merge import merge_adapter
    from peftlab.metrics.runlog import read_metrics
    from peftlab.recipe.parse import recipe_from_dict
    from peftlab.trainer.loop import Trainer

    data = preference_data(tmp_path / "data")

    def run(out, **kw):
        raw = short_run_recipe(data, out, train={"eval_every": 1, "early_stopping": {
                                   "metric": "eval_rewards/accuracies", "patience": 9}},
                               preference={"method": "dpo", "beta": 0.5, "reference": "precomputed"}, **kw)
        for split in ("train", "eval"):
            raw["data"][split][0].pop("format")
        return Trainer(recipe_from_dict(raw), quiet=True)

    full = run(tmp_path / "full").train()
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3 and all(set(FIGURES) <= set(r) for r in train)
    evals = [r for r in records if r["split"] == "eval"]
    assert {f"eval_{k}" for k in FIGURES} | {"eval_loss"} <= set(evals[-1])
    assert full.best["metric"] == "eval_rewards/accuracies"
    assert (tmp_path / "full" / "reference_logps.json").is_file()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    run(resumed_dir, resume=str(resumed_dir / "checkpoints" / "step-0000001"),
        output={"overwrite": True}).train()
    again = [r for r in read_metrics(resumed_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in again] == [r["loss"] for r in train]  # bit for bit
    assert [r["rewards/margins"] for r in again] == [r["rewards/margins"] for r in train]

    merged = merge_adapter(tmp_path / "full" / "adapter", tmp_path / "merged", report_samples=2)
    assert merged.report["max_abs_logit_diff"] <= 1e-4  # the result is a plain LoRA adapter

    # peftlab eval on the adapter gives the run's own preference figures (not a causal-LM loss over both answers)
    from peftlab.cli.main import main
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    capsys.readouterr()  # the library calls above spoke (quiet is per call): stdout below is eval's alone
    assert main(["eval", str(tmp_path / "full" / "adapter")]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
        assert by_dir[key] == pytest.approx(summary["eval_after"][key], rel=1e-5, abs=1e-6), key


def test_kto_scores_matched_completions_against_the_kl_of_mismatched_ones(trl_run, tmp_path):
    tok, _, peft_model, _, _, _ = trl_run
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = build_data(DataConfig(train=["p.jsonl"], shuffle=False, preference={"mode": "unpaired"}), tok, seed=0,
                      base_dir=tmp_path)
    batch = collate(list(data.train)[:4], pad_token_id=tok.pad_token_id)  # 2 pairs -> 2 desirable, 2 undesirable
    n, beta = 4, 0.5

    def logps(model, rows):
        labels = batch["labels"][rows, 1:]
        logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * (labels != -100)).sum(1)

    with torch.no_grad():
        policy, policy_kl = logps(peft_model, slice(0, n)), logps(peft_model, slice(n, 2 * n))
        with peft_model.disable_adapter():
            ref, ref_kl = logps(peft_model, slice(0, n)), logps(peft_model, slice(n, 2 * n))
        kl = (policy_kl - ref_kl).mean().clamp(min=0)
        rho = policy - ref
        good = batch["desirable"]
        want = torch.where(good, 1 - torch.sigmoid(beta * (rho - kl)), 1 - torch.sigmoid(beta * (kl - rho))).mean()
        obj = objective(method="kto", beta=beta)
        got = obj.loss(peft_model, batch, normalizer=obj.normalizer(batch))
    assert good.tolist() == [True, False, True, False] and float(kl) > 0
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    figures = obj.step_metrics()
    assert figures["kl"] == pytest.approx(float(kl), abs=1e-5)
    assert figures["rewards/chosen"] == pytest.approx(float(beta * rho[good].mean()), abs=1e-5)
