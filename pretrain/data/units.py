"""Work units of the prepare stage: the inputs cut into pieces that are tokenized independently, each into a shard.

Units are decided by the inputs alone, never by the number of workers, so 1 worker and 16 write the same bytes:
- a map-style dataset (``data=stdlib|files``, ``data=hf`` without streaming) is cut into row ranges of about
  ``data.unit_bytes`` characters of text (the rows' lengths are known from the split pass);
- a stream (``data.streaming=true``) is cut into its own shards (its files), one unit each (one unit in all when
  ``data.max_documents`` caps it: a cap is a prefix of the whole stream).

A unit writes ``train/NNNNN.bin`` and ``val/NNNNN.bin`` (with their ``.docs.npy`` offsets) under temporary names,
renames them into place, then writes its done-marker ``units/NNNNN.json`` (the shards' manifest entries) last:
a unit whose marker exists is complete, and a prepare run again skips it. ``UnitJob.run_unit`` is the whole work
of one unit; the executors (``pretrain.data.executors``) only decide where it runs.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.corpus import split_hash
from pretrain.data.manifest import relative
from pretrain.data.shards import ShardWriter, docs_path, token_dtype
from pretrain.data.tokenizer import DocumentTokenizer, load_tokenizer
from pretrain.errors import PipelineError
from pretrain.run_files import file_sha256, write_atomic

# Documents tokenized per sentencepiece call.
BATCH_DOCS = 1000
UNITS_DIR = "units"


@dataclass(frozen=True)
class Unit:
    """One piece of one source: rows ``start .. stop - 1`` of a dataset, or shard ``start`` of a stream."""

    number: int  # the source's own unit number: names its shards (NNNNN.bin) and its marker
    start: int
    stop: int


def plan_row_units(n_chars: np.ndarray, unit_bytes: int) -> list[Unit]:
    """Consecutive row ranges of about ``unit_bytes`` characters each (a row longer than that is a unit alone)."""
    units, start, size = [], 0, 0
    for row, chars in enumerate(n_chars.tolist()):
        if row > start and size + chars > unit_bytes:
            units.append(Unit(len(units), start, row))
            start, size = row, 0
        size += chars
    units.append(Unit(len(units), start, len(n_chars)))
    return units


def plan_stream_units(n_shards: int, capped: bool) -> list[Unit]:
    if capped or n_shards <= 1:
        return [Unit(0, 0, 1)]
    return [Unit(i, i, i + 1) for i in range(n_shards)]


@dataclass
class UnitJob:
    """What every unit of one source needs: where its documents are and where its shards go. Picklable, so that the
    executors can send it to worker processes (a memory-mapped dataset pickles as its file paths)."""

    label: str  # "" for a single corpus, the source's label in a mixture
    documents: Any  # FileDocuments or ArrowDocuments (rows), or a datasets.IterableDataset (stream)
    is_val_path: Path | None  # rows: bool [rows] split flags (.npy), from the split pass
    build: Path  # the corpus's build directory: the markers' paths are relative to it
    out: Path  # the source's folder in the build directory: train/, val/, units/ below it
    tokenizer_path: Path
    vocab_size: int
    val_fraction: float
    streaming: bool
    n_stream_shards: int = 1
    where: str = ""

    def marker(self, unit: Unit) -> Path:
        return self.out / UNITS_DIR / f"{unit.number:05d}.json"

    def done(self, unit: Unit) -> dict[str, Any] | None:
        """The unit's marker if the unit is complete (marker and every file it names present), else None."""
        try:
            record = json.loads(self.marker(unit).read_text())
        except (OSError, ValueError):
            return None
        if record.get("rows") != [unit.start, unit.stop]:
            return None  # a marker of another cut (data.unit_bytes changed between a stopped build and this one)
        for split in ("train", "val"):
            entry = record.get(split) or {}
            for key in ("path", "docs"):
                if not (self.build / entry.get(key, "\0")).is_file():
                    return None
        return record

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Tokenize one unit into its two shards and write its marker; a unit already done is left as it is."""
        record = self.done(unit)
        if record is not None:
            return record
        dtype = token_dtype(self.vocab_size)
        for split in ("train", "val"):
            (self.out / split).mkdir(parents=True, exist_ok=True)
        writers = {
            split: ShardWriter(self.out / split / f"{unit.number:05d}.bin", dtype, self.vocab_size)
            for split in ("train", "val")
        }
        try:
            tokenizer = DocumentTokenizer(self.tokenizer_path)
            dropped = 0
            for texts, flags in self._batches(unit):
                keep = [i for i, text in enumerate(texts) if text]
                dropped += len(texts) - len(keep)
                if not keep:
                    continue
                ids = tokenizer.encode([texts[i] for i in keep])
                kept_flags = [flags[i] for i in keep]
                for split, writer in writers.items():
                    docs = [doc for doc, is_val in zip(ids, kept_flags, strict=True) if is_val == (split == "val")]
                    if docs:
                        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
                        flat = np.fromiter(
                            itertools.chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum())
                        )
                        writer.write(flat, lengths)
            record = {"unit": unit.number, "rows": [unit.start, unit.stop], "dropped_empty": dropped}
            for split, writer in writers.items():
                entry = writer.finish()
                record[split] = {
                    "path": relative(writer.path, self.build),
                    "docs": relative(docs_path(writer.path), self.build),
                    "docs_sha256": file_sha256(docs_path(writer.path)),
                    "max_id": writer.max_id,
                    **entry,
                }
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise
        self.marker(unit).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker(unit), json.dumps(record, sort_keys=True).encode())
        return record

    def _batches(self, unit: Unit):
        """(texts, is_val flags) in batches of BATCH_DOCS, in the unit's order."""
        if not self.streaming:
            is_val = np.load(self.is_val_path, mmap_mode="r")
            for first in range(unit.start, unit.stop, BATCH_DOCS):
                last = min(first + BATCH_DOCS, unit.stop)
                yield self.documents.texts(first, last), [bool(flag) for flag in is_val[first:last]]
            return
        stream = self.documents
        if self.n_stream_shards > 1:
            stream = stream.shard(num_shards=self.n_stream_shards, index=unit.start)
        batch: list[str] = []
        try:
            for doc in stream:
                batch.append(doc["text"] or "")
                if len(batch) == BATCH_DOCS:
                    yield batch, [split_hash(text) < self.val_fraction for text in batch]
                    batch = []
        except PipelineError:
            raise
        except Exception as err:
            raise PipelineError(f"could not read shard {unit.start} of the stream {self.where}: {err}") from err
        if batch:
            yield batch, [split_hash(text) < self.val_fraction for text in batch]


def piece_size(tokenizer_path: Path) -> int:
    return load_tokenizer(tokenizer_path).get_piece_size()


def remove_leftovers(build: Path) -> int:
    """Delete the temporary files a killed prepare left in ``build`` (the caller holds the corpus's lock)."""
    removed = 0
    for path in build.rglob(".*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


_forks_die_with_parent = False


def _after_fork_in_child() -> None:
    if _forks_die_with_parent:
        set_parent_death_signal()


os.register_at_fork(after_in_child=_after_fork_in_child)


class forks_die_with_parent:
    """While active, every process forked from this one (a pool's manager process, say) is killed with its parent:
    the executors' helpers a library forks are covered too, not only the workers that run units."""

    def __enter__(self):
        global _forks_die_with_parent
        _forks_die_with_parent = True
        return self

    def __exit__(self, *exc) -> None:
        global _forks_die_with_parent
        _forks_die_with_parent = False


def set_parent_death_signal() -> None:
    """Linux: this process is killed when its parent dies, so a ``kill -9`` of the prepare leaves no worker behind."""
    if not hasattr(os, "getppid") or not os.path.exists("/proc/self"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
