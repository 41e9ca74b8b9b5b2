"""One KTO step on the same 16 rows with the same adapter: peftlab's loss and LoRA gradients against TRL's KTOTrainer.

Scratch harness for the open KTO discrepancy (README, "KTO against TRL end to end"): loads a trained peftlab adapter
(default runs/kto-uw1/adapter, from `peftlab train recipes/kto-quickstart.yaml --set
preference.undesirable_weight=1.0 --set output.dir=../runs/kto-uw1`) into TRL's own PeftModel (built from
peft_config: a PeftModel handed to KTOTrainer is ignored by TRL 1.16's forward) and into peftlab's trainer, takes
the first 16 rows of recipes/data/kto/train.jsonl (matched by content in peftlab's data), and prints both losses,
the logged figures and the worst relative LoRA-gradient difference. 2026-12-02: loss 0.424355 both, worst relative
gradient difference 5.8e-5 (fp32) — one step agrees; the end-to-end difference lay in the multi-step setup
(found 2026-12-03: TRL trains in the file's order, with transformers' warmup; bench/kto_lockstep_vs_trl.py, README).

    OMP_NUM_THREADS=2 python bench/kto_step_vs_trl.py [ADAPTER_DIR]
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
ADAPTER = sys.argv[1] if len(sys.argv) > 1 else f"{ROOT}/runs/kto-uw1/adapter"
WORK = tempfile.mkdtemp(prefix="kto-step-")  # TRL's output_dir and peftlab's output.dir (nothing kept)
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

rows = [json.loads(line) for line in Path(f"{ROOT}/recipes/data/kto/train.jsonl").read_text().splitlines()][:16]
tok = AutoTokenizer.from_pretrained(f"{ROOT}/runs/quickstart-merged")
if tok.pad_token is None: tok.pad_token = tok.eos_token
base = AutoModelForCausalLM.from_pretrained(f"{ROOT}/runs/quickstart-merged", torch_dtype=torch.float32)
ds = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")} for r in rows])
cfg = KTOConfig(output_dir=f"{WORK}/trl", beta=0.1, max_length=80, per_device_train_batch_size=16, report_to=[], use_cpu=True)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
tr = KTOTrainer(model=base, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
sd = load_file(f"{ADAPTER}/adapter_model.safetensors")
res = set_peft_model_state_dict(tr.model, sd)
print("unexpected", len(res.unexpected_keys))
batch = tr.data_collator([tr.train_dataset[i] for i in range(16)])
tr.model.train()
loss_trl = tr.compute_loss(tr.model, batch)
m = tr._metrics["train"]
print("TRL loss", float(loss_trl), {k: m[k][-1] for k in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")})
loss_trl.backward()
g_trl = {n.split("base_model.model.", 1)[1].replace(".default", ""): p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}

from peftlab.recipe.parse import load_recipe
from peftlab.trainer.loop import Trainer

rec = load_recipe(f"{ROOT}/recipes/kto-quickstart.yaml", overrides=[
    f"adapter.init_from={ADAPTER}", "preference.undesirable_weight=1.0", f"output.dir={WORK}/peftlab", "train.max_steps=1",
    f"model.name={ROOT}/runs/quickstart-merged"])
trainer = Trainer(rec, quiet=True)
def key(ex):
    return (tuple(ex["prompt_ids"]), tuple(ex["completion_ids"]))
want = []
for r in rows:
    p = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
    want.append((p, r["completion"][0]["content"], r["label"]))
idx = []
for p, c, lab in want:
    for i, ex in enumerate(trainer.data.train):
        if tok.decode(ex["prompt_ids"]) == p and tok.decode(ex["completion_ids"]).startswith(c) and bool(ex["desirable"]) == lab and i not in idx:
            idx.append(i); break
print("matched", len(idx))
b = trainer.batch(idx)
model = trainer.model; model.train()
obj = trainer.objective
loss_pl = obj.loss(model, b, normalizer=obj.normalizer(b))
print("peftlab loss", float(loss_pl), {k: round(float(v), 4) for k, v in obj._window.means(reduce=False).items()} if hasattr(obj._window, "means") else "")
loss_pl.backward()
g_pl = {n.replace("base_layer.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
worst = 0; n = 0
for k, g in g_trl.items():
    kk = [x for x in g_pl if x.endswith(k.split("model.", 1)[-1])]
    if not kk: continue
    n += 1
    rel = ((g - g_pl[kk[0]]).norm() / g.norm().clamp(min=1e-12)).item()
    worst = max(worst, rel)
print("compared", n, "worst relative grad diff", worst)
