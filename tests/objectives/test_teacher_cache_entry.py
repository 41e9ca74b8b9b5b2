"""``build_teacher_cache`` (``peftlab distill-cache``): quiet for the build only (the ``peftlab`` logger's
level is restored afterwards, so an application's later calls still speak); a streaming recipe is refused."""
from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest

from peftlab.errors import PeftlabError

teacher_cache = importlib.import_module("peftlab.objectives.teacher_cache")


def test_quiet_lasts_for_the_build_only(monkeypatch, tmp_path):
    logger = logging.getLogger("peftlab")
    handler = logging.NullHandler()
    logger.addHandler(handler)  # an application's own console
    old = logger.level
    logger.setLevel(logging.INFO)
    seen = []
    monkeypatch.setattr(teacher_cache, "_build_teacher_cache",
                        lambda recipe, **kw: seen.append(logger.getEffectiveLevel()) or tmp_path)
    try:
        assert teacher_cache.build_teacher_cache(object(), quiet=True) == tmp_path
        assert seen == [logging.WARNING] and logger.level == logging.INFO
        teacher_cache.build_teacher_cache(object())
        assert seen[-1] == logging.INFO
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_a_streaming_recipe_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(teacher_cache, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    recipe = SimpleNamespace(distill=SimpleNamespace(), data=SimpleNamespace(streaming=True))
    with pytest.raises(PeftlabError, match=r"^distill-cache: data.streaming: true has no row indices .* set "
                                           r"data.streaming: false \(or train with distill.mode: online\)$"):
        teacher_cache.build_teacher_cache(recipe)
