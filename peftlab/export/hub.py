"""``--push-to-hub REPO``: a model card for an export, and the upload.

The card (README.md) says what was exported, from which base, with which recipe, data, metrics and merge
fidelity; it is written beside the export first, so nothing is lost when the upload fails (without a network
the error says where the files are and the command that uploads them later).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftlab.adapters.peft_format import CONFIG_NAME
from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.errors import PeftlabError
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME


def model_card(*, title: str, base: str | None, kind: str, adapter_dir: Path | None = None,
               report: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """A README.md for the hub: what it is, the base, the training recipe, data, metrics, fidelity."""
    import yaml

    recipe: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    if adapter_dir is not None:
        rp = adapter_dir / ADAPTER_RECIPE_NAME
        if rp.is_file():
            recipe = yaml.safe_load(rp.read_text()) or {}
        summary = adapter_dir.parent / "summary.json"
        if summary.is_file():
            metrics = json.loads(summary.read_text()).get("eval_after", {})
    if not base and adapter_dir is not None:
        base = recipe.get("model", {}).get("name")
        if not base and (adapter_dir / CONFIG_NAME).is_file():
            base = json.loads((adapter_dir / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    front = {"library_name": "peft" if kind == "adapter" else "transformers", "tags": ["peftlab", "lora"]}
    if base:
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"A {kind} fine-tuned with [peftlab](https://github.com/) (LoRA" +
             (f", base quantised to {recipe['quantization']['mode'].upper()} during training"
              if recipe.get("quantization", {}).get("mode", "none") != "none" else "") + ").", ""]
    if base:
        lines += [f"- **Base model:** `{base}`"]
    a = recipe.get("adapter")
    if a:
        lines += [f"- **Adapter:** r={a.get('r')}, alpha={a.get('alpha')}, targets={a.get('target_modules')}"
                  + (", rsLoRA" if a.get("rslora") else "") + (", DoRA" if a.get("dora") else "")]
    data = recipe.get("data")
    if data:
        train = [s.get("path") or s.get("hf") or s for s in data.get("train", [])]
        evals = [s.get("path") or s.get("hf") or s for s in data.get("eval", []) or []]
        lines += [f"- **Training data:** {train}", f"- **Eval data:** {evals or 'none'}"]
    t = recipe.get("train")
    if t:
        lines.append(f"- **Training:** lr={t.get('lr')}, epochs={t.get('epochs')}, max_steps={t.get('max_steps')}, "
                     f"micro_batch_size={t.get('micro_batch_size')}, grad_accum={t.get('grad_accum')}, "
                     f"seed={t.get('seed')}")
    for key, value in (extra or {}).items():
        lines += [f"- **{key}:** {value}"]
    if metrics:
        lines += ["", "## Metrics (held-out, after training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if report:
        lines += ["", "## Merge fidelity (adapter model vs merged model)", "", "| | |", "|---|---|"]
        for key in ("samples_source", "base_precision", "dtype", "max_abs_logit_diff", "mean_abs_logit_diff",
                    "perplexity_adapter", "perplexity_merged", "top1_agreement"):
            if key in report:
                v = report[key]
                lines.append(f"| {key} | {v:.4g} |" if isinstance(v, float) else f"| {key} | {v} |")
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def push_to_hub(path: Path, repo: str, card: str) -> str:
    """Upload ``path`` (a directory, or one file) with ``card`` as README.md to the hub repo ``repo``.

    The card is written beside the export first, so nothing is lost when the upload fails.
    """
    card_path = (path if path.is_dir() else path.with_name(f"{path.stem}.README.md"))
    card_path = card_path / "README.md" if path.is_dir() else card_path
    atomic_write_text(card_path, card)
    later = (f"the export and its model card are in {path}" + ("" if path.is_dir() else f" and {card_path}") +
             f"; upload them later with `huggingface-cli upload {repo} {path if path.is_dir() else path.parent}`")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PeftlabError(f"--push-to-hub {repo}: no network (HF_HUB_OFFLINE=1), nothing was uploaded; {later}")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        if path.is_dir():
            api.upload_folder(folder_path=str(path), repo_id=repo)
        else:
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo)
            api.upload_file(path_or_fileobj=str(card_path), path_in_repo="README.md", repo_id=repo)
    except Exception as exc:  # noqa: BLE001 (network, auth, permissions: all end in the same advice)
        raise PeftlabError(f"--push-to-hub {repo} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                           f"log in with `huggingface-cli login` and check the network; {later}") from None
    return f"https://huggingface.co/{repo}"
