"""Map-style document sources for the prepare stage: row ``i`` is one document's text, read on demand.

- ``FileDocuments``: local files read directly (``data=stdlib`` and ``data=files``). ``.txt``/``.md``/``.py`` files
  are one document each; ``.jsonl``/``.json`` files one document per line (a ``.json`` file holding one JSON array
  is read whole, so keep large inputs in JSON lines); ``.parquet`` files one document per row. Nothing is
  converted or copied: the split pass records where each document starts (a byte offset, or a row number), and a
  work unit reads its own rows from the files themselves. That is what keeps a prepare's temporary disk to a few
  bytes per document, and its worker processes free of ``datasets``.
- ``ArrowDocuments``: a ``datasets.Dataset`` (``data=hf`` without streaming), whose Arrow files are ``datasets``'
  own cache, not the prepare's.

Both give ``len``, ``texts(start, stop)`` (rows in order), ``texts_at(rows)`` (the tokenizer's sample) and ``scan``:
the split pass, every row's split hash ``u`` (of its key) and its length in characters.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.config import DataConfig
from pretrain.data.corpus import expand_paths, hash_batch, load_hf, split_hash, stdlib_files, stdlib_root
from pretrain.errors import PipelineError

# How a file's suffix is read.
TEXT_SUFFIXES = (".txt", ".md", ".py")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# Below this many bytes in all, the split pass runs in this process: starting worker processes costs more.
PARALLEL_SCAN_BYTES = 64 << 20


def open_documents(data: DataConfig, where: str):
    """The documents of ``data=stdlib|files|hf``: FileDocuments, ArrowDocuments, or a ``datasets.IterableDataset``
    when ``data.streaming`` (a stream's units read it themselves)."""
    if data.source == "stdlib":
        root = stdlib_root()
        rels = stdlib_files(data.max_files)
        if not rels:
            raise PipelineError(f"data=stdlib: no .py files found under {root}")
        files = [str(root / rel) for rel in rels]
        return FileDocuments(files, keys=rels, skip_undecodable=True, where=where, quiet_skips=True)
    if data.source == "files":
        paths = expand_paths(data.paths, data.max_files)
        # Text files first, then JSON, then parquet, each group in sorted order.
        order = {
            suffix: rank
            for rank, group in enumerate((TEXT_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES))
            for suffix in group
        }
        paths = sorted(paths, key=lambda path: (order[path.suffix], str(path)))
        return FileDocuments([str(path) for path in paths], text_field=data.text_field, where=where)
    dataset = load_hf(data)
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return dataset
    return ArrowDocuments(dataset, where)


@dataclass
class ScannedFile:
    """What the split pass found in one file: where each of its documents starts, its split hash and length."""

    offsets: np.ndarray  # int64: byte offset of each JSON line; row number in a parquet file or JSON array; [0] text
    u: np.ndarray  # float64
    n_chars: np.ndarray  # int64
    skipped: str | None = None  # why a stdlib file gave no document (not UTF-8)


@dataclass
class FileDocuments:
    """Documents of local files, in file order, then in order within each file. Picklable and small: a work unit in
    another process opens the files itself. ``keys`` gives each text file's split key (stdlib: its relative path);
    without it a document's key is its text, so duplicates land on the same side of the split."""

    files: list[str]
    text_field: str = "text"
    keys: list[str] | None = None
    skip_undecodable: bool = False  # stdlib: a handful of files in latin-1 or koi8-r are left out
    where: str = ""
    quiet_skips: bool = False  # stdlib: leaving those files out is expected, not news
    offsets_path: Path | None = None  # written by scan: int64 [rows]
    file_rows: list[int] = field(default_factory=list)  # cumulative rows at the end of each file
    _array: tuple[int, list[str]] | None = field(default=None, repr=False, compare=False)  # the last JSON array read

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.file_rows[-1] if self.file_rows else 0

    # ------------------------------------------------------------ the split pass

    def scan(self, work: Path, num_proc: int, max_documents: int | None, say) -> tuple[np.ndarray, np.ndarray]:
        """Read every file once: each row's split hash and length; the rows' offsets go to ``work/offsets.npy``.
        With ``num_proc`` > 1, many files and enough bytes, files are read in parallel processes."""
        sizes = [os.path.getsize(path) for path in self.files]
        parallel = num_proc > 1 and len(self.files) > 1 and sum(sizes) >= PARALLEL_SCAN_BYTES
        jobs = [(index, self._kind(index)) for index in range(len(self.files))]
        found: list[ScannedFile] = []
        rows = 0
        for scanned in _map_files(self, jobs, num_proc if parallel else 1, sizes):
            if scanned.skipped is not None and not self.quiet_skips:
                say(scanned.skipped)
            if max_documents is not None and rows + len(scanned.u) > max_documents:
                keep = max_documents - rows
                scanned = ScannedFile(scanned.offsets[:keep], scanned.u[:keep], scanned.n_chars[:keep])
            found.append(scanned)
            rows += len(scanned.u)
            if max_documents is not None and rows >= max_documents:
                break
        if rows == 0:
            raise PipelineError(f"the corpus ({self.where}) is empty: it has no documents")
        self.files = self.files[: len(found)]
        if self.keys is not None:
            self.keys = self.keys[: len(found)]
        self.file_rows = np.cumsum([len(s.u) for s in found]).tolist()
        offsets = np.concatenate([s.offsets for s in found]).astype(np.int64)
        self.offsets_path = work / "offsets.npy"
        tmp = work / ".offsets.tmp.npy"
        np.save(tmp, offsets)
        os.replace(tmp, self.offsets_path)
        return np.concatenate([s.u for s in found]), np.concatenate([s.n_chars for s in found])

    def split_state(self) -> dict[str, np.ndarray]:
        """What a resumed build needs besides the split pass's hashes and lengths: the rows per file."""
        return {"file_rows": np.asarray(self.file_rows, np.int64)}

    def restore(self, work: Path, state: dict[str, np.ndarray]) -> None:
        """Take the split pass of a stopped build (its offsets file and the rows per file) instead of scanning."""
        self.offsets_path = work / "offsets.npy"
        self.file_rows = state["file_rows"].tolist()
        self.files = self.files[: len(self.file_rows)]
        if self.keys is not None:
            self.keys = self.keys[: len(self.file_rows)]

    def _kind(self, index: int) -> str:
        suffix = Path(self.files[index]).suffix
        if suffix in TEXT_SUFFIXES:
            return "text"
        if suffix in PARQUET_SUFFIXES:
            return "parquet"
        if suffix in JSON_SUFFIXES:
            return "json-array" if _starts_with(self.files[index], b"[") else "jsonl"
        raise PipelineError(f"{self.files[index]}: unsupported suffix {suffix!r}")

    def scan_file(self, index: int, kind: str) -> ScannedFile:
        path = self.files[index]
        if kind == "text":
            text = self._read_text_file(index)
            if text is None:
                return ScannedFile(*_empty_arrays(), skipped=f"left out {path}: not UTF-8 text")
            key = self.keys[index] if self.keys is not None else text
            return ScannedFile(np.zeros(1, np.int64), np.array([split_hash(key)]), np.array([len(text)], np.int64))
        offsets, u, n_chars = [], [], []
        if kind == "parquet":
            rows = enumerate(self._parquet_texts(index))
        else:
            rows = self._json_rows(index, kind)
        for offset, text in rows:
            offsets.append(offset)
            u.append(split_hash(text))
            n_chars.append(len(text))
        return ScannedFile(
            np.asarray(offsets, np.int64), np.asarray(u, np.float64).reshape(-1), np.asarray(n_chars, np.int64)
        )

    # ------------------------------------------------------------ reading rows

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of rows ``start .. stop - 1``, in order."""
        offsets = np.load(self.offsets_path, mmap_mode="r")
        out: list[str] = []
        row = start
        while row < stop:
            index = bisect_right(self.file_rows, row)
            first = self.file_rows[index - 1] if index else 0
            last = min(stop, self.file_rows[index])
            out.extend(self._read_rows(index, row - first, last - first, offsets[first : self.file_rows[index]]))
            row = last
        return out

    def texts_at(self, rows: np.ndarray) -> list[str]:
        """The texts of the given rows (sorted), one read per run of consecutive rows."""
        out: list[str] = []
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0:
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            out.extend(self.texts(int(run[0]), int(run[-1]) + 1))
        return out

    def _read_rows(self, index: int, a: int, b: int, offsets: np.ndarray) -> list[str]:
        """Rows ``a .. b - 1`` of file ``index`` (``offsets``: that file's rows' offsets)."""
        path = self.files[index]
        kind = self._kind(index)
        if kind == "text":
            text = self._read_text_file(index)
            if text is None:
                raise PipelineError(f"could not read {path}: it is no longer UTF-8 text (it changed during prepare)")
            return [text]
        if kind == "parquet":
            return self._parquet_rows(index, a, b)
        if kind == "json-array":
            if self._array is None or self._array[0] != index:
                self._array = (index, [text for _, text in self._json_rows(index, kind)])
            return self._array[1][a:b]
        start = int(offsets[a])
        end = int(offsets[b]) if b < len(offsets) else None
        texts = []
        with open(path, "rb") as f:
            f.seek(start)
            block = f.read() if end is None else f.read(end - start)
        for raw in block.split(b"\n"):  # as the split pass read it: lines end at \n
            if raw.strip():
                texts.append(self._json_text(raw, path))
        if len(texts) != b - a:
            raise PipelineError(f"{path} changed while the corpus was prepared (rows {a}..{b - 1} moved); run again")
        return texts

    # ------------------------------------------------------------ formats

    def _read_text_file(self, index: int) -> str | None:
        path = self.files[index]
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise PipelineError(f"could not read {path}: {err.strerror or err}") from err
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.skip_undecodable:
                return None
            raise PipelineError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from err

    def _json_rows(self, index: int, kind: str) -> Iterator[tuple[int, str]]:
        """(offset, text) of each document of a JSON-lines file, or of a file holding one JSON array."""
        path = self.files[index]
        try:
            f = open(path, "rb")
        except OSError as err:
            raise PipelineError(f"could not read {path}: {err.strerror or err}") from err
        with f:
            if kind == "json-array":
                try:
                    rows = json.load(f)
                except ValueError as err:
                    raise PipelineError(f"{path} is not valid JSON: {err}") from err
                if not isinstance(rows, list):
                    raise PipelineError(
                        f"{path} holds a JSON {type(rows).__name__}; give one object per line or a list"
                    )
                has_field = False
                for number, row in enumerate(rows):
                    has_field |= isinstance(row, dict) and self.text_field in row
                    yield number, self._field_text(row, path, f"item {number}")
                self._check_field_seen(has_field, rows[:1], path)
                return
            offset, has_field, first_row = 0, False, None
            for line_no, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except ValueError as err:
                    raise PipelineError(
                        f"{path} line {line_no} is not valid JSON ({err.msg}): {_preview(raw)}"
                    ) from err
                if first_row is None:
                    first_row = row
                has_field |= isinstance(row, dict) and self.text_field in row
                yield start, self._field_text(row, path, f"line {line_no}")
            self._check_field_seen(has_field, [first_row] if first_row is not None else [], path)

    def _json_text(self, raw: bytes, path: str) -> str:
        try:
            row = json.loads(raw)
        except ValueError as err:
            raise PipelineError(f"{path} changed while the corpus was prepared (a row moved); run again") from err
        return self._field_text(row, path, "a line")

    def _field_text(self, row, path: str, where: str) -> str:
        if not isinstance(row, dict):
            raise PipelineError(f"{path} {where} is a JSON {type(row).__name__}, not an object with a text field")
        value = row.get(self.text_field)
        if value is None:
            return ""  # a row without text: dropped and counted as documents_dropped_empty
        if not isinstance(value, str):
            raise PipelineError(
                f"{path} {where}: field data.text_field={self.text_field!r} holds {type(value).__name__}, not text"
            )
        return value

    def _check_field_seen(self, has_field: bool, first_rows: list, path: str) -> None:
        if not has_field and first_rows:
            fields = ", ".join(first_rows[0]) if isinstance(first_rows[0], dict) else "none"
            raise PipelineError(
                f"{path} has no text field data.text_field={self.text_field!r}; its fields are: {fields}"
            )

    def _parquet_file(self, index: int):
        import pyarrow.parquet as pq

        path = self.files[index]
        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise PipelineError(f"could not read {path} as parquet: {err}") from err
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            raise PipelineError(
                f"{path} has no text field data.text_field={self.text_field!r}; its fields are: {', '.join(names)}"
            )
        kind = parquet.schema_arrow.field(self.text_field).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise PipelineError(f"{path}: field data.text_field={self.text_field!r} holds {kind}, not text")
        return parquet

    def _parquet_texts(self, index: int) -> Iterator[str]:
        parquet = self._parquet_file(index)
        for group in range(parquet.num_row_groups):
            yield from (text or "" for text in self._row_group(parquet, index, group))

    def _parquet_rows(self, index: int, a: int, b: int) -> list[str]:
        parquet = self._parquet_file(index)
        out: list[str] = []
        first = 0
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if first + n > a and first < b:
                texts = self._row_group(parquet, index, group)
                out.extend(text or "" for text in texts[max(a - first, 0) : b - first])
            first += n
            if first >= b:
                break
        return out

    def _row_group(self, parquet, index: int, group: int) -> list:
        try:
            return parquet.read_row_group(group, columns=[self.text_field]).column(0).to_pylist()
        except Exception as err:
            raise PipelineError(f"could not read row group {group} of {self.files[index]}: {err}") from err


class ArrowDocuments:
    """A ``datasets.Dataset`` with a ``text`` column (``data=hf``); picklable as its Arrow files' paths."""

    def __init__(self, dataset, where: str = "") -> None:
        self.dataset, self.where = dataset, where

    def __len__(self) -> int:
        return len(self.dataset)

    def scan(self, work: Path, num_proc: int, max_documents: int | None, say) -> tuple[np.ndarray, np.ndarray]:
        dataset = self.dataset
        if len(dataset) == 0:
            raise PipelineError(f"the corpus ({self.where}) is empty: it has no documents")
        procs = min(num_proc, len(dataset)) if num_proc > 1 else None
        hashes = dataset.map(
            hash_batch,
            batched=True,
            num_proc=procs,
            remove_columns=dataset.column_names,
            keep_in_memory=True,
            desc="hashing documents",
        )
        return np.asarray(hashes["u"], dtype=np.float64), np.asarray(hashes["n_chars"], dtype=np.int64)

    def split_state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, work: Path, state: dict[str, np.ndarray]) -> None:
        """Nothing to restore: the dataset's rows are where they were."""

    def texts(self, start: int, stop: int) -> list[str]:
        try:
            return [text or "" for text in self.dataset[start:stop]["text"]]
        except Exception as err:  # datasets raises many types for a damaged file
            raise PipelineError(f"could not read rows {start}..{stop - 1} of {self.where}: {err}") from err

    def texts_at(self, rows: np.ndarray) -> list[str]:
        return [text or "" for text in self.dataset.select(rows)["text"]]


