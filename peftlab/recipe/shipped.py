"""The recipes that ship with peftlab (the repository's ``recipes/``, installed as the package ``peftlab.recipes``),
found the same way from a source checkout and from an installed wheel.

``peftlab quickstart`` trains the shipped quickstart recipe. In a source checkout it works in the repository, as
``make quickstart`` always did (data in ``recipes/data/quickstart``, the run in ``runs/quickstart``). Installed from
a wheel, the shipped folder is part of the installation, not a place for data and runs: the quickstart copies its
recipe into a working directory (the current one, or ``--dir``) as ``recipes/quickstart.yaml`` and works there, in
the same layout; a copy already there is the user's (perhaps edited) and is used as it is.

A recipe's ``deepspeed:`` may name a shipped DeepSpeed config by its bare name (``zero2``, ``zero3-offload``, ...)
when no file of that name is next to the recipe (:func:`shipped_deepspeed_config`).

``peftlab recipes`` lists the shipped recipes (:func:`shipped_recipes`); ``peftlab recipes NAME ... [--dir DIR]``
copies them into ``DIR/recipes/`` with the scripts that generate their data (:func:`copy_recipes`), so the commands
in their header comments (``python recipes/make_classify_data.py``, ``peftlab train recipes/...``) run from ``DIR``
as from a checkout. A file already there is never overwritten.
"""
from __future__ import annotations

import logging
import shutil
from importlib import resources
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError

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


def shipped_recipes() -> dict[str, str]:
    """The shipped recipes by name (the file's stem) -> what each is (the first sentence of its header comment, cut
    at 100 characters)."""
    out = {}
    for path in sorted(shipped_dir().glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or not line.lstrip("#").strip():
                break
            header.append(line.lstrip("#").strip())
        first = " ".join(header).split(". ")[0].rstrip(".")
        out[path.stem] = first if len(first) <= 100 else first[:first.rfind(" ", 0, 99)] + " …"
    return out


def copy_recipes(names: list[str], work_dir: str | Path | None) -> list[Path]:
    """Copy the shipped recipes ``names`` (a sweep's base recipe with it) and the data-generating scripts into
    ``<work_dir or .>/recipes/``; a file already there is kept (it may be the user's edit). Returns the recipes'
    paths there. An unknown name is refused with the list of shipped ones."""
    known = shipped_recipes()
    unknown = [n for n in names if n.removesuffix(".yaml") not in known]
    if unknown:
        raise PeftlabError(f"no shipped recipe named {', '.join(unknown)}; the shipped recipes are: "
                           f"{', '.join(known)} (peftlab recipes lists them)")
    wanted = [n.removesuffix(".yaml") for n in names]
    for name in list(wanted):  # a sweep names its base recipe (relative to the sweep file)
        base = (yaml.safe_load((shipped_dir() / f"{name}.yaml").read_text()) or {}).get("recipe")
        if isinstance(base, str) and Path(base).stem in known and Path(base).stem not in wanted:
            wanted.append(Path(base).stem)
    src = shipped_dir()
    dest = Path(work_dir if work_dir is not None else ".") / "recipes"
    dest.mkdir(parents=True, exist_ok=True)
    files = [src / f"{name}.yaml" for name in wanted] + sorted(p for p in src.glob("*.py") if p.name != "__init__.py")
    for path in files:
        target = dest / path.name
        if target.exists():
            logger.info(f"recipes: kept {target} (already there)")
        else:
            shutil.copyfile(path, target)
            logger.info(f"recipes: wrote {target}")
    return [dest / f"{name}.yaml" for name in wanted]
