"""The console: every message through the ``peftlab`` logger — INFO to stdout, warnings to stderr with their
prefix, only rank 0 speaking unless PEFTLAB_LOG_ALL_RANKS=1, one verbosity switch that PEFTLAB_LOG_LEVEL
overrides, and an application's own logging configuration left alone."""
from __future__ import annotations

import logging

import pytest

from peftlab.errors import PeftlabError
from peftlab.metrics import console

child = logging.getLogger("peftlab.trainer.loop")  # what a module's logging.getLogger(__name__) returns


def test_info_to_stdout_warnings_and_errors_to_stderr(capsys):
    console.setup_logging()
    child.info("step 3/10 loss 1.25")
    child.warning("loss spike at step 3")
    child.error("disk full")
    child.debug("not shown at info")
    out, err = capsys.readouterr()
    assert out == "step 3/10 loss 1.25\n"
    assert err == "peftlab: warning: loss spike at step 3\npeftlab: error: disk full\n"


def test_only_rank_zero_speaks(capsys, monkeypatch):
    console.setup_logging()
    monkeypatch.setenv("RANK", "1")
    child.info("from rank 1")
    child.warning("from rank 1")
    assert capsys.readouterr() == ("", "")
    assert not console.info_enabled()
    monkeypatch.setenv("RANK", "0")
    child.info("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    assert console.info_enabled()


def test_all_ranks_speak_each_line_prefixed(capsys, monkeypatch):
    console.setup_logging()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv(console.ALL_RANKS_ENV, "1")
    child.info("joined")
    child.warning("slow node")
    out, err = capsys.readouterr()
    assert (out, err) == ("[rank 3] joined\n", "[rank 3] peftlab: warning: slow node\n")
    assert console.info_enabled()


@pytest.mark.parametrize("env, asked, info_shown, debug_shown", [
    ("warning", "info", False, False),  # the environment wins over --quiet's absence
    ("debug", "warning", True, True),   # ... and over --quiet
    ("", "warning", False, False),      # empty: the command's choice
    ("", None, True, False),            # default: info
])
def test_peftlab_log_level_wins(capsys, monkeypatch, env, asked, info_shown, debug_shown):
    monkeypatch.setenv(console.LEVEL_ENV, env)
    console.setup_logging(asked)
    child.info("info line")
    child.debug("debug line")
    child.warning("warning line")
    out, err = capsys.readouterr()
    assert ("info line" in out, "debug line" in out) == (info_shown, debug_shown)
    assert err == "peftlab: warning: warning line\n"  # warnings are never silenced by the level switch


def test_a_bad_level_names_the_variable(monkeypatch):
    monkeypatch.setenv(console.LEVEL_ENV, "loud")
    with pytest.raises(PeftlabError, match="log level 'loud': use debug, info, warning or error .PEFTLAB_LOG_LEVEL"):
        console.setup_logging()


def test_set_up_twice_one_handler_and_messages_to_stderr(fresh_logger, capsys):
    console.setup_logging("warning")
    console.setup_logging("info", messages_to_stderr=True)  # peftlab eval: stdout holds only the JSON
    assert len(fresh_logger.handlers) == 1 and fresh_logger.level == logging.INFO
    child.info("evaluating adapter")
    assert capsys.readouterr() == ("", "evaluating adapter\n")
    console.setup_logging("info")
    child.info("training")
    assert capsys.readouterr() == ("training\n", "")


def test_ensure_logging_keeps_an_applications_handler_and_quiet_lasts_for_the_call(fresh_logger, capsys):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    fresh_logger.setLevel(logging.INFO)
    fresh_logger.addHandler(Collect())
    console.ensure_logging()
    assert len(fresh_logger.handlers) == 1 and fresh_logger.level == logging.INFO
    child.info("to the application")
    assert records == ["to the application"] and capsys.readouterr() == ("", "")
    with console.quiet_logging(True):  # the application's handler hears warnings only during the call
        child.info("dropped")
        child.warning("kept")
    child.info("heard again")
    assert records == ["to the application", "kept", "heard again"] and len(fresh_logger.handlers) == 1
    assert capsys.readouterr() == ("", "")


def test_ensure_logging_sets_up_the_console_once_when_nothing_is(fresh_logger, capsys):
    console.ensure_logging()
    child.info("library entry point")
    assert capsys.readouterr().out == "library entry point\n"
    console.ensure_logging()  # a second entry point adds no second handler: each line once
    child.info("said once")
    assert capsys.readouterr().out == "said once\n"


def test_progress_bar_shown_where_info_is(capsys, monkeypatch):
    console.setup_logging("info", messages_to_stderr=True)
    with console.progress(3, desc="train") as bar:
        assert not bar.disable
        bar.update(3)
    out, err = capsys.readouterr()
    assert out == "" and "train" in err and "3/3" in err
    monkeypatch.setenv("RANK", "2")
    assert console.progress(3, desc="train").disable
    monkeypatch.setenv("RANK", "0")
    console.setup_logging("warning")
    assert console.progress(3, desc="train").disable
