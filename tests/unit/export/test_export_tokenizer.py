"""The sentencepiece -> tokenizers conversion: the same ids and a lossless decode, in `tokenizers` and through
`transformers`' AutoTokenizer."""

import pytest
import sentencepiece as spm
from data_fixtures import stdlib_texts

from pretrain.data.tokenizer import train_tokenizer
from pretrain.errors import PipelineError
from pretrain.export.run import EDGE_TEXTS
from pretrain.export.tokenizer import build_tokenizer, check_same_encoding, write_tokenizer


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> bytes:
    texts = list(stdlib_texts(30).values())
    return train_tokenizer(texts, tmp_path_factory.mktemp("spm") / "spm", 1024).read_bytes()


def test_same_ids_and_round_trip_on_unseen_stdlib_files(spm_model):
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    texts = list(stdlib_texts(120, start=30).values()) + list(EDGE_TEXTS)
    agreement = check_same_encoding(build_tokenizer(spm_model), [(t, sp.encode(t)) for t in texts])
    assert agreement.exact, agreement.first_difference
    assert agreement.documents == len(texts) and agreement.tokens > 100_000


def test_check_same_encoding_reports_a_difference(spm_model):
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    ids = sp.encode("def f(x):\n    return x\n")
    agreement = check_same_encoding(build_tokenizer(spm_model), [("def f(x):\n    return x\n", ids[:-1] + [7])])
    assert not agreement.exact and agreement.same_ids == 0 and "ids differ at token" in agreement.first_difference


def test_autotokenizer_encodes_and_decodes_as_sentencepiece(spm_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    write_tokenizer(spm_model, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = list(EDGE_TEXTS) + ["\n\n  x = 12  \t\n", "ünïcödé ✓ 𝔘 and </s> in text", "   "]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == sp.encode(text), text  # no <s> in front, no </s> after, "</s>" in text is characters
        assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = sp.encode("def f():") + [sp.eos_id()]
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "def f():"
    # Byte pieces decode to their bytes, not "<0xC3>".
    assert "<0x" not in tok.decode(sp.encode("é☃🎉")) and tok.decode(sp.encode("é☃🎉")) == "é☃🎉"


def test_a_model_with_other_whitespace_options_is_refused(tmp_path):
    texts = list(stdlib_texts(5).values())
    model = tmp_path / "dummy.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for t in texts for line in t.split("\n") if line),
        model_prefix=str(tmp_path / "dummy"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    with pytest.raises(PipelineError, match="add_dummy_prefix=true; remove_extra_whitespaces=true") as err:
        build_tokenizer(model.read_bytes(), str(model))
    assert "normalization_rule_name=nmt_nfkc" in str(err.value) and "\n" not in str(err.value)
