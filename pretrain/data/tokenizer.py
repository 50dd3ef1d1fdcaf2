"""The sentencepiece tokenizer: training one on a sample of the corpus, or loading an existing model.

A trained tokenizer is lossless on code: ``decode(encode(text)) == text`` for every string, because
- the normalizer is the identity (no NFKC), extra whitespace is kept and no dummy space is prepended;
- newline and tab are pieces of their own (user-defined symbols), runs of spaces are pieces too
  (``allow_whitespace_only_pieces``), so indentation costs one or two tokens a line;
- characters outside the learned alphabet fall back to their UTF-8 bytes (``byte_fallback``), so no text
  is unknown.
Digits are split one per token (``split_digits``), as in LLaMA and PaLM.

Special token ids of a trained tokenizer (an existing ``data.tokenizer`` keeps its own; the prepared
corpus's ``manifest.json`` records the ids in use):

    pad = 0   <pad>  never produced by encode; free for padding
    unk = 1   <unk>  never produced (byte fallback covers every character)
    bos = 2   <s>    not used in packed shards
    eos = 3   </s>   follows every document in the packed shards

Ids 4 and 5 are the newline and tab symbols, then 256 byte pieces ``<0x00>``..``<0xFF>``, then the merges.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from pretrain.errors import PipelineError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
USER_SYMBOLS = ("\n", "\t")

# Everything that decides what a trained tokenizer is; part of the prepared corpus's fingerprint.
TRAINER_OPTIONS = {
    "character_coverage": 0.9995,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "user_defined_symbols": list(USER_SYMBOLS),
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    # Lines longer than this (in bytes) are left out of training, not of tokenization.
    "max_sentence_length": 8192,
    # We pick the sample ourselves (prepare.py); sentencepiece takes all of it.
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "seed": 1234,
}


def train_tokenizer(
    texts: Iterable[str], model_prefix: str | Path, vocab_size: int, model_type: str = "bpe", num_threads: int = 1
) -> Path:
    """Train a sentencepiece model on ``texts`` (whole documents); write ``<model_prefix>.model`` and ``.vocab``.

    The model's bytes depend only on the texts and settings (not on the path), so a prepare is reproducible.
    A vocabulary the sample cannot fill raises a PipelineError naming ``data.vocab_size`` and a size that works.
    """
    options = dict(TRAINER_OPTIONS)
    spm.set_random_generator_seed(options.pop("seed"))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            num_threads=num_threads,
            minloglevel=2,
            **options,
        )
    except RuntimeError as err:
        raise PipelineError(_explain_trainer_error(str(err), vocab_size)) from err
    path = Path(f"{model_prefix}.model")
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as vocab:
        for i in range(sp.get_piece_size()):
            vocab.write(f"{sp.id_to_piece(i)!r}\t{sp.get_score(i):g}\n")
    return path


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # sentencepiece learns from lines; newlines are user-defined symbols, never inside a merged piece.
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def _explain_trainer_error(message: str, vocab_size: int) -> str:
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"data.vocab_size={vocab_size} is too large for this corpus: its tokenizer sample yields at most "
            f"{too_high.group(1)} pieces. Set data.vocab_size={too_high.group(1)} or lower, or give the tokenizer "
            "more text (a larger corpus or data.tokenizer_sample_chars)."
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return (
            f"data.vocab_size={vocab_size} is too small for this corpus's alphabet: it needs at least "
            f"{too_low.group(1)} pieces (characters + 256 bytes + special tokens). Set data.vocab_size="
            f"{too_low.group(1)} or higher."
        )
    if "empty" in message.lower() or "no sentence" in message.lower():
        return "the tokenizer sample is empty: the training split holds no text"
    return f"sentencepiece could not train a tokenizer (data.vocab_size={vocab_size}): {message}"


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model; a missing file or one that is not a model raises a PipelineError."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data.tokenizer={str(path)!r}: no such file (give a sentencepiece .model file)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise PipelineError(
            f"data.tokenizer={str(path)!r} is not a sentencepiece model ({err}); give a .model file written by "
            "sentencepiece (e.g. the spm.model of a prepared corpus)"
        ) from err
    if sp.eos_id() < 0:
        raise PipelineError(
            f"data.tokenizer={str(path)!r} has no end-of-sequence piece; packed shards need one to separate documents"
        )
    return sp


def special_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """The special token ids of a model (-1 where it has none)."""
    return {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}


class DocumentTokenizer:
    """A picklable batch function for ``datasets.map``: texts -> token ids, each document followed by EOS.

    Each worker process loads the model once from its path (a processor itself is not worth pickling).
    """

    def __init__(self, model_path: str | Path, num_threads: int = 1) -> None:
        self.model_path = str(model_path)
        self.num_threads = num_threads
        self._sp: spm.SentencePieceProcessor | None = None

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "num_threads": self.num_threads, "_sp": None}

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        eos = self._sp.eos_id()
        ids = self._sp.encode(texts, num_threads=self.num_threads)
        for doc in ids:
            doc.append(eos)
        return ids
