"""The planner's distillation terms (peftlab/engine/planner_distill.py): present with ``distill:`` only, scaling with
the teacher and the batch, each PyTorch KD loss path's working set and the teacher's forward against torch.profiler's
memory timeline, and a tiny online-KD run's predicted peak against its measured RSS."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, profiled_peak, tiny_recipe_dict, with_sections

from peftlab.cli.main import main
from peftlab.engine.model_shape import count_model, quantized_bytes
from peftlab.engine.planner import MiB, estimate
from peftlab.engine.planner_distill import Teacher, distill_memory, teacher_forward_bytes, teacher_shape
from peftlab.recipe.parse import recipe_from_dict
from peftlab.recipe.schema import QuantizationConfig

REPO = Path(__file__).resolve().parents[2]
DISTILL_KEYS = ("teacher_weights", "teacher_forward", "teacher_outputs", "kd_loss")
H, INTER, LAYERS, VOCAB = 256, 704, 2, 32000


def _config_dir(root: Path, name: str, **over) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
           "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **over}
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.json").write_text(json.dumps(cfg))
    return root / name


def _recipe(tmp_path: Path, *, distill: dict | None = None, **sections):
    raw = {"model": {"name": str(_config_dir(tmp_path, "student"))}, "quantization": {"mode": "nf4"},
           "adapter": {"r": 8, "alpha": 16}, "data": {"train": [{"path": str(tmp_path / "t.jsonl")}],
                                                      "max_seq_len": 128},
           "train": {"micro_batch_size": 2}, "output": {"dir": str(tmp_path / "out")}}
    with_sections(raw, sections)
    if distill is not None:
        raw["distill"] = distill
    return recipe_from_dict(raw)


def _teacher(tmp_path: Path, *, quant: str = "none", dtype: str = "bfloat16", **cfg) -> dict:
    name = "teacher" + "".join(f"-{k}-{v}" for k, v in sorted(cfg.items()))
    return {"teacher": {"name": str(_config_dir(tmp_path, name, **cfg)),
                        "quantization": {"mode": quant}, "dtype": dtype}}


def _llama_params(layers: int) -> tuple[int, list[int]]:
    """Dense parameters (embeddings, head, norms) and the linear weights' sizes of the test configs."""
    kv = 2 * (H // 4)
    linears = [H * H, H * kv, H * kv, H * H, H * INTER, H * INTER, INTER * H] * layers
    dense = 2 * VOCAB * H + (2 * layers + 1) * H
    return dense, linears


def test_no_distill_no_distill_terms(tmp_path):
    est = estimate(_recipe(tmp_path), device="cuda", baseline=0)
    assert not set(DISTILL_KEYS) & set(est.components) and not any("distill" in n for n in est.notes)


def test_teacher_weights_follow_its_size_dtype_and_quantization(tmp_path):
    """Counted like the student's: every parameter in the teacher's dtype, 4-bit linears in bitsandbytes' format,
    never frozen_16bit (load_teacher does not use it); the rotary buffer is the same in each."""
    def weights(**kw) -> int:
        r = _recipe(tmp_path, distill=_teacher(tmp_path, **kw))
        return estimate(r, device="cuda", baseline=0).components["teacher_weights"]

    dense, linears = _llama_params(LAYERS)
    bf16, fp32 = weights(dtype="bfloat16"), weights(dtype="float32")
    assert fp32 - bf16 == 2 * (dense + sum(linears))
    dense4, linears4 = _llama_params(2 * LAYERS)
    assert weights(dtype="bfloat16", num_hidden_layers=2 * LAYERS) - bf16 == 2 * (dense4 + sum(linears4)
                                                                                 - dense - sum(linears))
    q = QuantizationConfig(mode="nf4")
    nf4 = weights(quant="nf4")
    assert bf16 - nf4 == sum(2 * n - quantized_bytes(n, q.blocksize, q.double_quant) for n in linears)


def test_teacher_adapter_counts_in_fp32_and_a_missing_one_is_said(tmp_path):
    """distill.teacher.adapter: its LoRA weights (fp32, as load_adapter injects them) are counted from its
    adapter_config.json; an adapter not trained yet is left out with a note."""
    d = _teacher(tmp_path)
    plain = estimate(_recipe(tmp_path, distill=d), device="cuda", baseline=0)
    adapter = tmp_path / "teacher-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj", "v_proj"]}))
    d["teacher"]["adapter"] = str(adapter)
    est = estimate(_recipe(tmp_path, distill=d), device="cuda", baseline=0)
    kv = 2 * (H // 4)
    lora = LAYERS * 4 * ((H + H) + (H + kv))  # A (r x in) + B (out x r) of q_proj and v_proj
    assert est.components["teacher_weights"] - plain.components["teacher_weights"] == lora * 4
    assert f"+ adapter {adapter}" in "\n".join(est.notes)
    d["teacher"]["adapter"] = str(tmp_path / "not-trained-yet")
    est = estimate(_recipe(tmp_path, distill=d), device="cuda", baseline=0)
    assert est.components["teacher_weights"] == plain.components["teacher_weights"]
    assert f"distill.teacher.adapter {tmp_path / 'not-trained-yet'} is not there yet: its weights are not counted" \
        in est.notes
    del d["teacher"]["quantization"]  # its quantization would come from the adapter: the recipe's (nf4) is assumed
    est = estimate(_recipe(tmp_path, distill=d), device="cuda", baseline=0)
    nf4 = estimate(_recipe(tmp_path, distill=_teacher(tmp_path, quant="nf4")), device="cuda", baseline=0)
    assert est.components["teacher_weights"] == nf4.components["teacher_weights"] < plain.components["teacher_weights"]
    assert f"{tmp_path / 'not-trained-yet'} is not there yet: its weights are not counted; the teacher's " \
           "quantization is taken to be the recipe's" in "\n".join(est.notes)


def test_kd_loss_scales_with_tokens_and_vocabulary(tmp_path):
    """PyTorch row chunks (kernels: torch on a GPU, fp32 head): the working set is a fixed number of fp32
    rows x vocabulary buffers, + the student's fp32 hidden-state gradient; the Triton path 2.5 buffers."""
    r = _recipe(tmp_path, distill=_teacher(tmp_path, dtype="float32", hidden_size=384), kernels="torch",
                model={"dtype": "float32"})
    teacher = teacher_shape(r, "cuda")
    shape = count_model(json_config(r.model.name), torch.float32, quant=r.quantization, lora=None)

    def kd(mbs: int = 2, seq: int = 128, vocab: int = VOCAB, recipe=r) -> int:
        s = dataclasses.replace(shape, vocab=vocab)
        t = Teacher(dataclasses.replace(teacher.shape, vocab=vocab), teacher.elem, "t")
        return distill_memory(recipe, s, t, device="cuda", elem=4, mbs=mbs, seq=seq).kd_loss_fwd

    grad = 2 * 128 * H * 4
    assert kd(mbs=4) - 2 * grad == 2 * (kd() - grad)  # one chunk of every row either way
    assert kd(vocab=2 * VOCAB) - grad == 2 * (kd() - grad)
    assert kd() - grad == 8.25 * 256 * VOCAB * 4  # forward KL
    r.kernels = "auto"
    assert kd(recipe=r) - grad == 2.5 * 256 * VOCAB * 4  # Triton: student + teacher chunk, bf16 gradient
    assert teacher.shape.hidden == 384 and teacher.elem == 4


def json_config(path: str):
    from peftlab.engine.model_shape import model_config

    return model_config(path, None, False)


def test_offline_counts_the_cached_top_k_and_no_teacher(tmp_path):
    d = {"teacher": str(_config_dir(tmp_path, "t")), "mode": "offline", "top_k": 64}
    r = _recipe(tmp_path, distill=d, model={"dtype": "float32"}, kernels="torch")
    est = estimate(r, device="cuda", baseline=0, micro_batch_size=4, seq_len=512)
    c = est.components
    assert c["teacher_weights"] == 0 and c["teacher_forward"] == 0
    assert c["teacher_outputs"] == 4 * 512 * 64 * (4 + 8)  # fp32 log-probs + int64 ids, (B, T, k)
    assert c["kd_loss"] > 0 and c["loss_head"] == 0  # the KD loss is the peak moment here
    assert any(n.startswith("distill (offline, top_k 64): the teacher is not loaded") for n in est.notes)


def test_weighted_rows_keep_the_teacher_outputs_for_the_loss_backward(tmp_path):
    """A dataset loss_weight other than 1 makes the KD loss per token: its backward runs the chunks again and the
    teacher's hidden states live until then."""
    r = _recipe(tmp_path, distill=_teacher(tmp_path), kernels="torch", model={"dtype": "float32"})
    shape = count_model(json_config(r.model.name), torch.float32, quant=r.quantization, lora=None)
    teacher = teacher_shape(r, "cuda")
    plain = distill_memory(r, shape, teacher, device="cuda", elem=4, mbs=2, seq=128)
    assert plain.teacher_outputs_bwd == 0 and plain.kd_loss_bwd == 256 * H * (4 + 4 + 4)
    r.data.train[0].loss_weight = 2.0
    weighted = distill_memory(r, shape, teacher, device="cuda", elem=4, mbs=2, seq=128)
    assert weighted.teacher_outputs_bwd == plain.teacher_outputs == 256 * H * 2
    assert weighted.kd_loss_bwd == plain.kd_loss_fwd + 256 * H * 4


def test_estimate_prints_the_distill_terms_and_its_json_has_them(tmp_path, capsys):
    r = _recipe(tmp_path, distill=_teacher(tmp_path))
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(r.model_dump(mode="json")))
    assert main(["estimate", str(path), "--device", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(DISTILL_KEYS) <= set(data["components"]) and data["components"]["teacher_weights"] > 0
    assert data["total"] == sum(data["components"].values())
    assert main(["estimate", str(path), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    for key in DISTILL_KEYS:
        assert f"\n  {key} " in out
    assert "note: distill (online, forward_kl): teacher " in out and "KD loss (Triton row chunks of " in out


def test_out_of_memory_advice_names_the_distill_keys(tmp_path):
    from peftlab.engine.memory_fit import out_of_memory_advice

    advice = out_of_memory_advice(_recipe(tmp_path, distill=_teacher(tmp_path)), device="cuda", budget=1)
    assert "; distill.teacher.quantization: {mode: nf4} (a 4-bit teacher); distill.mode: offline (" in advice
    assert "distill" not in out_of_memory_advice(_recipe(tmp_path), device="cuda", budget=1)
    nf4 = _recipe(tmp_path, distill=_teacher(tmp_path, quant="nf4"))
    assert "distill.teacher.quantization" not in out_of_memory_advice(nf4, device="cuda", budget=1)
    # no quantization of its own: the teacher inherits the recipe's (16 bits here), and the advice still applies
    inherits = _teacher(tmp_path)
    del inherits["teacher"]["quantization"]
    advice = out_of_memory_advice(_recipe(tmp_path, quantization={"mode": "none"}, distill=inherits), device="cuda",
                                  budget=1)
    assert "distill.teacher.quantization: {mode: nf4} (a 4-bit teacher)" in advice
    inherits["teacher"]["adapter"] = str(tmp_path / "not-trained-yet")  # nothing recorded yet: the recipe's
    advice = out_of_memory_advice(_recipe(tmp_path, quantization={"mode": "none"}, distill=inherits), device="cuda",
                                  budget=1)
    assert "distill.teacher.quantization: {mode: nf4} (a 4-bit teacher)" in advice


# ---- each path's working set against torch.profiler's memory timeline ------------------------------------------


@pytest.mark.parametrize("mode, kind, head", [("online", "forward_kl", "float32"), ("online", "reverse_kl", "float32"),
                                              ("online", "jsd", "bfloat16"), ("online", "forward_kl", "bfloat16"),
                                              ("offline", "forward_kl", "float32"),
                                              ("offline", "forward_kl", "bfloat16")])
def test_kd_loss_working_set_matches_theprofiled_peak(tmp_path, mode, kind, head):
    """Forward + backward of the loss on the CPU (train.host_allocator: bounded, so no heap term): the planner's
    kd_loss against the live-tensor peak, within 15 %. A bf16 student head takes torch_kd_online (forward KL) /
    the online CE + gathered top-k rows (offline); jsd keeps the row chunks."""
    from peftlab.kernels import fused_linear_kd_loss, topk_kd_loss

    n, hs, ht, vocab, k = 256, 64, 96, 40000, 64
    d = {"teacher": str(_config_dir(tmp_path, "t")), "mode": mode, "kind": kind, "top_k": k}
    r = _recipe(tmp_path, distill=d, kernels="torch", train={"host_allocator": "bounded"}, model={"dtype": "float32"})
    base = count_model(json_config(r.model.name), torch.float32, quant=r.quantization, lora=None)
    shape = dataclasses.replace(base, hidden=hs, vocab=vocab, head_16bit=head == "bfloat16")
    teacher = Teacher(dataclasses.replace(base, hidden=ht, vocab=vocab), 4, "t")
    predicted = distill_memory(r, shape, teacher, device="cpu", elem=4, mbs=1, seq=n).kd_loss_fwd
    torch.manual_seed(0)
    h = torch.randn(n, hs, requires_grad=True)
    w = torch.randn(vocab, hs).to(getattr(torch, head))
    y = torch.randint(0, vocab, (n,))
    if mode == "online":
        th, tw = torch.randn(n, ht), torch.randn(vocab, ht)
        run = lambda: fused_linear_kd_loss(h, w, th, tw, y, kind=kind, backend="torch", normalizer=n).backward()
    else:
        lp, ids = torch.randn(n, k).log_softmax(-1), torch.randint(0, vocab, (n, k))
        run = lambda: topk_kd_loss(h, w, lp, ids, y, kind=kind, normalizer=n).backward()
    measured = profiled_peak(run)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted / MiB, measured / MiB)


@pytest.mark.parametrize("dtype, attn", [(torch.float32, "sdpa"), (torch.bfloat16, "sdpa"), (torch.bfloat16, "eager")])
def test_teacher_forward_transients_match_theprofiled_peak(dtype, attn):
    """The teacher's no-grad forward over one padded micro-batch (what OnlineDistillLoss runs) against the planner's
    teacher_forward, within 15 %."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.objectives.causal_lm import final_hidden_states

    cfg = LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2000, tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, 2000, (2, 256))
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0

    def run():
        with torch.no_grad():
            final_hidden_states(model, {"input_ids": ids, "attention_mask": mask})

    measured = profiled_peak(run)
    shape = count_model(cfg, dtype, quant=QuantizationConfig(mode="none"), lora=None)
    predicted = teacher_forward_bytes(shape, elem=dtype.itemsize, mbs=2, seq=256, attn=attn)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted / MiB, measured / MiB)


# ---- a tiny online-KD run, measured ---------------------------------------------------------------------------

MEASURE = r"""
import json, sys
from peftlab.engine.planner import peak_rss_bytes
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer
Trainer(recipe_from_dict(json.loads(sys.argv[1])), quiet=True).train()
print(json.dumps({"peak": peak_rss_bytes()}))
"""


@pytest.mark.slow
def test_online_kd_prediction_within_15_percent_of_measured_peak_rss(tmp_path):
    """One step of online forward-KL distillation on the CPU (the default host allocator): an NF4 student and an
    fp32 teacher from one random 17M-parameter Llama checkpoint with a 32,000-row vocabulary, so the teacher's
    weights and the KD loss are a quarter of the peak (without them the prediction is ~25 % low). Predicted
    against the run's own peak RSS (VmHWM), the tolerance of the plain runs' tests (test_planner.py)."""
    from peftlab.model.builtin import build_tokenizer
    from peftlab.model.quantized_load import save_random_checkpoint

    ckpt = save_random_checkpoint(_config_dir(tmp_path, "cfg"), tmp_path / "ckpt", dtype=torch.bfloat16, seed=0)
    build_tokenizer().save_pretrained(ckpt)
    data = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=2)
    # the built-in tokenizer by its name: the baseline probe's cache key is then the plain tiny run's (no new probe)
    raw = tiny_recipe_dict(data, tmp_path / "out", model={"name": str(ckpt), "tokenizer": "builtin:micro-llama"},
                           adapter={"r": 8, "alpha": 16})
    raw["data"].update(max_seq_len=128, packing=True)
    raw["data"].pop("eval")
    raw["output"].update(report_to=["jsonl"], plot=False)
    raw["train"].update(max_steps=1, grad_accum=1, micro_batch_size=2, eval_at_start=False)
    raw["eval"]["metric"] = "loss"
    raw["distill"] = {"teacher": {"name": str(ckpt), "quantization": {"mode": "none"}, "dtype": "float32"}}
    est = estimate(recipe_from_dict(raw), device="cpu")
    distill = sum(est.components[k] for k in DISTILL_KEYS)
    out = subprocess.run([sys.executable, "-P", "-c", MEASURE, json.dumps(raw)], check=False, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert est.total - distill < 0.85 * measured  # the distillation terms are what the test is about
    assert abs(est.total - measured) <= 0.15 * measured, (est.total / MiB, measured / MiB,
                                                          {k: v / MiB for k, v in est.components.items()})


def test_trained_student_head_takes_row_chunks_and_counts_its_gradient(tmp_path):
    """adapter.unfreeze: [head] with a 16-bit student head (kernels: torch on a GPU): the KD loss computes the head's
    gradient, so it never takes the vocabulary-outer pass (online_applies: no gradient for the head), and its fp32
    gradient, accumulated in the loss's forward, is in kd_loss (grad_accum 2: beside the first micro-batch's .grad)."""
    r = _recipe(tmp_path, distill=_teacher(tmp_path), kernels="torch", train={"grad_accum": 2})
    teacher = teacher_shape(r, "cuda")
    shape = count_model(json_config(r.model.name), torch.bfloat16, quant=r.quantization, lora=None)
    kw = {"device": "cuda", "elem": 2, "mbs": 2, "seq": 128}
    frozen = distill_memory(r, shape, teacher, **kw)
    trained = distill_memory(r, dataclasses.replace(shape, head_trainable=True), teacher, **kw)
    assert frozen.path.startswith("vocabulary-outer") and trained.path.startswith("PyTorch row chunks")
    rows = int(trained.path.rsplit(" ", 1)[1])
    assert trained.kd_loss_fwd == math.ceil(8.25 * rows * VOCAB * 4 + 256 * H * 4 + 4 * VOCAB * H)