# ---------------------------------------------------------------- helpers


def _map_files(documents: FileDocuments, jobs: list[tuple[int, str]], processes: int, sizes: list[int]):
    """Each file's ScannedFile in file order, with a progress bar by bytes; in ``processes`` processes if > 1."""
    from tqdm.auto import tqdm

    total = sum(sizes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="indexing documents", disable=total < (256 << 20)) as bar:
        if processes <= 1:
            for (index, kind), size in zip(jobs, sizes, strict=True):
                yield documents.scan_file(index, kind)
                bar.update(size)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from pretrain.data.units import set_parent_death_signal

        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=set_parent_death_signal) as pool:
            chunk = max(1, len(jobs) // (processes * 8))
            results = pool.map(_scan_job, [(documents, index, kind) for index, kind in jobs], chunksize=chunk)
            for scanned, size in zip(results, sizes, strict=True):
                yield scanned
                bar.update(size)


def _scan_job(args) -> ScannedFile:
    documents, index, kind = args
    return documents.scan_file(index, kind)


def _empty_arrays():
    return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)


def _starts_with(path: str, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        raise PipelineError(f"could not read {path}: {err.strerror or err}") from err
    return head.lstrip()[: len(prefix)] == prefix


def _preview(raw: bytes, limit: int = 60) -> str:
    text = raw.decode("utf-8", "replace").rstrip("\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")
