"""``quiet`` is per call (peftlab/metrics/console.py ``quiet_logging``, used by the Trainer): warnings only while a
quiet run builds and trains, and the ``peftlab`` logger's level as it was afterwards, so one
``train(recipe, quiet=True)`` does not silence the INFO of an application's later calls."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from peftlab.metrics import console
from peftlab.trainer import loop

child = logging.getLogger("peftlab.trainer.loop")


def test_quiet_lasts_for_the_call_and_never_lowers_a_level(fresh_logger, capsys):
    console.setup_logging("info")
    with console.quiet_logging(True):
        child.info("dropped")
        child.warning("kept")
    child.info("heard again")
    assert capsys.readouterr() == ("heard again\n", "peftlab: warning: kept\n")
    assert fresh_logger.level == logging.INFO
    console.setup_logging("error")
    with console.quiet_logging(True):  # quiet never lowers a level
        assert fresh_logger.level == logging.ERROR
    with console.quiet_logging(False):
        child.info("not at error")
    assert capsys.readouterr() == ("", "") and fresh_logger.level == logging.ERROR


def test_a_first_quiet_call_sets_up_the_console_at_info_for_later_calls(fresh_logger, capsys):
    with console.quiet_logging(True):
        child.info("dropped")
    child.info("a later call speaks")
    assert capsys.readouterr().out == "a later call speaks\n"


def test_the_trainer_is_quiet_while_it_builds_and_trains_and_restores_the_level(fresh_logger, monkeypatch, tmp_path):
    console.setup_logging("info")
    levels: list[int] = []

    def check_streaming(recipe):  # the first thing a Trainer builds: stop there, after noting the level
        levels.append(fresh_logger.level)
        raise RuntimeError("stop building")

    monkeypatch.setattr(loop.setup, "check_streaming", check_streaming)
    with pytest.raises(RuntimeError, match="stop building"):
        loop.Trainer(SimpleNamespace(train=None), quiet=True)
    assert levels == [logging.WARNING] and fresh_logger.level == logging.INFO
    trainer = object.__new__(loop.Trainer)
    trainer.quiet, trainer.out_dir = True, tmp_path
    trainer.engine = SimpleNamespace(close=lambda: None)  # train() closes its engine
    trainer._train = lambda: fresh_logger.level
    assert trainer.train() == logging.WARNING and fresh_logger.level == logging.INFO
    trainer.quiet = False
    assert trainer.train() == logging.INFO


def test_quiet_turns_transformers_progress_bars_off_for_the_call_only(fresh_logger):
    """transformers' bars ("Loading weights") would print through a quiet call; they are off for it and back after,
    and an application that turned them off keeps them off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()  # HF_HUB_DISABLE_PROGRESS_BARS may have turned them off
    hf_logging.enable_progress_bar()
    try:
        with console.quiet_logging(True):
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        with console.quiet_logging(False):
            assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        with console.quiet_logging(True):
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
