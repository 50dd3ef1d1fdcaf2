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
from pretrain.parallel.distributed import broadcast_from_main, pid_alive
from pretrain.run_files import RunFiles, file_sha256, write_atomic

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "spm.model"
# Documents per batch while tokenizing and writing shards.
BATCH_DOCS = 1000


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared-corpus directory; ``metadata`` is its ``meta.json``."""

    directory: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    val_docs_path: Path
    dtype: str
    vocab_size: int
    metadata: dict[str, Any] = field(repr=False)

    def tokens(self, split: str) -> np.ndarray:
        """The split's shard as a read-only memmap ``[n_tokens]`` (``split`` is ``train`` or ``val``)."""
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
        corpus = cls(
            directory=directory,
            tokenizer_path=directory / TOKENIZER_FILE,
            train_path=directory / meta["splits"]["train"]["file"],
            val_path=directory / meta["splits"]["val"]["file"],
            val_docs_path=directory / meta["splits"]["val"]["boundaries"],
            dtype=meta["dtype"],
            vocab_size=meta["vocab_size"],
            metadata=meta,
        )
        itemsize = np.dtype(corpus.dtype).itemsize
        for path, split in ((corpus.train_path, "train"), (corpus.val_path, "val")):
            if not path.is_file() or path.stat().st_size != meta["splits"][split]["tokens"] * itemsize:
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
    if ctx.is_main:
        corpus, failure = None, None
        try:
            corpus = prepare_corpus(cfg.data)
            if install:
                install_tokenizer(corpus, cfg.run_dir)
            status = ("ok", str(corpus.directory))
        except Exception as err:
            failure = err
            status = ("error", str(err) if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}")
        broadcast_from_main(ctx, status)
        if failure is not None:
            raise failure
        return corpus
    state, detail = broadcast_from_main(ctx, None)
    if state == "error":
        raise PipelineError(f"rank 0 could not prepare the corpus: {detail}")
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
    t0 = time.perf_counter()
    dataset = load_documents(data, work)
    timings["load"] = time.perf_counter() - t0
    from datasets import IterableDataset

    build_split = _build_stream if isinstance(dataset, IterableDataset) else _build_dataset
    stats = build_split(data, dataset, fingerprint, build, timings)
    sp = load_tokenizer(build / TOKENIZER_FILE)
    vocab_size = sp.get_piece_size()
    return {
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


def _build_dataset(data: DataConfig, dataset, fingerprint: str, build: Path, timings: dict) -> dict[str, Any]:
    """A map-style dataset: hash split, tokenizer on a sample of train, tokenize with num_proc, write shards."""
    work = build / "work"
    where = _where(data)
    num_proc = min(data.num_proc, len(dataset)) if data.num_proc > 1 else None
    if len(dataset) == 0:
        raise PipelineError(f"the corpus ({where}) is empty: it has no documents")
    t0 = time.perf_counter()
    hashes = dataset.map(
        hash_batch,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        cache_file_name=str(work / "hash.arrow"),
        new_fingerprint=f"{fingerprint[:16]}-hash",
        desc="hashing documents",
    )
    u = np.asarray(hashes["u"], dtype=np.float64)
    n_chars = np.asarray(hashes["n_chars"], dtype=np.int64)
    is_val = split_flags(u, n_chars, data.val_fraction, where)
    timings["split"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sample_chars = None
    if data.tokenizer:
        _copy_given_tokenizer(data.tokenizer, build)
    else:
        # The train documents in the order of their hash (a fixed shuffle), until the sample is full.
        train_ids = np.flatnonzero(~is_val & (n_chars > 0))
        order = train_ids[np.argsort(u[train_ids], kind="stable")]
        taken = int(np.searchsorted(np.cumsum(n_chars[order]), data.tokenizer_sample_chars)) + 1
        chosen = np.sort(order[:taken])
        texts = dataset.select(chosen)["text"]
        sample = _cap_chars(texts, data.tokenizer_sample_chars)
        sample_chars = sum(map(len, sample))
        _train(data, sample, build)
    timings["tokenizer"] = time.perf_counter() - t0

    from datasets import Features, Sequence, Value

    t0 = time.perf_counter()
    tokenized = dataset.map(
        _TokenizeSplitBatch(build / TOKENIZER_FILE, is_val),
        batched=True,
        batch_size=BATCH_DOCS,
        with_indices=True,
        input_columns=["text"],
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        features=Features({"ids": Sequence(Value("int32")), "is_val": Value("bool")}),
        cache_file_name=str(work / "tokens.arrow"),
        new_fingerprint=f"{fingerprint[:16]}-tokens",
        desc="tokenizing",
    )
    writers = _open_writers(build)
    for table in _progress(tokenized.with_format("arrow").iter(batch_size=10 * BATCH_DOCS), len(tokenized)):
        flags = table.column("is_val").to_numpy(zero_copy_only=False)
        for split, writer in writers.items():
            part = table.filter(flags if split == "val" else ~flags)
            if part.num_rows:
                writer.write(*_flatten(part.column("ids")))
    timings["tokenize"] = time.perf_counter() - t0
    _close_writers(writers, build)
    return {**writers, "dropped": int((n_chars == 0).sum()), "sample_chars": sample_chars}


def _build_stream(data: DataConfig, stream, fingerprint: str, build: Path, timings: dict) -> dict[str, Any]:
    """A stream, read once: the first documents up to the sample train the tokenizer, then everything is tokenized."""
    where = _where(data)
    docs = iter(stream)
    buffered: list[tuple[str, bool]] = []
    t0 = time.perf_counter()
    sample_chars = None
    if data.tokenizer:
        _copy_given_tokenizer(data.tokenizer, build)
    else:
        sample_chars = 0
        for doc in docs:
            text = doc["text"] or ""
            is_val = split_hash(text) < data.val_fraction
            buffered.append((text, is_val))
            if not is_val:
                sample_chars += len(text)
                if sample_chars >= data.tokenizer_sample_chars:
                    break
        sample = _cap_chars([t for t, v in buffered if not v and t], data.tokenizer_sample_chars)
        if not sample:
            raise PipelineError(f"the corpus ({where}) is empty: the stream gave no training text")
        sample_chars = sum(map(len, sample))
        _train(data, sample, build)
    timings["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer = DocumentTokenizer(build / TOKENIZER_FILE, num_threads=data.num_proc)
    writers = _open_writers(build)
    dropped = 0

    def rest() -> Iterator[tuple[str, bool]]:
        yield from buffered
        for doc in docs:
            text = doc["text"] or ""
            yield text, split_hash(text) < data.val_fraction

    batch: list[tuple[str, bool]] = []
    bar = _progress(None, data.max_documents, unit="doc")
    for text, is_val in rest():
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
    timings["tokenize"] = time.perf_counter() - t0
    _close_writers(writers, build)
    if writers["train"].documents == 0:
        raise PipelineError(f"the corpus ({where}) is empty: no document with text went to the train split")
    if writers["val"].documents == 0:
        raise PipelineError(
            f"no document of the stream ({where}) fell into the validation split (data.val_fraction="
            f"{data.val_fraction}); raise data.val_fraction or data.max_documents"
        )
    return {**writers, "dropped": dropped, "sample_chars": sample_chars}


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


def _open_writers(build: Path) -> dict[str, ShardWriter]:
    vocab_size = load_tokenizer(build / TOKENIZER_FILE).get_piece_size()
    dtype = token_dtype(vocab_size)
    return {
        "train": ShardWriter(build / "train.bin", dtype, vocab_size),
        "val": ShardWriter(build / "val.bin", dtype, vocab_size, keep_boundaries=True),
    }


def _close_writers(writers: dict[str, ShardWriter], build: Path) -> None:
    for writer in writers.values():
        writer.close()
    writers["val"].save_boundaries(build / "val_docs.npy")


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
    if data.source == "stdlib":
        return "data=stdlib"
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
    disk = sum(p.stat().st_size for p in corpus.directory.iterdir() if p.is_file())
    _say(
        f"prepared {meta['source']}: {_docs_total(meta):,} documents ({train['documents']:,} train / "
        f"{val['documents']:,} val), {tokens / 1e6:.2f}M tokens ({train['tokens'] / 1e6:.2f}M / "
        f"{val['tokens'] / 1e6:.2f}M), vocab {meta['vocab_size']} ({meta['dtype']}), {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9) / 1e3:,.0f}k tokens/s), {disk / 1e6:.1f} MB on disk -> {corpus.directory}"
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
