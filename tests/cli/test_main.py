"""The command line itself (peftlab/cli/main.py): every command is there, a user error is one message and exit
status 2 (a traceback only with PEFTLAB_DEBUG=1), an interrupt exits 130, and messages go where they should:
--quiet and PEFTLAB_LOG_LEVEL set how much is said, and commands whose stdout is their product keep messages
on stderr. (That importing the CLI loads no torch is tests/engine/test_cpu_threads.py.)"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest
import yaml

from peftlab.cli import main as cli
from peftlab.errors import PeftlabError

COMMANDS = ["train", "eval", "sweep", "predict", "generate", "data", "distill-cache", "estimate", "quickstart",
            "recipes", "merge", "export", "launch"]
log = logging.getLogger("peftlab.cli.test")


@pytest.fixture(autouse=True)
def restore_console():
    logger = logging.getLogger("peftlab")
    saved = (logger.level, [(h, getattr(h, "messages_to_stderr", None)) for h in logger.handlers])
    yield
    logger.setLevel(saved[0])
    for handler, flag in saved[1]:
        if flag is not None:
            handler.messages_to_stderr = flag


def _speaking(args: argparse.Namespace) -> int:
    """A command that produces a line of output and says one thing of each level."""
    log.info("a progress note")
    log.warning("a warning")
    print("the product")
    return 0


def test_every_command_is_there(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "{" + ",".join(COMMANDS) + "}" in capsys.readouterr().out.replace("\n", "").replace(" ", "")
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: peftlab {command} ")


def test_a_user_error_is_one_message_and_status_2(tmp_path):
    """Through `python -m peftlab.cli` (the module entry point)."""
    bad = tmp_path / "recipe.yaml"
    bad.write_text(yaml.safe_dump({"data": {"train": ["t.jsonl"]}, "train": {"lr_rate": 1}}))
    proc = subprocess.run([sys.executable, "-P", "-m", "peftlab.cli", "train", str(bad)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"peftlab: error: invalid recipe {bad}:\n  train.lr_rate: unknown key")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_debug_shows_the_traceback_and_an_interrupt_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTLAB_DEBUG", "1")
    with pytest.raises(PeftlabError, match="recipe file not found"):
        cli.main(["estimate", str(tmp_path / "absent.yaml")])
    monkeypatch.delenv("PEFTLAB_DEBUG")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_estimate", interrupted)
    assert cli.main(["estimate", "r.yaml"]) == 130
    assert capsys.readouterr().err == "peftlab: interrupted\n"


@pytest.mark.parametrize("command, argv, out, err", [
    ("cmd_train", ["train", "r.yaml"], "a progress note\nthe product\n", "peftlab: warning: a warning\n"),
    ("cmd_train", ["train", "r.yaml", "--quiet"], "the product\n", "peftlab: warning: a warning\n"),
    ("cmd_generate", ["generate", "--prompt", "x"], "the product\n",
     "a progress note\npeftlab: warning: a warning\n"),
    ("cmd_eval", ["eval", "dir"], "the product\n", "a progress note\npeftlab: warning: a warning\n"),
    ("cmd_estimate", ["estimate", "r.yaml", "--json"], "the product\n",
     "a progress note\npeftlab: warning: a warning\n"),
    ("cmd_data", ["data", "r.yaml"], "the product\n", "a progress note\npeftlab: warning: a warning\n"),
])
def test_where_messages_go(monkeypatch, capsys, command, argv, out, err):
    monkeypatch.delenv("PEFTLAB_LOG_LEVEL", raising=False)
    monkeypatch.setattr(cli, command, _speaking)
    assert cli.main(argv) == 0
    assert capsys.readouterr() == (out, err)


def test_peftlab_log_level_wins_over_quiet(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_train", _speaking)
    monkeypatch.setenv("PEFTLAB_LOG_LEVEL", "info")
    assert cli.main(["train", "r.yaml", "--quiet"]) == 0
    assert capsys.readouterr().out == "a progress note\nthe product\n"
    monkeypatch.setenv("PEFTLAB_LOG_LEVEL", "error")
    assert cli.main(["train", "r.yaml"]) == 0
    assert capsys.readouterr() == ("the product\n", "")
