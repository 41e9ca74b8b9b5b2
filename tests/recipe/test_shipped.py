"""The shipped recipes (recipes/, installed as peftlab.recipes) from a wheel as from a checkout: the wheel carries
them; ``peftlab quickstart`` from an installed wheel works in the current directory (never in the installation);
a recipe's ``deepspeed:`` may name a shipped config by its bare name."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import subprocess_env, tiny_recipe_dict

from peftlab.engine.deepspeed import deepspeed_json_path
from peftlab.errors import PeftlabError
from peftlab.recipe import shipped
from peftlab.recipe.parse import recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "train.max_steps=1", "--set", "train.eval_at_start=false", "--set", "eval.max_prompts=2",
         "--set", "data.eval_prompts=2", "--set", "eval.show_samples=0"]


def test_a_checkout_finds_its_recipes_in_place():
    assert shipped.shipped_dir().resolve() == REPO / "recipes"
    assert shipped.is_source_checkout()
    assert shipped.quickstart_recipe(None).resolve() == REPO / "recipes" / "quickstart.yaml"
    assert shipped.shipped_deepspeed_configs() == ["zero1", "zero2", "zero2-offload", "zero3", "zero3-offload"]


def test_quickstart_recipe_outside_a_checkout_is_copied_once_then_left_to_the_user(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shipped, "is_source_checkout", lambda recipes=None: False)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="peftlab"):
        first = shipped.quickstart_recipe(None)
        assert first == Path("recipes") / "quickstart.yaml"
        assert first.read_bytes() == (REPO / "recipes" / "quickstart.yaml").read_bytes()
        first.write_text(first.read_text().replace("lr: 4.0e-3", "lr: 1.0e-3"))  # the user's edit
        again = shipped.quickstart_recipe(None)
    assert again == first and "lr: 1.0e-3" in again.read_text()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "quickstart: wrote recipes/quickstart.yaml", "quickstart: training recipes/quickstart.yaml"]
    assert shipped.quickstart_recipe(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "recipes" / "quickstart.yaml"


@pytest.mark.parametrize("name", ["zero3.json", "zero2-offload.json", "zero2"])
def test_deepspeed_may_name_a_shipped_config(tmp_path, name):
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out")
    raw["deepspeed"] = name
    path = deepspeed_json_path(recipe_from_dict(raw, base_dir=tmp_path))
    assert path == shipped.shipped_dir() / "deepspeed" / (name.removesuffix(".json") + ".json")
    rebased = recipe_from_dict(raw, base_dir=tmp_path).with_local_paths_absolute()
    assert rebased.deepspeed == name  # a name stays a name in a copy written elsewhere (peftlab_recipe.yaml)
    if not name.endswith(".json"):
        return
    local = tmp_path / name  # a file of that name next to the recipe is the recipe's own
    local.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_json_path(recipe_from_dict(raw, base_dir=tmp_path)) == local
    assert recipe_from_dict(raw, base_dir=tmp_path).with_local_paths_absolute().deepspeed == str(local)


def test_an_unknown_deepspeed_config_names_the_shipped_ones(tmp_path):
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out")
    raw["deepspeed"] = "zero4.json"
    with pytest.raises(PeftlabError, match=r"deepspeed: zero4.json: no such file .* name one of those shipped with "
                                           r"peftlab: zero1, zero2, zero2-offload, zero3, zero3-offload"):
        deepspeed_json_path(recipe_from_dict(raw, base_dir=tmp_path))
    assert shipped.shipped_deepspeed_config("configs/zero3.json") is None  # a path is a path, never a shipped name
    raw["deepspeed"] = "zero9"
    with pytest.raises(PeftlabError, match=r"deepspeed: Value error, expected the path of a DeepSpeed JSON config, or "
                                           r"the name of one shipped with peftlab: zero1, zero2, zero2-offload, zero3, "
                                           r"zero3-offload"):
        recipe_from_dict(raw, base_dir=tmp_path)


@pytest.mark.slow
def test_quickstart_from_an_installed_wheel_works_in_the_current_directory(tmp_path):
    """The wheel built from this tree, installed into a folder of its own and run from another: the shipped recipes
    are in it, and `peftlab quickstart` writes its recipe, data and run where it is run, not into the installation."""
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("peftlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped_file in ("quickstart.yaml", "make_quickstart_data.py", "deepspeed/zero3.json", "slurm/peftlab.sbatch"):
        assert f"peftlab/recipes/{shipped_file}" in names
    assert not any(n.startswith("peftlab/recipes/data/") for n in names)  # generated data stays out
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    work.mkdir()
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-P", "-m", "peftlab.cli", "quickstart", "--quiet", *QUICK], check=False,
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = site / "peftlab" / "recipes"
    assert sorted(p.name for p in installed.iterdir() if not p.name.startswith("__")) == sorted(
        p.name for p in (REPO / "recipes").iterdir() if p.name not in ("data", "__init__.py", "__pycache__"))
    assert not (installed / "data").exists() and not (site / "peftlab" / "runs").exists()
    assert (work / "recipes" / "quickstart.yaml").read_bytes() == (REPO / "recipes" / "quickstart.yaml").read_bytes()
    assert len((work / "recipes" / "data" / "quickstart" / "train.jsonl").read_text().splitlines()) == 3000
    assert (work / "runs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()


def test_peftlab_recipes_lists_every_shipped_recipe(capsys):
    from peftlab.cli.main import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert [line.split()[0] for line in lines[:-1]] == names
    assert "quickstart              The quickstart: QLoRA on the built-in tiny model, on a generated task with " \
           "checkable answers" in lines
    assert all(len(line) <= 24 + 100 for line in lines[:-1])


def test_peftlab_recipes_copies_a_sweep_with_its_base_and_the_data_scripts(tmp_path, capsys):
    from peftlab.cli.main import main

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "classify-quickstart.yaml").write_text("# mine\n")  # the user's: kept
    assert main(["recipes", "sweep-quickstart", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "recipes" / "sweep-quickstart.yaml"),
                                               str(tmp_path / "recipes" / "classify-quickstart.yaml")]
    copied = sorted(p.name for p in (tmp_path / "recipes").iterdir())
    scripts = sorted(p.name for p in (REPO / "recipes").glob("*.py") if p.name != "__init__.py")
    assert copied == sorted(["sweep-quickstart.yaml", "classify-quickstart.yaml", *scripts])
    assert (tmp_path / "recipes" / "classify-quickstart.yaml").read_text() == "# mine\n"
    assert (tmp_path / "recipes" / "sweep-quickstart.yaml").read_bytes() == \
        (REPO / "recipes" / "sweep-quickstart.yaml").read_bytes()
    assert main(["recipes", "sweep-quickstart", "nope", "--dir", str(tmp_path / "x")]) == 2
    assert "no shipped recipe named nope; the shipped recipes are: augment-quickstart, " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written
