"""The tokenizer of a GGUF export: tokens, scores and token types as llama.cpp's tokenizers read them.

llama.cpp has two tokenizers for Llama-architecture models, named by ``tokenizer.ggml.model``:

- ``llama`` (SentencePiece: Llama-2, Mistral, TinyLlama, llama2.c models). It splits text into
  characters and repeatedly merges the adjacent pair whose concatenation is the vocabulary entry
  with the highest **score**. The scores are therefore the merge order: placeholder scores (the
  gguf package's ``LlamaHfVocab`` writes -1000 for every token) make it merge in an arbitrary order
  and tokenize most texts differently from training. Token **types** say which entries are control
  tokens (never produced from text), the unknown token, byte-fallback tokens ``<0xNN>`` and
  user-defined tokens (matched whole).
- ``gpt2`` (byte-level BPE: Llama-3, the built-in models). Scores are unused; merges are written
  separately (``SpecialVocab``).

Where the SentencePiece numbers come from, as llama.cpp's ``convert_hf_to_gguf.py`` takes them:

1. ``tokenizer.model`` (the SentencePiece model proto): every piece's score and type as written
   by SentencePiece. Parsed here from the protobuf wire format (three fields of one message), so
   neither the ``sentencepiece`` package nor generated protobuf code is needed.
2. Only ``tokenizer.json`` (what transformers 5 saves, so what a merged directory holds): for a BPE
   model with byte fallback, the merges list is the merge order, so a token's score is minus the
   rank of the first merge that produces it (tokens no merge produces: 0, like SentencePiece's
   control and byte pieces); for a Unigram model, the scores stored with the vocabulary.

Added tokens (``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s
``added_tokens_decoder``) are CONTROL when special, else USER_DEFINED, with score -1000, as
llama.cpp's converter writes them; the list is padded to the embedding rows with ``[PAD{i}]``.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

# GGUF token types (gguf.TokenType; SentencePiece's ModelProto.SentencePiece.Type uses the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_TOKEN_SCORE = -1000.0  # llama.cpp's converter gives added and padding tokens this score
SPM_UNIGRAM, SPM_BPE = 1, 2  # TrainerSpec.model_type
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` needs except the special ids, merges and chat template."""

    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    pre: str  # tokenizer.ggml.pre
    add_space_prefix: bool | None  # None: not stated (llama.cpp's default for the model applies)
    source: str  # where the scores and types came from, in words
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# SentencePiece model proto


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int  # SPM_UNIGRAM | SPM_BPE | 3 (word) | 4 (char)
    add_dummy_prefix: bool
    normalizer: str  # the normalization rule's name ("identity" for Llama-2 and Mistral)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:  # groups (3, 4) are not used by sentencepiece_model.proto
            raise ValueError(f"field {number}: unexpected wire type {wire}")
        if i > end:
            raise ValueError("truncated message")
        yield number, wire, value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """The pieces (text, score, type) and the settings llama.cpp depends on, from a ``tokenizer.model``.

    ModelProto: ``pieces`` = 1 (repeated SentencePiece: piece = 1, score = 2 (float), type = 3
    (enum, default NORMAL)), ``trainer_spec`` = 2 (model_type = 3, default UNIGRAM),
    ``normalizer_spec`` = 3 (name = 1, add_dummy_prefix = 3, default true).
    """
    path = Path(path)
    buf = path.read_bytes()
    pieces: list[tuple[str, float, int]] = []
    model_type, add_dummy_prefix, normalizer = SPM_UNIGRAM, True, ""
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 2:
                text, score, kind = None, 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        text = bytes(v).decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = v
                if text is None or not NORMAL <= kind <= BYTE:
                    raise ValueError(f"piece {len(pieces)} has no text or an unknown type {kind}")
                pieces.append((text, score, kind))
            elif number == 2 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 3 and w == 0:
                        model_type = v
            elif number == 3 and wire == 2:
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        normalizer = bytes(v).decode("utf-8")
                    elif n == 3 and w == 0:
                        add_dummy_prefix = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise PeftlabError(f"{path}: not a readable SentencePiece model ({exc}); GGUF export reads the "
                           "tokenizer's scores from it. Remove the file if it does not belong to the "
                           "tokenizer (tokenizer.json is used then).") from None
    if not pieces:
        raise PeftlabError(f"{path}: no SentencePiece pieces in the file; it is not a tokenizer.model")
    return SentencePieceModel(pieces, model_type, add_dummy_prefix, normalizer)


# --------------------------------------------------------------------------------------------------
# tokenizer.json


