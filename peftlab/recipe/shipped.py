"""The recipes that ship with peftlab (the repository's ``recipes/``, installed as the package ``peftlab.recipes``),
found the same way from a source checkout and from an installed wheel.

``peftlab quickstart`` trains the shipped quickstart recipe. In a source checkout it works in the repository, as
``make quickstart`` always did (data in ``recipes/data/quickstart``, the run in ``runs/quickstart``). Installed from
a wheel, the shipped folder is part of the installation, not a place for data and runs: the quickstart copies its
recipe into a working directory (the current one, or ``--dir``) as ``recipes/quickstart.yaml`` and works there, in
the same layout; a copy already there is the user's (perhaps edited) and is used as it is.

A recipe's ``deepspeed:`` may name a shipped DeepSpeed config by its bare name (``zero2``, ``zero3-offload``, ...)
when no file of that name is next to the recipe (:func:`shipped_deepspeed_config`).
"""
from __future__ import annotations

import logging
import shutil
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

QUICKSTART = "quickstart.yaml"


def shipped_dir() -> Path:
    """The folder of the shipped recipes: the installed ``peftlab.recipes``, or a checkout's ``recipes/`` when the
    package mapping is missing (an editable install made before the recipes were a package)."""
    try:
        return Path(str(resources.files("peftlab.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def is_source_checkout(recipes: Path | None = None) -> bool:
    """Whether the shipped recipes are a source checkout's ``recipes/`` (next to pyproject.toml and peftlab/), where
    data and runs belong in the repository; an installed package's are not."""
    root = (recipes or shipped_dir()).resolve().parent
    return (root / "pyproject.toml").is_file() and (root / "peftlab").is_dir()


def shipped_deepspeed_configs() -> list[str]:
    """The bare names of the shipped DeepSpeed configs (``zero1``, ``zero2``, ``zero2-offload``, ...)."""
    return sorted(p.stem for p in (shipped_dir() / "deepspeed").glob("*.json"))


def shipped_deepspeed_config(name: str) -> Path | None:
    """The shipped DeepSpeed config a recipe's ``deepspeed: NAME`` names by its bare name (``zero3`` or
    ``zero3.json``; no folder part), or None."""
    if not name or "/" in name or "\\" in name:
        return None
    stem = name.removesuffix(".json")
    path = shipped_dir() / "deepspeed" / f"{stem}.json"
    return path if path.is_file() else None


def quickstart_recipe(work_dir: str | Path | None) -> Path:
    """The quickstart recipe to train. In a source checkout with no ``work_dir``: the shipped one, in place.
    Otherwise ``<work_dir or .>/recipes/quickstart.yaml``, copied from the shipped one when it is not there yet."""
    shipped = shipped_dir() / QUICKSTART
    if work_dir is None and is_source_checkout():
        return shipped
    target = Path(work_dir if work_dir is not None else ".") / "recipes" / QUICKSTART
    if target.is_file():
        logger.info(f"quickstart: training {target} (already there: yours to edit; delete it to start over)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped, target)
    logger.info(f"quickstart: wrote {target} (the shipped quickstart recipe; edit it and run again)")
    return target
