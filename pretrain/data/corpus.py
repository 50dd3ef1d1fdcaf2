"""Corpus sources: which documents ``data=stdlib|files|hf`` names, and the cheap description of them.

- ``stdlib``: every ``.py`` file of the running Python's standard library (``site-packages`` and
  ``__pycache__`` left out, and the few files that are not UTF-8), one document per file, in sorted order
  of the relative path, which is also the document's ``key``.
- ``files``: ``data.paths`` globs; ``.txt``/``.md``/``.py`` files are one document each, ``.jsonl``/``.json``
  and ``.parquet`` files one document per row (column ``data.text_field``), read directly by
  ``pretrain.data.documents`` (no conversion).
- ``hf``: ``datasets.load_dataset(data.name, data.config, split=data.split, streaming=data.streaming,
  data_files=data.data_files)``, or a directory written by ``save_to_disk``.

Documents are split into train and validation by a hash of a key (the path for stdlib, the text itself
otherwise: duplicates land on the same side), so the split is stable across runs and machines.
``describe_inputs`` is the cheap description of the inputs (file sizes and mtimes, no reading) that the
prepared corpus's fingerprint is made of.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config import DataConfig
from pretrain.errors import PipelineError

# The suffixes data=files reads (pretrain.data.documents says how).
LOADERS = (".txt", ".md", ".py", ".jsonl", ".json", ".parquet")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def split_hash(key: str) -> float:
    """A key's place in [0, 1): below ``val_fraction`` means validation. Stable across runs and platforms."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def hash_batch(batch: dict[str, list]) -> dict[str, list]:
    """``datasets.map`` batch function: ``u`` (the split hash of ``key``, else of ``text``) and ``n_chars``."""
    texts = [t or "" for t in batch["text"]]
    keys = batch["key"] if "key" in batch else texts
    return {"u": [split_hash(k) for k in keys], "n_chars": [len(t) for t in texts]}


# ---------------------------------------------------------------- file lists


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int | None = None) -> list[str]:
    """Relative posix paths of the standard library's ``.py`` files, sorted; the first ``max_files`` if set."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    found.sort()
    return found[:max_files] if max_files else found


def expand_paths(patterns: list[str], max_files: int | None = None) -> list[Path]:
    """The files ``data.paths`` names (globs, ``**`` allowed; a directory means the files below it), sorted."""
    files: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise PipelineError(f"data.paths: {pattern!r} matches no file")
        for match in map(Path, matches):
            if match.is_dir():
                below = [p for p in match.rglob("*") if p.is_file() and p.suffix in LOADERS]
                if not below:
                    raise PipelineError(f"data.paths: directory {str(match)!r} holds no {'/'.join(LOADERS)} file")
                files.update(below)
            elif match.suffix not in LOADERS:
                raise PipelineError(
                    f"data.paths: {str(match)!r} has an unsupported suffix; use {', '.join(LOADERS)} files"
                )
            else:
                files.add(match)
    ordered = sorted((p.resolve() for p in files), key=str)
    return ordered[:max_files] if max_files else ordered


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _saved_dataset_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return path
    return None


def describe_inputs(data: DataConfig) -> dict[str, Any]:
    """What the corpus is made of, cheaply (stat, no reading): the inputs half of the cache fingerprint."""
    common = {"source": data.source, "max_documents": data.max_documents}
    if data.source == "stdlib":
        root = stdlib_root()
        files = [[rel, *_stat(root / rel)[1:]] for rel in stdlib_files(data.max_files)]
        if not files:
            raise PipelineError(f"data=stdlib: no .py files found under {root}")
        return {**common, "root": str(root), "python": sys.version, "files": files}
    if data.source == "files":
        files = [_stat(p) for p in expand_paths(data.paths, data.max_files)]
        return {**common, "text_field": data.text_field, "files": files}
    described: dict[str, Any] = {
        **common,
        "name": data.name,
        "config": data.config,
        "split": data.split,
        "streaming": data.streaming,
        "text_field": data.text_field,
    }
    saved = _saved_dataset_dir(data.name)
    if saved is not None:
        described["saved_dir"] = sorted(_stat(p) for p in saved.rglob("*") if p.is_file())
    if data.data_files:
        local = []
        for pattern in data.data_files:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            # Remote data files (URLs, hf://) are described by name only.
            local.append([_stat(Path(m)) for m in matches] if matches else pattern)
        described["data_files"] = local
    return described


# ---------------------------------------------------------------- loading


def load_hf(data: DataConfig):
    """``data=hf``: a ``datasets.Dataset`` (or ``IterableDataset`` when streaming) with a ``text`` column, the first
    ``data.max_documents`` rows when that is set."""
    dataset = _load_hf(data)
    if data.max_documents is not None:
        from datasets import IterableDataset

        if isinstance(dataset, IterableDataset):
            dataset = dataset.take(data.max_documents)
        else:
            dataset = dataset.select(range(min(data.max_documents, len(dataset))))
    return dataset


def _load_hf(data: DataConfig):
    from datasets import DatasetDict, load_dataset, load_from_disk

    where = f"data.name={data.name!r}"
    try:
        saved = _saved_dataset_dir(data.name)
        if saved is not None:
            dataset = load_from_disk(str(saved))
            if isinstance(dataset, DatasetDict):
                if data.split not in dataset:
                    raise PipelineError(f"{where} has no split data.split={data.split!r}; it has: {', '.join(dataset)}")
                dataset = dataset[data.split]
            if data.streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = load_dataset(
                data.name,
                data.config,
                split=data.split,
                streaming=data.streaming,
                data_files=list(data.data_files) or None,
            )
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(f"could not load {where} (config={data.config!r}, split={data.split!r}): {err}") from err
    return _text_column(dataset, data.text_field, where)


def _text_column(dataset, text_field: str, where: str):
    """Keep only ``text_field``, renamed ``text``; a missing or non-text column is the user's error."""
    columns = dataset.column_names
    if columns is None:  # a stream whose schema is unknown until read
        first = next(iter(dataset), None)
        if first is None:
            raise PipelineError(f"{where} is empty")
        columns = list(first)
    if text_field not in columns:
        raise PipelineError(
            f"{where} has no text field data.text_field={text_field!r}; its fields are: {', '.join(columns)}"
        )
    features = dataset.features
    if features is not None:
        dtype = getattr(features[text_field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise PipelineError(f"{where}: field data.text_field={text_field!r} holds {features[text_field]}, not text")
    dataset = dataset.select_columns([text_field])
    return dataset if text_field == "text" else dataset.rename_column(text_field, "text")


def split_flags(u: np.ndarray, n_chars: np.ndarray, val_fraction: float, where: str) -> np.ndarray:
    """Which documents are validation: hash below ``val_fraction``; at least one, and at least one train.

    Empty documents are dropped later and count for neither side.
    """
    nonempty = n_chars > 0
    n_docs = int(nonempty.sum())
    if n_docs == 0:
        raise PipelineError(f"the corpus ({where}) is empty: it has no document with any text")
    if n_docs < 2:
        raise PipelineError(
            f"the corpus ({where}) has only 1 document with text; it needs at least 2 (train and validation)"
        )
    is_val = (u < val_fraction) & nonempty
    if not is_val.any():
        # A small corpus where no key hashed low enough: its lowest-hash document validates.
        is_val[np.argmin(np.where(nonempty, u, np.inf))] = True
    if is_val.sum() == n_docs:
        is_val[np.argmax(np.where(nonempty, u, -np.inf))] = False
    return is_val
