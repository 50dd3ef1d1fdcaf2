"""The project's sentencepiece tokenizer as a ``tokenizers`` (Rust) tokenizer that ``transformers`` loads as a
``PreTrainedTokenizerFast``, giving the same ids and decoding losslessly.

What a trained model does (``pretrain.data.tokenizer.TRAINER_OPTIONS``), and its counterpart here:

- normalization ``identity``, ``remove_extra_whitespaces=false``, ``add_dummy_prefix=false``: the only change
  to the text is sentencepiece's whitespace escape, every ``" "`` becomes ``"▁"`` (``normalizers.Replace``; no
  prefix space, no stripping, no Unicode normalization);
- BPE: sentencepiece merges, anywhere in the text, the adjacent pair whose concatenation is the piece of
  highest score. ``models.BPE`` merges by rank: the merges are every split ``(a, b)`` of every piece ``a+b``
  with both halves in the vocabulary, ranked by the score of ``a+b`` (unigram models: ``models.Unigram``
  with the pieces' scores, the same Viterbi search);
- user-defined symbols (``"\\n"``, ``"\\t"``) are frozen in sentencepiece: never merged with a neighbour. No
  merge takes one as a half, and the pre-tokenizer isolates them (a frozen symbol splits the merging into
  independent parts, so the ids are the same);
- ``byte_fallback``: a character outside the vocabulary becomes its UTF-8 byte pieces ``<0x..>``
  (``byte_fallback=True`` in the model; the ``ByteFallback`` decoder turns them back into the bytes);
- ``split_digits``: a training option only (no piece holds two digits), so encoding needs nothing more;
- decoding: ``"▁"`` back to ``" "``, byte pieces to their bytes, and no stripping of a leading space
  (LLaMA's decoder strips one because its tokenizer adds a dummy prefix; ours adds none).

Special tokens (``<pad>``, ``<unk>``, ``<s>``, ``</s>``) are never produced from text (sentencepiece encodes
``"</s>"`` in a text as characters): the exported ``tokenizer_config.json`` sets ``split_special_tokens``.
No ``<s>`` is added in front and no ``</s>`` after: a document in the training shards is ``encode(text) + [eos]``.

``check_same_encoding`` compares the two tokenizers on documents (ids and the round trip); the export runs it on
the run's validation split.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import PipelineError

SPACE = "\u2581"  # sentencepiece's escaped space, "▁"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def check_convertible(model_bytes: bytes, where: str) -> None:
    """Raise PipelineError (one line) when the sentencepiece model uses a setting this conversion does not
    reproduce; ``where`` names the file."""
    proto = _proto(model_bytes)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    model_type = trainer.ModelType.Name(trainer.model_type).lower()
    problems = []
    if model_type not in ("bpe", "unigram"):
        problems.append(f"model_type={model_type} (only bpe and unigram convert)")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization_rule_name={norm.name} (only identity converts exactly)")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix=true")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if trainer.unk_id < 0:
        problems.append("no <unk> piece")
    if problems:
        raise PipelineError(
            f"the tokenizer {where} cannot be converted exactly to a Hugging Face tokenizer: {'; '.join(problems)} "
            "(the trainer options of pretrain.data.tokenizer convert)"
        )


@dataclass
class Pieces:
    """The vocabulary of a sentencepiece model, by kind."""

    pieces: list[str]
    scores: list[float]
    model_type: str
    byte_fallback: bool
    special: dict[str, int]  # pad/unk/bos/eos -> id (absent when the model has none)
    controls: list[int] = field(default_factory=list)  # ids of control pieces (<s>, </s>, <pad>)
    user_defined: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)


def read_pieces(model_bytes: bytes) -> Pieces:
    proto = _proto(model_bytes)
    kinds = proto.SentencePiece
    trainer = proto.trainer_spec
    out = Pieces(
        pieces=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        model_type=trainer.ModelType.Name(trainer.model_type).lower(),
        byte_fallback=trainer.byte_fallback,
        special={},
    )
    for i, piece in enumerate(proto.pieces):
        if piece.type == kinds.CONTROL:
            out.controls.append(i)
        elif piece.type == kinds.USER_DEFINED:
            out.user_defined.append(i)
        elif piece.type == kinds.UNUSED:
            out.unused.append(i)
    for name in ("pad", "unk", "bos", "eos"):
        piece_id = getattr(trainer, f"{name}_id")
        if 0 <= piece_id < len(out.pieces):
            out.special[name] = piece_id
    return out


def bpe_merges(pieces: Pieces) -> list[tuple[str, str]]:
    """Every split ``(a, b)`` of every mergeable piece ``a+b`` whose halves are pieces that can take part in a
    merge, most preferred first (sentencepiece prefers the merged piece of highest score; ties by id)."""
    kinds = {i: "control" for i in pieces.controls}
    kinds.update({i: "user" for i in pieces.user_defined})
    kinds.update({i: "unused" for i in pieces.unused})
    if "unk" in pieces.special:
        kinds[pieces.special["unk"]] = "unk"
    # Byte pieces are reserved in sentencepiece (never a half or a result of a merge).
    byte_ids = {i for i, p in enumerate(pieces.pieces) if len(p) == 6 and p.startswith("<0x") and p.endswith(">")}
    halves = {p: i for i, p in enumerate(pieces.pieces) if i not in kinds and i not in byte_ids}
    ranked = []
    for i, piece in enumerate(pieces.pieces):
        if i in kinds or i in byte_ids or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in halves and right in halves:
                ranked.append((-pieces.scores[i], i, halves[left], (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def build_tokenizer(model_bytes: bytes, where: str = "spm.model"):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as the sentencepiece model ``model_bytes``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    check_convertible(model_bytes, where)
    pieces = read_pieces(model_bytes)
    unk = pieces.pieces[pieces.special["unk"]]
    if pieces.model_type == "bpe":
        vocab = {piece: i for i, piece in enumerate(pieces.pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=bpe_merges(pieces),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=pieces.byte_fallback,
        )
    else:
        model = models.Unigram(
            [(p, s) for p, s in zip(pieces.pieces, pieces.scores, strict=True)],
            unk_id=pieces.special["unk"],
            byte_fallback=pieces.byte_fallback,
        )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    user = [pieces.pieces[i] for i in pieces.user_defined]
    if user:
        alternatives = "|".join(_regex_escape(s) for s in sorted(user, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # The control pieces are special tokens (skipped by decode(skip_special_tokens=True)); as in sentencepiece,
    # they never come out of text (split_special_tokens in tokenizer_config.json).
    specials = sorted(set(pieces.controls) | {pieces.special["unk"]})
    tokenizer.add_special_tokens(
        [AddedToken(pieces.pieces[i], special=True, normalized=False, single_word=False) for i in specials]
    )
    tokenizer.encode_special_tokens = True
    return tokenizer


def _regex_escape(text: str) -> str:
    import re

    return re.escape(text)


def tokenizer_files(model_bytes: bytes, max_length: int | None = None, where: str = "spm.model") -> dict[str, str]:
    """The files of a ``PreTrainedTokenizerFast`` directory: name -> text."""
    pieces = read_pieces(model_bytes)
    tokenizer = build_tokenizer(model_bytes, where)
    names = {name: pieces.pieces[i] for name, i in pieces.special.items()}
    special_map = {f"{name}_token": piece for name, piece in names.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": max_length if max_length is not None else 1_000_000_000_000_000_019_884_624_838_656,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }


def write_tokenizer(model_bytes: bytes, directory: Path, where: str = "spm.model") -> None:
    for name, text in tokenizer_files(model_bytes, where=where).items():
        (Path(directory) / name).write_text(text, encoding="utf-8")


@dataclass
class Agreement:
    """How the converted tokenizer compared with sentencepiece on some documents."""

    documents: int = 0
    tokens: int = 0
    same_ids: int = 0
    round_trips: int = 0
    first_difference: str | None = None

    @property
    def exact(self) -> bool:
        return self.same_ids == self.documents and self.round_trips == self.documents

    def summary(self) -> str:
        return (
            f"{self.same_ids}/{self.documents} documents ({self.tokens:,} tokens) with the same ids, "
            f"{self.round_trips}/{self.documents} decoded back to the same text"
        )


def check_same_encoding(tokenizer, documents: Iterable[tuple[str, list[int]]]) -> Agreement:
    """Compare ``tokenizer`` (a ``tokenizers.Tokenizer``) with the sentencepiece ids of each document's text:
    ``documents`` yields ``(text, ids)``; ids as sentencepiece gives them (without a trailing ``</s>``)."""
    result = Agreement()
    batch: list[tuple[str, list[int]]] = []

    def flush() -> None:
        encodings = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        for (text, ids), encoding in zip(batch, encodings, strict=True):
            result.documents += 1
            result.tokens += len(ids)
            same = list(encoding.ids) == list(ids)
            back = tokenizer.decode(list(ids), skip_special_tokens=False) == text
            result.same_ids += same
            result.round_trips += back
            if result.first_difference is None and not (same and back):
                result.first_difference = _difference(text, list(ids), list(encoding.ids), same, tokenizer)
        batch.clear()

    for item in documents:
        batch.append(item)
        if len(batch) == 64:
            flush()
    if batch:
        flush()
    return result


def _difference(text: str, ours: list[int], theirs: list[int], same: bool, tokenizer) -> str:
    if same:
        return f"decode differs for a document starting {text[:40]!r}"
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    pieces = [tokenizer.id_to_token(i) for i in ours[max(0, at - 2) : at + 3]]
    got = [tokenizer.id_to_token(i) for i in theirs[max(0, at - 2) : at + 3]]
    return f"ids differ at token {at} of a document starting {text[:40]!r}: sentencepiece {pieces}, converted {got}"
