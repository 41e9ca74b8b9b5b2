"""peftlab.export.gguf_vocab: the SentencePiece model proto read as the sentencepiece library reads it; the
vocabulary of SentencePiece, tokenizer.json (BPE with byte fallback, Unigram) and byte-level BPE
tokenizers with llama.cpp's token types; stale or broken files refused or set aside with a note."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.export.gguf_vocab import (
    ADDED_TOKEN_SCORE,
    BYTE,
    CONTROL,
    NORMAL,
    SPM_BPE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    read_sentencepiece_model,
    read_vocab,
)


@pytest.mark.parametrize("name", ["llama2-7b-chat", "mistral-7b"])
def test_sentencepiece_model_reads_as_the_sentencepiece_library_reads_it(shared_data, name):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is the reference reader of tokenizer.model")
    from sentencepiece import sentencepiece_model_pb2

    path = shared_data / "tokenizers" / name / "tokenizer.model"
    ours = read_sentencepiece_model(path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    assert ours.pieces == [(p.piece, p.score, p.type) for p in proto.pieces]
    assert (ours.model_type, ours.add_dummy_prefix, ours.normalizer) == \
        (proto.trainer_spec.model_type, proto.normalizer_spec.add_dummy_prefix, proto.normalizer_spec.name)
    assert ours.model_type == SPM_BPE and ours.normalizer == "identity"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert [p[1] for p in ours.pieces] == [sp.GetScore(i) for i in range(sp.vocab_size())]
    assert [i for i, p in enumerate(ours.pieces) if p[2] == UNKNOWN] == [sp.unk_id()]
    assert [i for i, p in enumerate(ours.pieces) if p[2] == CONTROL] == [i for i in range(len(ours.pieces))
                                                                        if sp.IsControl(i)]
    assert sum(p[2] == BYTE for p in ours.pieces) == 256


def test_unreadable_or_stale_tokenizer_model(shared_data, tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2-7b-chat").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff")  # a piece whose length runs past the end
    with pytest.raises(PeftlabError, match=r"tokenizer.model: not a readable SentencePiece model .*Remove the file"):
        read_vocab(tmp_path, 32000)
    # Mistral's model beside Llama-2's tokenizer.json: numbered differently, so set aside with a note
    shutil.copy(shared_data / "tokenizers" / "mistral-7b" / "tokenizer.model", tmp_path / "tokenizer.model")
    vocab = read_vocab(tmp_path, 32000)
    assert vocab.source == "tokenizer.json BPE merges"
    assert any(n.startswith("tokenizer.model ignored: it does not match tokenizer.json (token") for n in vocab.notes)


def test_llama3_byte_level_vocab_with_control_tokens_and_padding(shared_data):
    vocab = read_vocab(shared_data / "tokenizers" / "llama3-8b-instruct", 128300)
    assert (vocab.model, vocab.pre, vocab.add_space_prefix) == ("gpt2", "llama-bpe", None)
    assert len(vocab.tokens) == 128300 and vocab.tokens[128000] == b"<|begin_of_text|>"
    assert vocab.types[:128000] == [NORMAL] * 128000 and vocab.types[128000:128256] == [CONTROL] * 256
    assert vocab.tokens[128256:] == [f"[PAD{i}]".encode() for i in range(128256, 128300)]
    assert vocab.types[128256:] == [UNUSED] * 44
    with pytest.raises(PeftlabError, match="the tokenizer has 128256 tokens but the model only 128000 embedding rows"):
        read_vocab(shared_data / "tokenizers" / "llama3-8b-instruct", 128000)


def test_unigram_tokenizer_json_scores_and_types(tmp_path):
    """A Unigram tokenizer.json (no tokenizer.model): scores from its vocabulary, unk UNKNOWN, byte-fallback
    pieces BYTE, special added tokens CONTROL, other added tokens USER_DEFINED with "▁" written as a space."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    tok.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                          special_tokens=["<unk>", "<s>", "</s>"]))
    tok.add_tokens([AddedToken("\u2581my_tool", special=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    model = saved["model"]
    model["byte_fallback"] = True  # as a SentencePiece conversion with byte pieces has it
    newline = len(model["vocab"]) - 1
    model["vocab"][newline][0] = "<0x0A>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    vocab = read_vocab(tmp_path, len(model["vocab"]) + 4)
    n = len(model["vocab"])
    assert vocab.model == "llama" and vocab.add_space_prefix is True and vocab.source == "tokenizer.json unigram scores"
    assert vocab.scores[:n] == [float(s) for _, s in model["vocab"]]
    assert vocab.types[:3] == [UNKNOWN, CONTROL, CONTROL] and vocab.types[newline] == BYTE
    assert vocab.types.count(NORMAL) == n - 4
    assert vocab.tokens[n] == b" my_tool" and vocab.types[n] == USER_DEFINED
    assert vocab.scores[n] == ADDED_TOKEN_SCORE and vocab.types[n + 1:] == [UNUSED] * 3
    assert any("unigram vocabulary" in note for note in vocab.notes)


def test_unsupported_tokenizer_is_refused_with_what_it_is(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PeftlabError, match=r"tokenizer.json: GGUF export supports .* this one is 'WordPiece'"):
        read_vocab(tmp_path, 8)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(PeftlabError, match="has no tokenizer.json or tokenizer.model"):
        read_vocab(Path(tmp_path), 8)
