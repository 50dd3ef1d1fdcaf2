"""Packed token shards: one flat binary file of token ids per split, read back as a numpy memmap.

A shard is the documents' tokens back to back, each document followed by one EOS, with no header:
``np.memmap(path, dtype=meta["dtype"], mode="r")`` reads it. Ids are ``uint16`` when the vocabulary
fits (up to 65,536 pieces), else ``uint32``. The validation split also keeps its document boundaries
(``val_docs.npy``) for the long-context evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def open_shard(path: str | Path, dtype: str) -> np.ndarray:
    """A read-only memmap of a shard: ``[n_tokens]`` ids (an empty array for an empty file)."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class ShardWriter:
    """Appends documents' tokens to a shard file and counts them; with ``keep_boundaries`` it also records
    where each document starts, for ``save_boundaries``."""

    def __init__(self, path: str | Path, dtype: str, vocab_size: int, keep_boundaries: bool = False) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self.documents = 0
        self.tokens = 0
        self._lengths: list[np.ndarray] | None = [] if keep_boundaries else None
        self._file = open(self.path, "wb")

    def write(self, flat_ids: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids ``[sum(doc_lengths)]`` (each ending in EOS)."""
        assert int(doc_lengths.sum()) == len(flat_ids)
        if len(flat_ids):
            assert int(flat_ids.max()) < self.vocab_size and int(flat_ids.min()) >= 0
        self._file.write(np.ascontiguousarray(flat_ids, dtype=self.dtype).tobytes())
        self.documents += len(doc_lengths)
        self.tokens += len(flat_ids)
        if self._lengths is not None:
            self._lengths.append(np.asarray(doc_lengths, dtype=np.int64))

    def close(self) -> None:
        self._file.flush()
        self._file.close()

    def save_boundaries(self, path: str | Path) -> None:
        """Write ``[documents + 1]`` int64 offsets: document i is ``shard[offsets[i]:offsets[i + 1]]``."""
        assert self._lengths is not None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(path, offsets)
