"""Training-time text augmentation (recipe ``augment:``), applied on the fly, different at every epoch.

What changes: the *inputs* only — user turns of chat rows (never system or assistant turns), the prompt of
prompt/completion rows, the text of classification/regression rows. Labels, assistant tokens and their loss
masks are never touched; eval data never is (only the trainer's train batches are augmented). Plain-text
rows (continued pre-training: every token is a target) are refused.

Reproducible: the random draws of training row ``i`` at epoch ``e`` come from ``Random("augment:seed:e:i")``
alone, so a run resumed mid-epoch builds exactly the batches it would have built, whatever came before.

The data pipeline tokenizes (and caches) the un-augmented rows once; :class:`Augmenter` keeps the canonical
records of the training rows (read again from the sources, no tokenization) and, for each micro-batch,
augments them and re-tokenizes them with the run's own :class:`~peftlab.data.tokenize.Encoder`. An augmented
chat/completion row whose trained tokens differ from the original's (a tokenizer merging across the turn
boundary, a truncation cutting elsewhere) or that no longer fits ``data.max_seq_len`` under
``overlength: drop`` is replaced by its original: the guarantee is checked on every row, not assumed.

Methods (each a probability per word; applied in this order): synonym (a lexicon, :mod:`.lexicon`),
word_insertion (a copy of a random word of the same text), word_swap, word_deletion, char_noise (one
keyboard-neighbour typo in the word).
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.data.build import DataBundle, open_sources, read_records, sample_id, unique_names
from peftlab.data.config import DataConfig
from peftlab.data.lexicon import moby_lexicon
from peftlab.data.preview import mark_trained
from peftlab.data.stats import DatasetStats
from peftlab.data.tokenize import IGNORE_INDEX, Encoded, EncodedClass, Encoder
from peftlab.errors import PeftlabError
from peftlab.recipe.augmentation import METHODS, AugmentConfig

logger = logging.getLogger(__name__)
Synonyms = Callable[[str], Sequence[str]]

_ROWS = (("qwertyuiop", 0.0), ("asdfghjkl", 0.25), ("zxcvbnm", 0.75))  # letter rows and their stagger, in keys


def _keyboard_neighbours() -> dict[str, str]:
    """Letter -> the letters touching its key on a QWERTY keyboard: left/right, and the keys of the rows above
    and below that overlap it (``g``: t y f h v b)."""
    pos = {c: (r, k + shift) for r, (row, shift) in enumerate(_ROWS) for k, c in enumerate(row)}
    out = {}
    for c, (r, x) in pos.items():
        out[c] = "".join(d for d, (r2, x2) in pos.items()
                         if d != c and ((r2 == r and abs(x2 - x) == 1) or (abs(r2 - r) == 1 and abs(x2 - x) < 1)))
    return out


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()
_WORD = re.compile(r"(\S+)(\s*)")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation


def rng_for(seed: int, epoch: int, row: int) -> random.Random:
    """The random draws of training row ``row`` at ``epoch`` (string seeds hash with SHA-512: same everywhere)."""
    return random.Random(f"augment:{seed}:{epoch}:{row}")


def typo(word: str, rng: random.Random) -> str:
    """``word`` with one letter replaced by a keyboard neighbour (case kept); unchanged if it has no letter."""
    letters = [k for k, c in enumerate(word) if c.lower() in KEYBOARD_NEIGHBOURS]
    if not letters:
        return word
    k = rng.choice(letters)
    new = rng.choice(KEYBOARD_NEIGHBOURS[word[k].lower()])
    return word[:k] + (new.upper() if word[k].isupper() else new) + word[k + 1:]


def _synonym(word: str, synonyms: Synonyms, rng: random.Random) -> str | None:
    lead, core, trail = _CORE.match(word).groups()  # type: ignore[union-attr]
    if not core.isalpha():
        return None
    options = synonyms(core.lower())
    if not options:
        return None
    new = rng.choice(list(options))
    if core.isupper() and len(core) > 1:
        new = new.upper()
    elif core[0].isupper():
        new = new[0].upper() + new[1:]
    return lead + new + trail


def augment_text(text: str, cfg: AugmentConfig, rng: random.Random, synonyms: Synonyms | None = None) -> str:
    """``text`` with the configured word/character edits; whitespace between the words that stay is kept."""
    lead = text[:len(text) - len(text.lstrip())]
    pairs = [[m.group(1), m.group(2)] for m in _WORD.finditer(text)]  # [word, the whitespace after it]
    if not pairs:
        return text
    originals = [w for w, _ in pairs]
    if cfg.synonym and synonyms is not None:
        for p in pairs:
            if rng.random() < cfg.synonym:
                p[0] = _synonym(p[0], synonyms, rng) or p[0]
    if cfg.word_insertion:
        out = []
        for p in pairs:
            out.append(p)
            if rng.random() < cfg.word_insertion:  # the copy takes p's separator, a space goes between
                out.append([rng.choice(originals), p[1]])
                p[1] = " "
        pairs = out
    if cfg.word_swap and len(pairs) > 1:
        for k in range(len(pairs)):
            if rng.random() < cfg.word_swap:
                j = rng.randrange(len(pairs) - 1)
                j += j >= k  # another word than k
                pairs[k][0], pairs[j][0] = pairs[j][0], pairs[k][0]
    if cfg.word_deletion and len(pairs) > 1:
        kept: list[list[str]] = []
        for p in pairs:
            if rng.random() >= cfg.word_deletion:
                kept.append(p)
            elif kept and "\n" in p[1]:  # a line break after a dropped word stays
                kept[-1][1] = p[1]
        pairs = kept or [rng.choice(pairs)]
    if cfg.char_noise:
        for p in pairs:
            if rng.random() < cfg.char_noise:
                p[0] = typo(p[0], rng)
    body = "".join(w + s for w, s in pairs)
    trailing = text[len(text.rstrip()):]
    return lead + body.rstrip() + trailing


def augment_record(record: dict[str, Any], cfg: AugmentConfig, rng: random.Random,
                   synonyms: Synonyms | None = None) -> dict[str, Any]:
    """A copy of a canonical record with its inputs augmented (user turns / prompt / classification text)."""
    kind = record["kind"]
    if kind == "chat":
        messages = [{**m, "content": augment_text(m["content"], cfg, rng, synonyms)}
                    if m["role"] == "user" and isinstance(m.get("content"), str) else m
                    for m in record["messages"]]
        return {**record, "messages": messages}
    if kind == "completion":
        return {**record, "prompt": augment_text(record["prompt"], cfg, rng, synonyms)}
    if kind == "classification":
        return {**record, "text": augment_text(record["text"], cfg, rng, synonyms)}
    raise ValueError(f"no augmentable input in a {kind!r} record")


def _trained(labels: Sequence[int]) -> list[int]:
    return [x for x in labels if x != IGNORE_INDEX]


@dataclass
class Augmenter:
    """Train examples of a micro-batch -> the same examples augmented for an epoch (see the module docstring)."""

    cfg: AugmentConfig
    seed: int
    records: dict[int, dict[str, Any]]        # sample_id -> canonical record of each training row
    encoder: Encoder
    max_seq_len: int
    overlength: str = "truncate"
    synonyms: Synonyms | None = None
    kept_original: int = field(default=0)     # rows served un-augmented (the checks above refused the edit)
    served: int = field(default=0)

    def augment(self, examples: Sequence[dict[str, Any]], rows: Sequence[int], epoch: int) -> list[dict[str, Any]]:
        """``examples[k]`` is training row ``rows[k]``; returns new dicts (the cached rows are never modified)."""
        records = [augment_record(self.records[ex["sample_id"]], self.cfg, rng_for(self.seed, epoch, row),
                                  self.synonyms) for ex, row in zip(examples, rows)]
        kept_before = self.kept_original
        out = [self._checked(ex, enc) for ex, enc in zip(examples, self.encoder.encode_batch(records))]
        if self.served == 0 and self.kept_original - kept_before == len(out):  # said once, on the first batch
            logger.warning("augment: no row of the first batch could be augmented (each changed its trained "
                           "tokens or outgrew data.max_seq_len), so they are trained as they are; check the data "
                           "with `peftlab data RECIPE`")
        self.served += len(out)
        return out

    def _checked(self, ex: dict[str, Any], enc: Any) -> dict[str, Any]:
        if isinstance(enc, EncodedClass):
            ids = enc.input_ids
            if len(ids) > self.max_seq_len:
                if self.overlength == "drop":
                    return self._original(ex)
                ids = ids[:self.max_seq_len]
            return {**ex, "input_ids": ids}  # ex["label"] is the mapped label: it never changes
        if not isinstance(enc, Encoded):  # BadRow: e.g. a template that rejects the edited text
            return self._original(ex)
        ids, labels = enc.input_ids, enc.labels
        if len(ids) > self.max_seq_len:
            if self.overlength == "drop":
                return self._original(ex)
            ids, labels = ids[:self.max_seq_len], labels[:self.max_seq_len]
        if _trained(labels) != _trained(ex["labels"]):
            return self._original(ex)
        return {**ex, "input_ids": ids, "labels": labels}

    def _original(self, ex: dict[str, Any]) -> dict[str, Any]:
        self.kept_original += 1
        return ex


def training_records(cfg: DataConfig, base_dir: Path | None) -> dict[int, dict[str, Any]]:
    """sample_id -> canonical record of every row of the training datasets (bad rows as the pipeline treats them).

    Eval datasets are not read; rows ``eval_split`` holds out are read but never looked up (no training
    example carries their sample id).
    """
    names = unique_names([*cfg.train, *cfg.eval])
    train_sources, _ = open_sources(cfg, base_dir)
    out: dict[int, dict[str, Any]] = {}
    for i, (spec, src) in enumerate(zip(cfg.train, train_sources)):
        key = f"data.train[{i}]"
        for item in read_records(src, spec, names[i], cfg, DatasetStats(names[i]), key):
            if item.record["kind"] == "text":
                raise PeftlabError(
                    f"{item.where}: augment applies to inputs (user turns, prompts, classification texts) and "
                    f"dataset {names[i]!r} ({key}) is plain text, where every token is a training target; remove "
                    "augment, or give the data as prompt/completion or chat rows")
            out[sample_id(i, item.row)] = item.record
    return out


def build_augmenter(cfg: AugmentConfig | None, data: DataConfig, tokenizer: Any, *, seed: int,
                    base_dir: Path | None = None, synonyms: Synonyms | None = None) -> Augmenter | None:
    """The run's augmenter (None without an ``augment:`` section). ``synonyms`` defaults to the Moby lexicon
    when ``augment.synonym`` is set (an error naming the install command when it is missing)."""
    if cfg is None:
        return None
    if cfg.synonym and synonyms is None:
        synonyms = moby_lexicon().synonyms
    encoder = Encoder(tokenizer, template=data.template, train_on=data.train_on, system_prompt=data.system_prompt)
    return Augmenter(cfg, seed, training_records(data, base_dir), encoder, data.max_seq_len, data.overlength,
                     synonyms)


def describe(cfg: AugmentConfig) -> str:
    """``word_deletion=0.1, char_noise=0.05`` (the methods that are on)."""
    return ", ".join(f"{m}={getattr(cfg, m):g}" for m in METHODS if getattr(cfg, m))


def render_augmented(bundle: DataBundle, augmenter: Augmenter, tokenizer: Any, n: int = 3, epochs: int = 2, *,
                     color: bool = False) -> str:
    """``peftlab data`` with an ``augment:`` section: the first ``n`` training rows as tokenized, then as the
    first ``epochs`` epochs will see them (trained tokens marked as in the plain preview)."""
    rows = list(range(min(n, len(bundle.train))))
    originals = [bundle.train[i] for i in rows]
    views = [augmenter.augment(originals, rows, e) for e in range(epochs)]
    parts = [f"augmented training inputs ({describe(augmenter.cfg)}); eval data is never augmented"]
    for k, ex in enumerate(originals):
        for tag, shown in [("as tokenized", ex), *[(f"epoch {e}", v[k]) for e, v in enumerate(views)]]:
            if "label" in shown:
                body = tokenizer.decode(shown["input_ids"], skip_special_tokens=False)
                parts.append(f"--- row {rows[k]}, {tag} (label {shown['label']})\n{body}")
            else:
                parts.append(f"--- row {rows[k]}, {tag}\n" + mark_trained(shown["input_ids"], shown["labels"], tokenizer,
                                                                           color=color))
    return "\n".join(parts)
