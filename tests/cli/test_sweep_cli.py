"""``peftlab sweep --help``: what the sweep file holds and how trials are ranked, pointing at documentation that
exists (README.md's "Sweeps" section)."""
from __future__ import annotations

import re

import pytest
from helpers import REPO

from peftlab.cli import main as cli


def test_sweep_help_names_the_default_metric_and_existing_documentation(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "--help"])
    assert exit_.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "default eval_loss; eval_rewards/accuracies for a preference recipe" in said
    docs = re.findall(r"[\w/.-]+\.md", said)
    assert docs == ["README.md"] and (REPO / "README.md").is_file()
    assert "### Sweeps" in (REPO / "README.md").read_text() and "'Sweeps'" in said
