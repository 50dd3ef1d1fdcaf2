"""Packed token shards: flat binary files of token ids, each with its documents' offsets beside it.

A shard ``NNNNN.bin`` is its documents' tokens back to back, each document followed by one EOS, with no header:
``np.memmap(path, dtype=manifest["dtype"], mode="r")`` reads it (the format nanoGPT, datatrove and OLMo read). Ids
are ``uint16`` when the vocabulary fits (up to 65,536 pieces), else ``uint32``. ``NNNNN.docs.npy`` holds int64
``[documents + 1]`` offsets: document i is ``shard[offsets[i]:offsets[i + 1]]``.

A split is a ``ShardSet``: its shards in order, read as one stream (``len``, slicing across shard boundaries, the
documents' offsets in the stream) without reading any file whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pretrain.errors import PipelineError

DOCS_SUFFIX = ".docs.npy"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def docs_path(shard: Path) -> Path:
    """Where a shard's document offsets live: ``00003.bin`` -> ``00003.docs.npy``."""
    return shard.with_name(shard.name.removesuffix(".bin") + DOCS_SUFFIX)


def open_shard(path: str | Path, dtype: str, random_access: bool = False) -> np.ndarray:
    """A read-only memmap of a shard: ``[n_tokens]`` ids (an empty array for an empty file).

    ``random_access`` tells the kernel not to read ahead: the training loader reads windows at random places, and
    readahead would read many times the bytes it uses."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    array = np.memmap(path, dtype=dtype, mode="r")
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


class ShardWriter:
    """Writes one shard and its document offsets under temporary names, hashing as it goes; ``finish`` renames
    both into place (the offsets first, so a ``.bin`` that exists is always complete)."""

    def __init__(self, path: str | Path, dtype: str, vocab_size: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self.documents = 0
        self.tokens = 0
        self.max_id = -1
        self._lengths: list[np.ndarray] = []
        self._hash = hashlib.sha256()
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")

    def write(self, flat_ids: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids ``[sum(doc_lengths)]`` (each ending in EOS)."""
        if int(doc_lengths.sum()) != len(flat_ids):
            raise ValueError(f"{len(flat_ids)} ids for documents of {int(doc_lengths.sum())} tokens")
        if len(flat_ids):
            low, high = int(flat_ids.min()), int(flat_ids.max())
            if low < 0 or high >= self.vocab_size:
                raise PipelineError(
                    f"token id {high if high >= self.vocab_size else low} is outside the tokenizer's vocabulary of "
                    f"{self.vocab_size} while writing {self.path}"
                )
            self.max_id = max(self.max_id, high)
        data = np.ascontiguousarray(flat_ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.documents += len(doc_lengths)
        self.tokens += len(flat_ids)
        self._lengths.append(np.asarray(doc_lengths, dtype=np.int64))

    def finish(self) -> dict:
        """Close, fsync and rename into place; return the shard's manifest entry (without its path)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        target = docs_path(self.path)
        tmp_docs = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp_docs, "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_docs, target)
        os.replace(self._tmp, self.path)
        return {"tokens": self.tokens, "documents": self.documents, "sha256": self._hash.hexdigest()}

    def abandon(self) -> None:
        """Close and remove the temporary file (a failed unit leaves nothing behind)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class ShardSet:
    """The shards of one split, in order, read as one stream of ``len(self)`` tokens.

    ``shards`` are ``(path, tokens)`` pairs as the manifest records them; files are opened when first read.
    """

    def __init__(self, shards: list[tuple[Path, int]], dtype: str, random_access: bool = False) -> None:
        self.paths = [Path(path) for path, _ in shards]
        self.sizes = np.asarray([tokens for _, tokens in shards], dtype=np.int64)
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.starts[1:])
        self.dtype = dtype
        self.random_access = random_access
        self._open: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split in memory (``np.asarray(split)``): for small splits and tests; training never does this."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memmap."""
        if index not in self._open:
            self._open[index] = open_shard(self.paths[index], self.dtype, self.random_access)
        return self._open[index]

    def __getitem__(self, key: slice | int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a view when they lie in one shard, else a copy); or one token."""
        if isinstance(key, (int, np.integer)):
            index = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= index < len(self):
                raise IndexError(f"token {key} of a split of {len(self)}")
            shard = int(np.searchsorted(self.starts, index, side="right")) - 1
            return self.shard(shard)[index - self.starts[shard]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a ShardSet is sliced with step 1 only")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        if first == last:
            base = self.starts[first]
            return self.shard(first)[start - base : stop - base]
        pieces = []
        for index in range(first, last + 1):
            base = self.starts[index]
            pieces.append(self.shard(index)[max(start - base, 0) : min(stop - base, self.sizes[index])])
        return np.concatenate(pieces)

    def document_offsets(self) -> np.ndarray:
        """int64 ``[documents + 1]``: document d of the split is ``self[offsets[d]:offsets[d + 1]]``."""
        parts = [np.zeros(1, dtype=np.int64)]
        for index, path in enumerate(self.paths):
            own = np.load(docs_path(path))
            if len(own) == 0 or own[0] != 0 or own[-1] != self.sizes[index]:
                raise PipelineError(f"{docs_path(path)} does not describe the documents of {path}")
            parts.append(own[1:] + self.starts[index])
        return np.concatenate(parts)

    def documents(self) -> Iterator[np.ndarray]:
        """The documents in order, each ``[n_tokens]`` ending in EOS (views into the memmaps)."""
        for index, path in enumerate(self.paths):
            offsets = np.load(docs_path(path))
            tokens = self.shard(index)
            for start, end in zip(offsets[:-1], offsets[1:], strict=True):
                yield tokens[start:end]
