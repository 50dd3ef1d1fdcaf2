"""The prepare stage: corpus -> sentencepiece tokenizer -> packed token shards, cached by a fingerprint of the inputs.

A prepared corpus is a directory ``<data.cache_dir>/<source>-<fingerprint[:16]>/`` holding

    spm.model, spm.vocab   the tokenizer (trained on a sample of the train split, or a copy of data.tokenizer)
    train.bin, val.bin     packed token shards (pretrain.data.shards): every document followed by one EOS
    val_docs.npy           [val documents + 1] int64 offsets of the validation documents in val.bin
    inputs.json            everything the fingerprint was computed from (file sizes and mtimes, settings)
    meta.json              vocab size, dtype, special ids, documents and tokens per split; written last

The fingerprint covers the inputs (file list with sizes and mtimes; or the hub name, config, split and data
files), the split (``val_fraction``, ``max_documents``/``max_files``) and the tokenizer (vocab size, type,
sample size, trainer options; or the given model's sha256). Unchanged inputs reuse the directory at once;
anything changed lands in a new one. The directory is built under a temporary name beside it and renamed
into place at the end, so a killed prepare never leaves a directory that looks complete. In a multi-rank
run rank 0 prepares while the other ranks wait, then they all read the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config import Config, DataConfig
from pretrain.data.corpus import describe_inputs, hash_batch, load_documents, split_flags, split_hash
from pretrain.data.shards import ShardWriter, open_shard, token_dtype
from pretrain.data.tokenizer import (
    TRAINER_OPTIONS,
    DocumentTokenizer,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from pretrain.errors import PipelineError
from pretrain.parallel.distributed import pid_alive, run_on_main
from pretrain.run_files import RunFiles, file_sha256, write_atomic

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "spm.model"
# data=mix: each source's shards in sources/<label>/.
SOURCES_DIR = "sources"
# Documents per batch while tokenizing and writing shards.
BATCH_DOCS = 1000


@dataclass(frozen=True)
class SourceShards:
    """One source of a prepared mixture (``data=mix``): its label, weight and shards."""

    label: str
    kind: str
    weight: float
    train_path: Path
    val_path: Path
    val_docs_path: Path


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared-corpus directory; ``metadata`` is its ``meta.json``.

    A mixture (``data=mix``) has ``sources``, each with its own shards, and no train shard of its own
    (``train_path`` is None); its ``val_path`` holds every source's validation documents, source after source."""

    directory: Path
    tokenizer_path: Path
    train_path: Path | None
    val_path: Path
    val_docs_path: Path
    dtype: str
    vocab_size: int
    metadata: dict[str, Any] = field(repr=False)
    sources: tuple[SourceShards, ...] = ()

    def tokens(self, split: str) -> np.ndarray:
        """The split's shard as a read-only memmap ``[n_tokens]`` (``split`` is ``train`` or ``val``)."""
        if split == "train" and self.train_path is None:
            raise PipelineError(f"the mixture {self.directory} has a train shard per source (corpus.sources)")
        return open_shard(self.train_path if split == "train" else self.val_path, self.dtype)

    def val_documents(self) -> Iterator[np.ndarray]:
        """The validation documents in order, each ``[n_tokens]`` ending in EOS (views into the memmap)."""
        tokens = self.tokens("val")
        offsets = np.load(self.val_docs_path)
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            yield tokens[start:end]

    @classmethod
    def open(cls, directory: Path) -> PreparedCorpus | None:
        """The corpus in ``directory`` if it is complete (meta.json written, shard sizes as recorded), else None."""
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT_VERSION:
            return None
        train_file = meta["splits"]["train"]["file"]
        sources = tuple(
            SourceShards(
                label=source["label"],
                kind=source["kind"],
                weight=source["weight"],
                train_path=directory / source["splits"]["train"]["file"],
                val_path=directory / source["splits"]["val"]["file"],
                val_docs_path=directory / source["splits"]["val"]["boundaries"],
            )
            for source in meta.get("sources", ())
        )
        corpus = cls(
            directory=directory,
            tokenizer_path=directory / TOKENIZER_FILE,
            train_path=None if train_file is None else directory / train_file,
            val_path=directory / meta["splits"]["val"]["file"],
            val_docs_path=directory / meta["splits"]["val"]["boundaries"],
            dtype=meta["dtype"],
            vocab_size=meta["vocab_size"],
            metadata=meta,
            sources=sources,
        )
        itemsize = np.dtype(corpus.dtype).itemsize
        shards = [(corpus.val_path, meta["splits"]["val"]["tokens"])]
        if corpus.train_path is not None:
            shards.append((corpus.train_path, meta["splits"]["train"]["tokens"]))
        for shard, recorded in zip(sources, meta.get("sources", ()), strict=True):
            splits = recorded["splits"]
            shards += [(shard.train_path, splits["train"]["tokens"]), (shard.val_path, splits["val"]["tokens"])]
            if not shard.val_docs_path.is_file():
                return None
        for path, tokens in shards:
            if not path.is_file() or path.stat().st_size != tokens * itemsize:
                return None
        if not corpus.tokenizer_path.is_file() or not corpus.val_docs_path.is_file():
            return None
        return corpus


