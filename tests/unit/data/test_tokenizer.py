"""The sentencepiece tokenizer: lossless on code, documented special ids, clear errors."""

from __future__ import annotations

import pickle

import pytest
from data_fixtures import stdlib_texts

from pretrain.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DocumentTokenizer,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from pretrain.errors import PipelineError

TRICKY = [
    "def f(x):\n\treturn x  # tab-indented\n",
    "if a:\r\n    b = 1\r\n",  # CRLF
    "   leading and trailing spaces   \n\n\n  \t \n",
    "unicode: héllo wörld — 你好 😀 \u2028 \x00 \x7f",
    "numbers 1234567890 and 3.14e-10",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    texts = list(stdlib_texts(25).values())
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_tokenizer(texts, prefix, vocab_size=600, model_type="bpe", num_threads=1)


def test_round_trip_on_stdlib_sources(model_path):
    sp = load_tokenizer(model_path)
    unseen = stdlib_texts(40, start=400)  # files the tokenizer was not trained on
    for rel, text in unseen.items():
        ids = sp.encode(text)
        assert sp.decode(ids) == text, rel
        assert UNK_ID not in ids, rel


def test_round_trip_on_whitespace_and_unicode(model_path):
    sp = load_tokenizer(model_path)
    for text in TRICKY:
        ids = sp.encode(text)
        assert sp.decode(ids) == text, repr(text)
        assert UNK_ID not in ids, repr(text)


def test_special_ids_and_whitespace_pieces(model_path):
    sp = load_tokenizer(model_path)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)  # as the module docstring documents
    assert special_ids(sp) == {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
    assert sp.get_piece_size() == 600
    assert sp.piece_to_id("\n") == 4 and sp.piece_to_id("\t") == 5
    # Indentation is cheap: eight spaces are one or two tokens, not eight.
    assert len(sp.encode("        ")) <= 2
    assert EOS_ID not in sp.encode("</s> <s> <pad>")  # special pieces never come out of text


def test_document_tokenizer_appends_eos_and_pickles(model_path):
    tokenizer = pickle.loads(pickle.dumps(DocumentTokenizer(model_path)))
    sp = load_tokenizer(model_path)
    docs = ["import os\n", "x = 1\n"]
    assert tokenizer.encode(docs) == [sp.encode(d) + [EOS_ID] for d in docs]


def test_vocab_too_large_is_explained(tmp_path):
    texts = list(stdlib_texts(2).values())
    with pytest.raises(PipelineError, match=r"data\.vocab_size=50000 is too large.*data\.vocab_size=\d+ or lower"):
        train_tokenizer(texts, tmp_path / "spm", vocab_size=50000)


def test_vocab_too_small_is_explained(tmp_path):
    texts = ["".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))] * 3  # 400 distinct CJK characters
    with pytest.raises(PipelineError, match=r"data\.vocab_size=300 is too small.*at least \d+"):
        train_tokenizer(texts, tmp_path / "spm", vocab_size=300)


def test_load_rejects_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    with pytest.raises(PipelineError, match="is not a sentencepiece model"):
        load_tokenizer(bogus)
    with pytest.raises(PipelineError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
