"""The README documents what exists: the recipe reference is the schema, the commands are real."""
from __future__ import annotations

from pathlib import Path

from peftlab.cli.main import build_parser
from peftlab.recipe.schema import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_reference_matches_the_schema():
    text = README.read_text()
    start, end = "<!-- recipe-reference:start -->\n", "\n<!-- recipe-reference:end -->"
    assert start in text and end in text
    documented = text.split(start, 1)[1].split(end, 1)[0]
    assert documented == reference_markdown(), (
        "README.md's recipe reference is stale: regenerate it with "
        "`python -P -c 'from peftlab.recipe.schema import reference_markdown; print(reference_markdown())'`")


def test_readme_shows_the_two_commands_and_every_cli_subcommand():
    text = README.read_text()
    assert "make quickstart" in text and "make test" in text
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"peftlab {name}" not in text]
    assert not missing, f"subcommands without README usage: {missing}"