# ---------------------------------------------------------------- fingerprint and location


def fingerprint_inputs(data: DataConfig) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the description it hashes): the inputs, the split and the tokenizer settings."""
    if data.tokenizer:
        path = Path(data.tokenizer).expanduser()
        if not path.is_file():
            raise PipelineError(f"data.tokenizer={data.tokenizer!r}: no such file (give a sentencepiece .model file)")
        tokenizer = {"given": str(path.resolve()), "sha256": file_sha256(path)}
    else:
        tokenizer = {
            "vocab_size": data.vocab_size,
            "type": data.tokenizer_type,
            "sample_chars": data.tokenizer_sample_chars,
            "options": TRAINER_OPTIONS,
        }
    if data.source == "mix":
        # Every source's inputs, weight and label, in order (the order of the sources is the loader's too).
        description = {
            "format": FORMAT_VERSION,
            "mixture": [
                {
                    "label": source.label,
                    "weight": source.weight,
                    "inputs": describe_inputs(source.as_data(data)),
                    "max_files": source.max_files,
                }
                for source in data.sources
            ],
            "val_fraction": data.val_fraction,
            "tokenizer": tokenizer,
        }
    else:
        description = {
            "format": FORMAT_VERSION,
            "inputs": describe_inputs(data),
            "max_files": data.max_files,
            "val_fraction": data.val_fraction,
            "tokenizer": tokenizer,
        }
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), description


def corpus_dir(data: DataConfig, fingerprint: str) -> Path:
    return Path(data.cache_dir).expanduser().resolve() / f"{data.source}-{fingerprint[:16]}"


def load_prepared(cfg: Config | DataConfig) -> PreparedCorpus:
    """The prepared corpus for these ``data.*`` settings; a PipelineError if it has not been prepared."""
    data = cfg.data if isinstance(cfg, Config) else cfg
    fingerprint, _ = fingerprint_inputs(data)
    directory = corpus_dir(data, fingerprint)
    corpus = PreparedCorpus.open(directory)
    if corpus is None:
        raise PipelineError(
            f"no prepared corpus for these data.* settings at {directory}; run `pretrain stage=prepare` "
            "with the same settings first"
        )
    return corpus


# ---------------------------------------------------------------- the stage


def run_prepare(cfg: Config, ctx, install: bool = True) -> PreparedCorpus:
    """Prepare (or reuse) the corpus on rank 0 while other ranks wait; with ``install``, copy its tokenizer into the
    run directory (a stage that checks the run first installs it itself, ``install_tokenizer``).

    Every rank returns the same PreparedCorpus. A failure on rank 0 is raised on every rank.
    """
    prepared: list[PreparedCorpus] = []  # rank 0's, kept rather than read back

    def prepare() -> str:
        corpus = prepare_corpus(cfg.data)
        if install:
            install_tokenizer(corpus, cfg.run_dir)
        prepared.append(corpus)
        return str(corpus.directory)

    detail = run_on_main(ctx, prepare, "prepare the corpus")
    if ctx.is_main:
        return prepared[0]
    corpus = PreparedCorpus.open(Path(detail))
    if corpus is None:
        raise PipelineError(
            f"rank {ctx.rank} cannot read the corpus rank 0 prepared at {detail}; data.cache_dir must be on "
            "storage that every node shares"
        )
    return corpus


def install_tokenizer(corpus: PreparedCorpus, run_dir: str | Path) -> Path:
    """Copy the corpus's tokenizer to ``<run_dir>/tokenizer/spm.model`` (a contract path); return it."""
    target = RunFiles(run_dir).tokenizer
    source_bytes = corpus.tokenizer_path.read_bytes()
    if target.is_file():
        if target.read_bytes() == source_bytes:
            return target
        _say(f"replacing {target}: this run's tokenizer changed (other data.* settings than before)")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, source_bytes)
    return target