def _bpe_merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """Score of each token a BPE merge produces: minus the rank of the first merge that makes it.

    llama.cpp merges the pair whose result scores highest, transformers' BPE the pair ranked first;
    with these scores both apply the same merge order.
    """
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _add_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the HF tokenizer puts "▁" before the text (a Prepend normalizer or a prefixing Metaspace)."""
    def parts(section: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not section:
            return []
        return list(section.get(key) or []) if section.get("type") == "Sequence" else [section]

    for norm in parts(tokenizer_json.get("normalizer"), "normalizers"):
        if norm.get("type") == "Prepend" and norm.get("prepend") == "\u2581":
            return True
    for pre in parts(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") == "Metaspace":
            scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
            return scheme != "never"
    return False


def _added_tokens(model_dir: Path, tokenizer_json: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokenizer's added tokens (tokenizer.json, then tokenizer_config.json)."""
    added: dict[int, tuple[str, bool]] = {}
    for item in (tokenizer_json or {}).get("added_tokens") or []:
        added[int(item["id"])] = (item["content"], bool(item.get("special")))
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        for key, item in decoder.items():
            added.setdefault(int(key), (item["content"], bool(item.get("special"))))
    return added


def _config_token(model_dir: Path, key: str) -> str | None:
    """A special token's text from tokenizer_config.json (a string or an AddedToken dict)."""
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text(encoding="utf-8")).get(key)
    return value.get("content") if isinstance(value, dict) else value


# --------------------------------------------------------------------------------------------------
# the vocabulary


def _assemble(base: dict[int, tuple[str, float, int]], added: dict[int, tuple[str, bool]], *, spm: bool,
              vocab_size: int, where: Path) -> tuple[list[bytes], list[float], list[int]]:
    """One list of (text, score, type) by id: the base vocabulary, the added tokens over it, padding."""
    entries = dict(base)
    for tid, (text, special) in added.items():
        if tid in entries and entries[tid][0] == text:
            if special and entries[tid][2] in (NORMAL, USER_DEFINED):
                entries[tid] = (text, entries[tid][1], CONTROL)
            continue
        if not special and spm:
            # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
            text = text.replace("\u2581", " ")
        entries[tid] = (text, ADDED_TOKEN_SCORE, CONTROL if special else USER_DEFINED)
    top = max(entries) + 1 if entries else 0
    if top > vocab_size:
        raise PeftlabError(f"{where}: the tokenizer has {top} tokens but the model only {vocab_size} embedding "
                           "rows; the tokenizer does not belong to this model (resize the embeddings when "
                           "adding tokens)")
    tokens, scores, types = [], [], []
    for tid in range(vocab_size):
        text, score, kind = entries.get(tid, (f"[PAD{tid}]", ADDED_TOKEN_SCORE, UNUSED))
        tokens.append(text.encode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    return tokens, scores, types


def _check_same_ids(spm: SentencePieceModel, tokenizer_json: dict[str, Any]) -> str | None:
    """None when tokenizer.model and tokenizer.json number the vocabulary alike, else the first difference."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        ids = vocab.items()
    elif isinstance(vocab, list):
        ids = ((entry[0], i) for i, entry in enumerate(vocab))
    else:
        return "tokenizer.json has no model vocabulary"
    pieces = spm.pieces
    for text, tid in ids:
        if tid >= len(pieces) or pieces[tid][0] != text:
            return f"token {text!r} is id {tid} in tokenizer.json but not in tokenizer.model"
    return None


def read_vocab(model_dir: str | Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer in ``model_dir``, padded to ``vocab_size`` embedding rows."""
    model_dir = Path(model_dir)
    tj_file, spm_file = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tokenizer_json = json.loads(tj_file.read_text(encoding="utf-8")) if tj_file.is_file() else None
    model = (tokenizer_json or {}).get("model") or {}
    decoder = (tokenizer_json or {}).get("decoder") or {}
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"
    if tokenizer_json is not None and byte_level:
        return _byte_level_vocab(model_dir, tokenizer_json, vocab_size)
    if tokenizer_json is None and not spm_file.is_file():
        if (model_dir / "vocab.json").is_file():
            return _byte_level_vocab(model_dir, None, vocab_size)
        raise PeftlabError(f"{model_dir} has no tokenizer.json or tokenizer.model; GGUF export embeds the tokenizer "
                           "and reads it from there (save it with AutoTokenizer.from_pretrained(...)"
                           ".save_pretrained(dir))")
    added = _added_tokens(model_dir, tokenizer_json)
    notes: list[str] = []
    if spm_file.is_file():
        spm = read_sentencepiece_model(spm_file)
        mismatch = _check_same_ids(spm, tokenizer_json) if tokenizer_json is not None else None
        if mismatch is None:
            base = {i: piece for i, piece in enumerate(spm.pieces)}
            tokens, scores, types = _assemble(base, added, spm=True, vocab_size=vocab_size, where=model_dir)
            if spm.model_type == SPM_UNIGRAM:
                notes.append("SentencePiece unigram vocabulary: llama.cpp's 'llama' tokenizer merges by score and "
                             "may split some texts differently from SentencePiece (check tokenization)")
            if spm.normalizer not in ("", "identity"):
                notes.append(f"the SentencePiece model normalizes text ({spm.normalizer}); llama.cpp does not")
            prefix = _add_space_prefix(tokenizer_json) if tokenizer_json is not None else spm.add_dummy_prefix
            return Vocab("llama", tokens, scores, types, "default", prefix, "tokenizer.model", notes)
        if tokenizer_json is None or model.get("type") not in ("BPE", "Unigram"):
            raise PeftlabError(f"{spm_file}: {mismatch}")
        notes.append(f"tokenizer.model ignored: it does not match tokenizer.json ({mismatch}); "
                     "scores taken from tokenizer.json")
    kind = model.get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        merge_scores = _bpe_merge_scores(model)
        unk = model.get("unk_token") or _config_token(model_dir, "unk_token")  # transformers 5 saves it null
        base = {}
        for text, tid in model["vocab"].items():
            ttype = UNKNOWN if text == unk else BYTE if _BYTE_TOKEN.fullmatch(text) else NORMAL
            base[int(tid)] = (text, merge_scores.get(text, 0.0), ttype)
        source = "tokenizer.json BPE merges"
    elif kind == "Unigram":
        unk_id, byte_fallback = model.get("unk_id"), model.get("byte_fallback")
        base = {}
        for tid, (text, score) in enumerate(model["vocab"]):
            ttype = (UNKNOWN if tid == unk_id else BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(text)
                     else NORMAL)
            base[tid] = (text, float(score), ttype)
        source = "tokenizer.json unigram scores"
        notes.append("unigram vocabulary: llama.cpp's 'llama' tokenizer merges by score and may split some "
                     "texts differently from the unigram model (check tokenization)")
    else:
        raise PeftlabError(f"{tj_file}: GGUF export supports byte-level BPE, SentencePiece (tokenizer.model) and "
                           f"tokenizer.json BPE-with-byte-fallback or Unigram tokenizers; this one is "
                           f"{kind!r} (byte_fallback={model.get('byte_fallback')}, decoder "
                           f"{decoder.get('type')!r})")
    tokens, scores, types = _assemble(base, added, spm=True, vocab_size=vocab_size, where=model_dir)
    return Vocab("llama", tokens, scores, types, "default", _add_space_prefix(tokenizer_json), source, notes)


def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.

    llama.cpp recognises pre-tokenizers by name. GPT-2's regex (a ByteLevel pre-tokenizer with
    ``use_regex``) is ``gpt-2``; the Llama-3 split regex is ``llama-bpe``; anything else gets
    ``default`` (which llama.cpp treats as Llama-3-like), noted in the export result.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    splits = [p for p in parts if p.get("type") == "Split"]
    pattern = json.dumps(splits[0].get("pattern", {})) if splits else ""
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern and "\\p{N}{1,3}" in pattern:
        return "llama-bpe"
    return "default"