def prepare_corpus(data: DataConfig, verbose: bool = True) -> PreparedCorpus:
    """Reuse the prepared corpus for these inputs, or build it (in this process)."""
    fingerprint, description = fingerprint_inputs(data)
    final = corpus_dir(data, fingerprint)
    corpus = PreparedCorpus.open(final)
    if corpus is not None:
        if verbose:
            meta = corpus.metadata
            _say(
                f"reusing the prepared corpus at {final} (inputs unchanged; {_docs_total(meta):,} documents, "
                f"{_tokens_total(meta) / 1e6:.2f}M tokens)"
            )
        return corpus
    if final.exists():
        _say(f"removing the incomplete prepared corpus at {final}")
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final.parent)
    build = final.parent / f".tmp-{final.name}-{_host()}-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        started = time.perf_counter()
        meta = _build(data, fingerprint, build)
        if "mixture" in description:
            meta["inputs"] = {
                "sources": [
                    {"label": part["label"], "weight": part["weight"], **_summarize_inputs(part["inputs"])}
                    for part in description["mixture"]
                ]
            }
        else:
            meta["inputs"] = _summarize_inputs(description["inputs"])
        meta["seconds"]["total"] = round(time.perf_counter() - started, 3)
        (build / "inputs.json").write_text(json.dumps(description, indent=1, sort_keys=True, default=str))
        # meta.json last: a directory without it is never taken for a complete corpus.
        (build / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        shutil.rmtree(build / "work", ignore_errors=True)
        try:
            os.rename(build, final)
        except OSError:
            # Another process finished the same corpus first: keep theirs.
            if PreparedCorpus.open(final) is None:
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    corpus = PreparedCorpus.open(final)
    assert corpus is not None, f"{final} is incomplete right after it was built"
    if verbose:
        _say_summary(corpus)
    return corpus


# ---------------------------------------------------------------- building


def _build(data: DataConfig, fingerprint: str, build: Path) -> dict[str, Any]:
    work = build / "work"
    work.mkdir()
    timings: dict[str, float] = {}
    if data.source == "mix":
        stats = _build_mixture(data, fingerprint, build, timings)
    else:
        t0 = time.perf_counter()
        dataset = load_documents(data, work)
        timings["load"] = time.perf_counter() - t0
        stats = _build_single(data, dataset, fingerprint, build, timings)
    sp = load_tokenizer(build / TOKENIZER_FILE)
    vocab_size = sp.get_piece_size()
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": data.source,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size),
        "special_ids": special_ids(sp),
        "splits": {
            "train": {"file": "train.bin", "documents": stats["train"].documents, "tokens": stats["train"].tokens},
            "val": {
                "file": "val.bin",
                "boundaries": "val_docs.npy",
                "documents": stats["val"].documents,
                "tokens": stats["val"].tokens,
            },
        },
        "documents_dropped_empty": stats["dropped"],
        "tokenizer": {
            "trained": data.tokenizer is None,
            "type": data.tokenizer_type if data.tokenizer is None else sp_model_type(sp),
            "sample_chars": stats.get("sample_chars"),
            "given": data.tokenizer,
            "sha256": file_sha256(build / TOKENIZER_FILE),
        },
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    if data.source == "mix":
        # No train.bin of its own: each source's train shard is read by the mixture's loader.
        meta["splits"]["train"]["file"] = None
        meta["sources"] = stats["sources"]
    return meta


def _build_single(data: DataConfig, dataset, fingerprint: str, build: Path, timings: dict) -> dict[str, Any]:
    """One corpus: split, tokenizer (trained on its sample, or given), shards in ``build``."""
    part = _part(data, dataset, build / "work", fingerprint[:16], _where(data), timings)
    sample_chars = _make_tokenizer(data, build, [(part, data.tokenizer_sample_chars)], timings)
    t0 = time.perf_counter()
    writers = _open_writers(build, build)
    dropped = part.write(build / TOKENIZER_FILE, writers)
    timings["tokenize"] = time.perf_counter() - t0
    _close_writers(writers, build)
    part.check_written(writers)
    return {**writers, "dropped": dropped, "sample_chars": sample_chars}


def _build_mixture(data: DataConfig, fingerprint: str, build: Path, timings: dict) -> dict[str, Any]:
    """``data=mix``: every source split on its own, one tokenizer trained on a sample that gives each source its
    weight's share of ``data.tokenizer_sample_chars``, then each source packed into ``sources/<label>/``; the
    validation shards are also concatenated (source after source) into ``val.bin`` for the eval stage."""
    total_weight = sum(source.weight for source in data.sources)
    parts = []
    for source in data.sources:
        sdata = source.as_data(data)
        t0 = time.perf_counter()
        dataset = load_documents(sdata, build / "work" / source.label)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - t0
        where = f"source {source.label!r} ({_where(sdata)})"
        tag = f"{fingerprint[:16]}-{source.label}"
        part = _part(sdata, dataset, build / "work" / source.label, tag, where, timings)
        share = int(data.tokenizer_sample_chars * source.weight / total_weight)
        parts.append((source, part, share))
    sample_chars = _make_tokenizer(data, build, [(part, share) for _, part, share in parts], timings)
    t0 = time.perf_counter()
    described, val_parts, dropped = [], [], 0
    totals = {"train": _Count(), "val": _Count()}
    for source, part, share in parts:
        directory = build / SOURCES_DIR / source.label
        directory.mkdir(parents=True)
        writers = _open_writers(build, directory)
        source_dropped = part.write(build / TOKENIZER_FILE, writers)
        _close_writers(writers, directory)
        part.check_written(writers)
        dropped += source_dropped
        for split, writer in writers.items():
            totals[split].documents += writer.documents
            totals[split].tokens += writer.tokens
        val_parts.append(directory)
        rel = directory.relative_to(build).as_posix()
        described.append(
            {
                "label": source.label,
                "kind": source.kind,
                "weight": source.weight,
                "share": source.weight / total_weight,
                "splits": {
                    "train": {
                        "file": f"{rel}/train.bin",
                        "documents": writers["train"].documents,
                        "tokens": writers["train"].tokens,
                    },
                    "val": {
                        "file": f"{rel}/val.bin",
                        "boundaries": f"{rel}/val_docs.npy",
                        "documents": writers["val"].documents,
                        "tokens": writers["val"].tokens,
                    },
                },
                "documents_dropped_empty": source_dropped,
                "tokenizer_sample_chars": share if data.tokenizer is None else None,
            }
        )
    _concatenate_val(val_parts, build)
    timings["tokenize"] = time.perf_counter() - t0
    return {**totals, "dropped": dropped, "sample_chars": sample_chars, "sources": described}


class _Count:
    def __init__(self) -> None:
        self.documents = 0
        self.tokens = 0


def _concatenate_val(directories: list[Path], build: Path) -> None:
    """``val.bin`` and ``val_docs.npy`` of the whole mixture: the sources' validation shards back to back."""
    offsets = [np.zeros(1, dtype=np.int64)]
    with open(build / "val.bin", "wb") as out:
        for directory in directories:
            out.write((directory / "val.bin").read_bytes())
            own = np.load(directory / "val_docs.npy")
            offsets.append(own[1:] + offsets[-1][-1])
    np.save(build / "val_docs.npy", np.concatenate(offsets))


def _make_tokenizer(data: DataConfig, build: Path, shares: list, timings: dict) -> int | None:
    """Copy the given ``data.tokenizer``, or train one on each part's sample of at most its share of characters;
    return the sample's size (None for a given tokenizer)."""
    t0 = time.perf_counter()
    sample_chars = None
    if data.tokenizer:
        _copy_given_tokenizer(data.tokenizer, build)
    else:
        sample = [text for part, share in shares for text in part.sample(share)]
        if not sample:
            raise PipelineError(f"the corpus ({_where(data)}) is empty: it gave no training text for the tokenizer")
        sample_chars = sum(map(len, sample))
        _train(data, sample, build)
    timings["tokenizer"] = timings.get("tokenizer", 0.0) + time.perf_counter() - t0
    return sample_chars


def _part(data: DataConfig, dataset, work: Path, tag: str, where: str, timings: dict):
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return _StreamPart(data, dataset, where)
    return _MapPart(data, dataset, work, tag, where, timings)


class _MapPart:
    """A map-style dataset: hash split (at once), a sample of train in hash order, tokenized with num_proc."""

    def __init__(self, data: DataConfig, dataset, work: Path, tag: str, where: str, timings: dict) -> None:
        self.data, self.dataset, self.work, self.tag, self.where = data, dataset, work, tag, where
        self.num_proc = min(data.num_proc, len(dataset)) if data.num_proc > 1 else None
        if len(dataset) == 0:
            raise PipelineError(f"the corpus ({where}) is empty: it has no documents")
        t0 = time.perf_counter()
        hashes = dataset.map(
            hash_batch,
            batched=True,
            num_proc=self.num_proc,
            remove_columns=dataset.column_names,
            cache_file_name=str(work / "hash.arrow"),
            new_fingerprint=f"{tag}-hash",
            desc="hashing documents",
        )
        self.u = np.asarray(hashes["u"], dtype=np.float64)
        self.n_chars = np.asarray(hashes["n_chars"], dtype=np.int64)
        self.is_val = split_flags(self.u, self.n_chars, data.val_fraction, where)
        timings["split"] = timings.get("split", 0.0) + time.perf_counter() - t0

    def sample(self, max_chars: int) -> list[str]:
        """The train documents in the order of their hash (a fixed shuffle), until ``max_chars`` are taken."""
        if max_chars <= 0:
            return []
        u, n_chars = self.u, self.n_chars
        train_ids = np.flatnonzero(~self.is_val & (n_chars > 0))
        order = train_ids[np.argsort(u[train_ids], kind="stable")]
        taken = int(np.searchsorted(np.cumsum(n_chars[order]), max_chars)) + 1
        chosen = np.sort(order[:taken])
        texts = self.dataset.select(chosen)["text"]
        return _cap_chars(texts, max_chars)

    def write(self, tokenizer_path: Path, writers: dict[str, ShardWriter]) -> int:
        """Tokenize every document into the writers; return the number of empty documents dropped."""
        from datasets import Features, Sequence, Value

        dataset = self.dataset
        tokenized = dataset.map(
            _TokenizeSplitBatch(tokenizer_path, self.is_val),
            batched=True,
            batch_size=BATCH_DOCS,
            with_indices=True,
            input_columns=["text"],
            num_proc=self.num_proc,
            remove_columns=dataset.column_names,
            features=Features({"ids": Sequence(Value("int32")), "is_val": Value("bool")}),
            cache_file_name=str(self.work / "tokens.arrow"),
            new_fingerprint=f"{self.tag}-tokens",
            desc="tokenizing",
        )
        for table in _progress(tokenized.with_format("arrow").iter(batch_size=10 * BATCH_DOCS), len(tokenized)):
            flags = table.column("is_val").to_numpy(zero_copy_only=False)
            for split, writer in writers.items():
                part = table.filter(flags if split == "val" else ~flags)
                if part.num_rows:
                    writer.write(*_flatten(part.column("ids")))
        return int((self.n_chars == 0).sum())

    def check_written(self, writers: dict[str, ShardWriter]) -> None:
        """Nothing to check: ``split_flags`` guarantees a document on each side."""


class _StreamPart:
    """A stream, read once: its first documents (up to the sample) train the tokenizer, then all are tokenized."""

    def __init__(self, data: DataConfig, stream, where: str) -> None:
        self.data, self.where = data, where
        self.docs = iter(stream)
        self.buffered: list[tuple[str, bool]] = []

    def sample(self, max_chars: int) -> list[str]:
        if max_chars <= 0:
            return []
        sample_chars = 0
        for doc in self.docs:
            text = doc["text"] or ""
            is_val = split_hash(text) < self.data.val_fraction
            self.buffered.append((text, is_val))
            if not is_val:
                sample_chars += len(text)
                if sample_chars >= max_chars:
                    break
        sample = _cap_chars([t for t, v in self.buffered if not v and t], max_chars)
        if not sample:
            raise PipelineError(f"the corpus ({self.where}) is empty: the stream gave no training text")
        return sample

    def _rest(self) -> Iterator[tuple[str, bool]]:
        yield from self.buffered
        for doc in self.docs:
            text = doc["text"] or ""
            yield text, split_hash(text) < self.data.val_fraction

    def write(self, tokenizer_path: Path, writers: dict[str, ShardWriter]) -> int:
        tokenizer = DocumentTokenizer(tokenizer_path, num_threads=self.data.num_proc)
        dropped = 0
        batch: list[tuple[str, bool]] = []
        bar = _progress(None, self.data.max_documents, unit="doc")
        for text, is_val in self._rest():
            if not text:
                dropped += 1
                continue
            batch.append((text, is_val))
            if len(batch) == BATCH_DOCS:
                _write_stream_batch(tokenizer, batch, writers)
                bar.update(len(batch))
                batch = []
        if batch:
            _write_stream_batch(tokenizer, batch, writers)
            bar.update(len(batch))
        bar.close()
        return dropped

    def check_written(self, writers: dict[str, ShardWriter]) -> None:
        if writers["train"].documents == 0:
            raise PipelineError(f"the corpus ({self.where}) is empty: no document with text went to the train split")
        if writers["val"].documents == 0:
            raise PipelineError(
                f"no document of the stream ({self.where}) fell into the validation split (data.val_fraction="
                f"{self.data.val_fraction}); raise data.val_fraction or data.max_documents"
            )


class _TokenizeSplitBatch:
    """``datasets.map`` batch function: texts -> ``ids`` (EOS-terminated) and ``is_val``; empty documents dropped."""

    def __init__(self, model_path: Path, is_val: np.ndarray) -> None:
        self.tokenizer = DocumentTokenizer(model_path)
        self.is_val = is_val

    def __call__(self, texts: list[str | None], indices: list[int]) -> dict[str, list]:
        keep = [i for i, text in enumerate(texts) if text]
        ids = self.tokenizer.encode([texts[i] for i in keep])
        return {"ids": ids, "is_val": [bool(self.is_val[indices[i]]) for i in keep]}


def _write_stream_batch(tokenizer: DocumentTokenizer, batch: list[tuple[str, bool]], writers: dict) -> None:
    ids = tokenizer.encode([text for text, _ in batch])
    for split, writer in writers.items():
        docs = [doc for doc, (_, is_val) in zip(ids, batch, strict=True) if is_val == (split == "val")]
        if docs:
            lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
            flat = np.fromiter((t for doc in docs for t in doc), dtype=np.int64, count=int(lengths.sum()))
            writer.write(flat, lengths)


def _flatten(column) -> tuple[np.ndarray, np.ndarray]:
    """A chunked arrow list column -> (concatenated ids, per-document lengths)."""
    import pyarrow.compute as pc

    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return flat, lengths


def _open_writers(build: Path, directory: Path) -> dict[str, ShardWriter]:
    """Writers of ``train.bin`` and ``val.bin`` in ``directory``, in the dtype of the tokenizer in ``build``."""
    vocab_size = load_tokenizer(build / TOKENIZER_FILE).get_piece_size()
    dtype = token_dtype(vocab_size)
    return {
        "train": ShardWriter(directory / "train.bin", dtype, vocab_size),
        "val": ShardWriter(directory / "val.bin", dtype, vocab_size, keep_boundaries=True),
    }


def _close_writers(writers: dict[str, ShardWriter], directory: Path) -> None:
    for writer in writers.values():
        writer.close()
    writers["val"].save_boundaries(directory / "val_docs.npy")


def _train(data: DataConfig, sample: list[str], build: Path) -> None:
    chars = sum(map(len, sample))
    _say(
        f"training a {data.tokenizer_type} tokenizer (data.vocab_size={data.vocab_size}) on "
        f"{len(sample):,} documents, {chars / 1e6:.1f}M characters"
    )
    train_tokenizer(sample, build / "spm", data.vocab_size, data.tokenizer_type, num_threads=data.num_proc)


def _copy_given_tokenizer(path: str, build: Path) -> None:
    load_tokenizer(path)  # a clear error for a file that is not a model
    shutil.copyfile(Path(path).expanduser(), build / TOKENIZER_FILE)


def _cap_chars(texts: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if not text:
            continue
        out.append(text[: max_chars - total])
        total += len(out[-1])
        if total >= max_chars:
            break
    return out


def sp_model_type(sp) -> str:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()


# ---------------------------------------------------------------- housekeeping and messages


def _remove_stale_builds(cache_root: Path) -> None:
    """Delete temporary build directories that killed prepares on this host left in ``cache_root``."""
    leftover = re.compile(rf"\.tmp-.+-{re.escape(_host())}-(\d+)")
    for stale in cache_root.glob(".tmp-*"):
        match = leftover.fullmatch(stale.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())


def _where(data: DataConfig) -> str:
    if data.source in ("stdlib", "mix"):
        return f"data={data.source}"
    if data.source == "files":
        return f"data.paths={list(data.paths)}"
    return f"data.name={data.name!r}"


def _summarize_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in inputs.items() if k not in ("files", "saved_dir", "data_files")}
    if "files" in inputs:
        summary["files"] = len(inputs["files"])
        summary["bytes"] = sum(f[1] for f in inputs["files"])
    return summary


def _versions() -> dict[str, str]:
    import datasets
    import sentencepiece

    return {"sentencepiece": sentencepiece.__version__, "datasets": datasets.__version__}


def _docs_total(meta: dict) -> int:
    return sum(split["documents"] for split in meta["splits"].values())


def _tokens_total(meta: dict) -> int:
    return sum(split["tokens"] for split in meta["splits"].values())


def _say_summary(corpus: PreparedCorpus) -> None:
    meta = corpus.metadata
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    tokens = _tokens_total(meta)
    seconds = meta["seconds"]["total"]
    disk = sum(p.stat().st_size for p in corpus.directory.rglob("*") if p.is_file())
    _say(
        f"prepared {meta['source']}: {_docs_total(meta):,} documents ({train['documents']:,} train / "
        f"{val['documents']:,} val), {tokens / 1e6:.2f}M tokens ({train['tokens'] / 1e6:.2f}M / "
        f"{val['tokens'] / 1e6:.2f}M), vocab {meta['vocab_size']} ({meta['dtype']}), {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9) / 1e3:,.0f}k tokens/s), {disk / 1e6:.1f} MB on disk -> {corpus.directory}"
    )
    for source in meta.get("sources", ()):
        train, val = source["splits"]["train"], source["splits"]["val"]
        _say(
            f"  source {source['label']!r} ({source['kind']}, weight {source['weight']:g} = "
            f"{source['share']:.1%} of training windows): {train['documents']:,} train / {val['documents']:,} val "
            f"documents, {train['tokens'] / 1e6:.2f}M / {val['tokens'] / 1e6:.2f}M tokens"
        )
    dropped = meta.get("documents_dropped_empty", 0)
    if dropped:
        _say(
            f"skipped {dropped:,} documents without text (an empty text, or a row whose data.text_field is missing "
            "or null); meta.json counts them as documents_dropped_empty"
        )


def _say(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def _progress(iterable, total: int | None, unit: str = "doc"):
    from tqdm.auto import tqdm

    if iterable is None:
        return tqdm(total=total, unit=unit, desc="tokenizing stream")
    return _counting(iterable, tqdm(total=total, unit=unit, desc="writing shards"))


def _counting(tables, bar) -> Iterator:
    for table in tables:
        yield table
        bar.update(table.num_rows)
    bar.close()