def _byte_level_vocab(model_dir: Path, tokenizer_json: dict[str, Any] | None, vocab_size: int) -> Vocab:
    """Byte-level BPE (``gpt2``): the vocabulary as its strings (GPT-2's byte-to-unicode alphabet)."""
    if tokenizer_json is not None:
        vocab = tokenizer_json["model"]["vocab"]
        added = _added_tokens(model_dir, tokenizer_json)
        pre = tokenizer_pre(tokenizer_json)
    else:  # a slow GPT-2 style directory: vocab.json + merges.txt (+ added_tokens.json)
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        extra = model_dir / "added_tokens.json"
        extra_tokens = json.loads(extra.read_text(encoding="utf-8")) if extra.is_file() else {}
        added = {int(tid): (text, True) for text, tid in extra_tokens.items()} | _added_tokens(model_dir, None)
        pre = "gpt-2"
    base = {int(tid): (text, 0.0, NORMAL) for text, tid in vocab.items()}
    tokens, scores, types = _assemble(base, added, spm=False, vocab_size=vocab_size, where=model_dir)
    notes = []
    if pre == "default":
        notes.append("tokenizer pre-tokenizer not recognised; written as 'default' (check tokenization in llama.cpp)")
    return Vocab("gpt2", tokens, scores, types, pre, None, "tokenizer.json byte-level BPE", notes)


# --------------------------------------------------------------------------------------------------
# chat template


def chat_template(model_dir: str | Path) -> str | list[dict[str, str]] | None:
    """The chat template as transformers loads it from ``model_dir``.

    transformers (5 writes it so) gives ``chat_template.jinja`` (with any ``additional_chat_templates/
    *.jinja``) priority over ``chat_template.json`` and over ``tokenizer_config.json``'s
    ``chat_template``; gguf's ``SpecialVocab`` reads them the other way round, and not at all without
    a tokenizer_config.json. Several templates are returned as GGUF's list of {name, template}.
    """
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        default = jinja.read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if not extra:
            return default
        return [{"name": "default", "template": default}] + [
            {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        value = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, (str, list)):
            return value
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, (str, list)):
            return value
    return None
