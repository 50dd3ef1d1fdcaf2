"""The prepare stage: corpus -> sentencepiece tokenizer -> a folder of token shards, cached by a fingerprint of inputs.

A prepared corpus is a directory ``<data.cache_dir>/<source>-<fingerprint[:16]>/`` holding

    manifest.json          every shard (path, tokens, documents, SHA-256), split totals, dtype, vocabulary, the
                           tokenizer's SHA-256, the format version (``pretrain.data.manifest``); written last
    spm.model, spm.vocab   the tokenizer (trained on a sample of the train split, or a copy of data.tokenizer)
    train/NNNNN.bin        token shards, one per work unit (``pretrain.data.units``): every document followed by
    val/NNNNN.bin          one EOS, each with NNNNN.docs.npy (its documents' offsets) beside it
    sources/<label>/...    data=mix: train/ and val/ of each source
    inputs.json            everything the fingerprint was computed from (file sizes and mtimes, settings)

The build happens in ``.build-<name>/`` beside it, which survives a kill: run again, the same command keeps the
tokenizer and every unit already done and builds the rest, then renames the folder into place; the result is
byte-identical to an uninterrupted build, whatever the number of workers. One prepare of a corpus at a time holds
``.<name>.lock``; another waits for it and then reuses its result. A complete corpus is verified against its
manifest's SHA-256s before it is reused (``manifest.verify``; files already verified cost a ``stat``).

In a multi-rank run rank 0 prepares while the other ranks wait on a file, not on a collective, so a prepare of
any length never meets the process group's timeout (``parallel.distributed.run_on_main``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config import Config, DataConfig
from pretrain.data.corpus import describe_inputs, split_flags, split_hash
from pretrain.data.documents import open_documents
from pretrain.data.executors import DATATROVE_DIR, run_units
from pretrain.data.manifest import (
    FORMAT_VERSION,
    check_vocabulary,
    listed_files,
    read_manifest,
    record_verified,
    split_digest,
    verify,
    write_manifest,
)
from pretrain.data.shards import ShardSet, token_dtype
from pretrain.data.slurm import SlurmSubmitted, stop_if_running, submit_units
from pretrain.data.tokenizer import TRAINER_OPTIONS, load_tokenizer, special_ids, train_tokenizer
from pretrain.data.units import (
    UNITS_DIR,
    Unit,
    UnitJob,
    plan_row_units,
    plan_stream_units,
    remove_leftovers,
)
from pretrain.errors import PipelineError
from pretrain.parallel.distributed import run_on_main
from pretrain.run_files import RunFiles, file_sha256, write_atomic

TOKENIZER_FILE = "spm.model"
# data=mix: each source's shards in sources/<label>/.
SOURCES_DIR = "sources"
WORK_DIR = "work"
TOKENIZER_DONE = "tokenizer.done"
# What rank 0 hands the other ranks when the units were submitted to Slurm instead of built.
SLURM_STOP = "slurm-stop:"


@dataclass(frozen=True)
class SourceShards:
    """One source of a prepared mixture (``data=mix``): its label, weight and splits."""

    label: str
    kind: str
    weight: float
    train: ShardSet
    val: ShardSet
    identity: str  # the train split's digest over its shards' SHA-256s


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared-corpus directory; ``manifest`` is its ``manifest.json``.

    A mixture (``data=mix``) has ``sources``, each with its own splits, and no train split of its own (``train`` is
    None); its ``val`` holds every source's validation shards, source after source."""

    directory: Path
    tokenizer_path: Path
    train: ShardSet | None
    val: ShardSet
    dtype: str
    vocab_size: int
    manifest: dict[str, Any] = field(repr=False)
    sources: tuple[SourceShards, ...] = ()

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest

    def tokens(self, split: str) -> ShardSet:
        """The split as one stream of tokens (``len``, slices); ``split`` is ``train`` or ``val``."""
        if split == "train" and self.train is None:
            raise PipelineError(f"the mixture {self.directory} has a train split per source (corpus.sources)")
        return self.train if split == "train" else self.val

    def val_documents(self) -> Iterator[np.ndarray]:
        """The validation documents in order, each ``[n_tokens]`` ending in EOS."""
        return self.val.documents()

    def split_digest(self, split: str) -> str:
        """The identity of a split (over its shards' SHA-256s): what a resume compares."""
        if split == "train" and self.sources:
            digest = hashlib.sha256()
            for source in self.manifest["sources"]:
                digest.update(f"{source['label']}:{split_digest(source['splits']['train'])};".encode())
            return digest.hexdigest()
        return split_digest(self.manifest["splits"][split])

    @classmethod
    def open(cls, directory: Path) -> PreparedCorpus | None:
        """The corpus in ``directory`` if its manifest is there (complete), else None. Nothing is verified here."""
        manifest = read_manifest(directory)
        if manifest is None:
            return None
        dtype = manifest["dtype"]

        def shards(entry: dict | None, random_access: bool = False) -> ShardSet | None:
            if entry is None:
                return None
            listed = [(directory / shard["path"], shard["tokens"]) for shard in entry["shards"]]
            return ShardSet(listed, dtype, random_access=random_access)

        sources = tuple(
            SourceShards(
                label=source["label"],
                kind=source["kind"],
                weight=source["weight"],
                train=shards(source["splits"]["train"], random_access=True),
                val=shards(source["splits"]["val"]),
                identity=split_digest(source["splits"]["train"]),
            )
            for source in manifest.get("sources", ())
        )
        return cls(
            directory=directory,
            tokenizer_path=directory / manifest["tokenizer"]["file"],
            train=shards(manifest["splits"].get("train"), random_access=True),
            val=shards(manifest["splits"]["val"]),
            dtype=dtype,
            vocab_size=manifest["vocab_size"],
            manifest=manifest,
            sources=sources,
        )


# ---------------------------------------------------------------- fingerprint and location


def fingerprint_inputs(data: DataConfig) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the description it hashes): the inputs, the split and the tokenizer settings.

    How the work is cut and run (``data.unit_bytes``, ``data.workers``, ``data.executor``) is not part of it: the
    tokens are the same, and a corpus prepared one way is reused by the other."""
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

    Every rank returns the same PreparedCorpus. A failure on rank 0 is raised on every rank. The other ranks wait on
    a status file in ``data.cache_dir`` (which every node must share), not on a collective with a time limit.
    """
    prepared: list[PreparedCorpus] = []  # rank 0's, kept rather than read back

    def prepare() -> str:
        try:
            corpus = prepare_corpus(cfg.data)
        except SlurmSubmitted as stop:  # not a failure: every rank stops the same way
            return SLURM_STOP + json.dumps({"message": str(stop), "job_ids": stop.job_ids})
        if install:
            install_tokenizer(corpus, cfg.run_dir)
        prepared.append(corpus)
        return str(corpus.directory)

    cache = Path(cfg.data.cache_dir).expanduser().resolve()
    detail = run_on_main(ctx, prepare, "prepare the corpus", wait_dir=cache, waiting="the corpus to be prepared")
    if detail.startswith(SLURM_STOP):
        stop = json.loads(detail.removeprefix(SLURM_STOP))
        raise SlurmSubmitted(stop["message"], stop["job_ids"])
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
    """Reuse the prepared corpus for these inputs (verified against its manifest), or build it (resuming a build a
    killed prepare left)."""
    fingerprint, description = fingerprint_inputs(data)
    final = corpus_dir(data, fingerprint)
    corpus = _reuse(final, verbose)
    if corpus is not None:
        return corpus
    final.parent.mkdir(parents=True, exist_ok=True)
    with _corpus_lock(final):
        corpus = _reuse(final, verbose)  # another prepare may have finished it while this one waited
        if corpus is not None:
            return corpus
        if final.exists():
            aside = final.with_name(f"{final.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(final, aside)
            _say(f"{final} has no manifest (not a complete prepared corpus); moved it aside to {aside}")
        _note_old_format(final.parent)
        build = final.parent / f".build-{final.name}"
        build.mkdir(exist_ok=True)
        if data.executor == "slurm":  # its job's tasks may be writing in the build folder: touch nothing while they run
            stop_if_running(build, _say)
        removed = remove_leftovers(build)
        if removed:
            _say(f"removed {removed} temporary files a stopped prepare left in {build}")
        started = time.perf_counter()
        try:
            manifest = _build(data, fingerprint, description, build)
        except SlurmSubmitted:
            raise
        except BaseException:
            if not _holds_finished_work(build):
                shutil.rmtree(build, ignore_errors=True)  # nothing worth resuming (bad input found early)
            else:
                _say(f"the work done so far is kept in {build}: the same command continues from it")
            raise
        manifest["seconds"]["total"] = round(time.perf_counter() - started, 3)
        (build / "inputs.json").write_text(json.dumps(description, indent=1, sort_keys=True, default=str))
        _remove_unlisted_shards(build, manifest)
        for scratch in (WORK_DIR, DATATROVE_DIR, UNITS_DIR, TOKENIZER_DONE):
            _remove(build / scratch)
        for source in manifest.get("sources", ()):
            _remove(build / SOURCES_DIR / source["label"] / UNITS_DIR)
        # The manifest last: a folder without it is never taken for a complete corpus.
        write_manifest(build, manifest)
        record_verified(build, manifest)  # hashed as they were written: a reuse need not read them again
        os.rename(build, final)
    corpus = PreparedCorpus.open(final)
    assert corpus is not None, f"{final} is incomplete right after it was built"
    if verbose:
        _say_summary(corpus)
    return corpus


def _holds_finished_work(build: Path) -> bool:
    """Whether a stopped build has work worth keeping: a trained tokenizer or a finished unit."""
    return (build / TOKENIZER_DONE).is_file() or any(build.rglob(f"{UNITS_DIR}/*.json"))


def _reuse(final: Path, verbose: bool) -> PreparedCorpus | None:
    corpus = PreparedCorpus.open(final)
    if corpus is None:
        return None
    verify(final, corpus.manifest, say=_say if verbose else None)
    check_vocabulary(final, corpus.manifest, load_tokenizer(corpus.tokenizer_path).get_piece_size())
    if verbose:
        manifest = corpus.manifest
        _say(
            f"reusing the prepared corpus at {final} (inputs unchanged; {_docs_total(manifest):,} documents, "
            f"{_tokens_total(manifest) / 1e6:.2f}M tokens)"
        )
    return corpus


class _corpus_lock:
    """An exclusive lock on one corpus's build, held for the whole build; a second prepare waits, saying so."""

    def __init__(self, final: Path) -> None:
        self.path = final.parent / f".{final.name}.lock"

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another prepare of this corpus is running (lock {self.path}); waiting for it to finish")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# ---------------------------------------------------------------- building


@dataclass
class _Source:
    """One source being built: its job (what its units need) and its units."""

    label: str
    kind: str
    weight: float
    job: UnitJob
    units: list[Unit]
    part: Any  # _RowsPart | _StreamPart: the split pass and the tokenizer sample


def _build(data: DataConfig, fingerprint: str, description: dict, build: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    work = build / WORK_DIR
    work.mkdir(exist_ok=True)
    if data.source == "mix":
        total_weight = sum(source.weight for source in data.sources)
        specs = [
            (
                source.label,
                source.kind,
                source.weight,
                source.as_data(data),
                int(data.tokenizer_sample_chars * source.weight / total_weight),
            )
            for source in data.sources
        ]
    else:
        specs = [("", data.source, 1.0, data, data.tokenizer_sample_chars)]
    parts = []
    for label, kind, weight, sdata, share in specs:
        where = f"source {label!r} ({_where(sdata)})" if label else _where(sdata)
        t0 = time.perf_counter()
        documents = open_documents(sdata, where)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        part = _part(sdata, documents, work / (label or "corpus"), where)
        timings["split"] = timings.get("split", 0.0) + time.perf_counter() - t0
        parts.append((label, kind, weight, sdata, share, part))
    sample_chars = _make_tokenizer(data, build, [(part, share) for *_, share, part in parts], timings)
    tokenizer_path = build / TOKENIZER_FILE
    vocab_size = load_tokenizer(tokenizer_path).get_piece_size()
    sources = []
    for label, kind, weight, _, _, part in parts:
        out = build / SOURCES_DIR / label if label else build
        job = UnitJob(
            label=label,
            build=build,
            documents=part.documents,
            is_val_path=part.is_val_path,
            out=out,
            tokenizer_path=tokenizer_path,
            vocab_size=vocab_size,
            val_fraction=data.val_fraction,
            streaming=part.streaming,
            n_stream_shards=part.n_stream_shards,
            where=part.where,
        )
        sources.append(_Source(label, kind, weight, job, part.units(data.unit_bytes), part))
    t0 = time.perf_counter()
    run_units([s.job for s in sources], [s.units for s in sources], build, data, _say, submit=submit_units)
    timings["tokenize"] = time.perf_counter() - t0
    splits_of = [_collect(source) for source in sources]
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": data.source,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size),
        "special_ids": special_ids(load_tokenizer(tokenizer_path)),
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": file_sha256(tokenizer_path),
            "trained": data.tokenizer is None,
            "type": data.tokenizer_type if data.tokenizer is None else sp_model_type(load_tokenizer(tokenizer_path)),
            "sample_chars": sample_chars,
            "given": data.tokenizer,
        },
        "units": sum(len(s.units) for s in sources),
        "unit_bytes": data.unit_bytes,
        "documents_dropped_empty": sum(dropped for _, dropped in splits_of),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    if data.source == "mix":
        total_weight = sum(s.weight for s in sources)
        manifest["sources"] = [
            {
                "label": source.label,
                "kind": source.kind,
                "weight": source.weight,
                "share": source.weight / total_weight,
                "splits": splits,
                "documents_dropped_empty": dropped,
                "tokenizer_sample_chars": share if data.tokenizer is None else None,
            }
            for source, (splits, dropped), (*_, share, _) in zip(sources, splits_of, parts, strict=True)
        ]
        # No train split of its own (the loader draws from each source's); the validation split is every source's.
        manifest["splits"] = {"train": None, "val": _join([splits["val"] for splits, _ in splits_of])}
        manifest["inputs"] = {
            "sources": [
                {"label": part["label"], "weight": part["weight"], **_summarize_inputs(part["inputs"])}
                for part in description["mixture"]
            ]
        }
    else:
        manifest["splits"] = splits_of[0][0]
        manifest["inputs"] = _summarize_inputs(description["inputs"])
    return manifest


def _collect(source: _Source) -> tuple[dict[str, Any], int]:
    """The source's splits for the manifest, from its units' markers in unit order; and its dropped documents."""
    records = [source.job.done(unit) for unit in source.units]
    assert all(records), f"a unit of {source.job.where} has no marker after it was built"
    splits = {}
    for split in ("train", "val"):
        shards = [
            {
                key: record[split][key]
                for key in ("path", "docs", "tokens", "documents", "sha256", "docs_sha256", "max_id")
            }
            for record in records
            if record[split]["documents"] > 0
        ]
        splits[split] = _join([{"shards": shards}])
    dropped = sum(record["dropped_empty"] for record in records)
    source.part.check_written(splits)
    return splits, dropped


def _join(entries: list[dict[str, Any]]) -> dict[str, Any]:
    shards = [shard for entry in entries for shard in entry["shards"]]
    return {
        "shards": shards,
        "documents": sum(shard["documents"] for shard in shards),
        "tokens": sum(shard["tokens"] for shard in shards),
    }


def _make_tokenizer(data: DataConfig, build: Path, shares: list, timings: dict) -> int | None:
    """Copy the given ``data.tokenizer``, or train one on each part's sample of at most its share of characters;
    return the sample's size (None for a given tokenizer). A tokenizer an earlier, stopped build finished is kept."""
    done = build / TOKENIZER_DONE
    if done.is_file() and (build / TOKENIZER_FILE).is_file():
        record = json.loads(done.read_text())
        if record.get("sha256") == file_sha256(build / TOKENIZER_FILE):
            _say("keeping the tokenizer a stopped prepare of this corpus trained")
            return record.get("sample_chars")
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
    record = {"sha256": file_sha256(build / TOKENIZER_FILE), "sample_chars": sample_chars}
    write_atomic(done, json.dumps(record).encode())
    return sample_chars


def _part(data: DataConfig, documents, work: Path, where: str):
    from pretrain.data.documents import ArrowDocuments, FileDocuments

    if isinstance(documents, (ArrowDocuments, FileDocuments)):
        return _RowsPart(data, documents, work, where)
    return _StreamPart(data, documents, where)


class _RowsPart:
    """Documents read by row (files, or a map-style dataset): the split pass (hash and length of every row), a sample
    of train in hash order, units of rows. The split pass is saved for the units (and kept for a resumed build)."""

    streaming = False
    n_stream_shards = 1

    def __init__(self, data: DataConfig, documents, work: Path, where: str) -> None:
        self.data, self.where = data, where
        work.mkdir(parents=True, exist_ok=True)
        self.documents = documents
        self.is_val_path = work / "is_val.npy"
        split_file = work / "split.npz"
        if split_file.is_file():
            saved_split = dict(np.load(split_file))
            self.u, self.n_chars = saved_split.pop("u"), saved_split.pop("n_chars")
            documents.restore(work, saved_split)
        else:
            self.u, self.n_chars = documents.scan(work, data.num_proc, data.max_documents, _say)
            tmp = work / ".split.tmp.npz"
            np.savez(tmp, u=self.u, n_chars=self.n_chars, **documents.split_state())
            os.replace(tmp, split_file)
        self.is_val = split_flags(self.u, self.n_chars, data.val_fraction, where)
        tmp = work / ".is_val.tmp.npy"
        np.save(tmp, self.is_val)
        os.replace(tmp, self.is_val_path)

    def units(self, unit_bytes: int) -> list[Unit]:
        return plan_row_units(self.n_chars, unit_bytes)

    def sample(self, max_chars: int) -> list[str]:
        """The train documents in the order of their hash (a fixed shuffle), until ``max_chars`` are taken."""
        if max_chars <= 0:
            return []
        u, n_chars = self.u, self.n_chars
        train_ids = np.flatnonzero(~self.is_val & (n_chars > 0))
        order = train_ids[np.argsort(u[train_ids], kind="stable")]
        taken = int(np.searchsorted(np.cumsum(n_chars[order]), max_chars)) + 1
        chosen = np.sort(order[:taken])
        return _cap_chars(self.documents.texts_at(chosen), max_chars)

    def check_written(self, splits: dict) -> None:
        """Nothing to check: ``split_flags`` guarantees a document on each side."""


class _StreamPart:
    """A stream: units are its shards; the tokenizer's sample is the first documents of (up to 64 of) its shards."""

    streaming = True
    is_val_path = None
    SAMPLED_SHARDS = 64

    def __init__(self, data: DataConfig, stream, where: str) -> None:
        self.data, self.documents, self.where = data, stream, where
        self.capped = data.max_documents is not None
        self.n_stream_shards = 1 if self.capped else max(1, int(getattr(stream, "n_shards", 1) or 1))

    def units(self, unit_bytes: int) -> list[Unit]:
        return plan_stream_units(self.n_stream_shards, self.capped)

    def sample(self, max_chars: int) -> list[str]:
        if max_chars <= 0:
            return []
        n = self.n_stream_shards
        picked = sorted(
            {round(i * (n - 1) / max(self.SAMPLED_SHARDS - 1, 1)) for i in range(min(n, self.SAMPLED_SHARDS))}
        )
        share = max_chars // len(picked)
        sample: list[str] = []
        for index in picked:
            stream = self.documents.shard(num_shards=n, index=index) if n > 1 else self.documents
            taken = 0
            try:
                for doc in stream:
                    text = doc["text"] or ""
                    if text and split_hash(text) >= self.data.val_fraction:
                        sample.append(text)
                        taken += len(text)
                        if taken >= share:
                            break
            except Exception as err:
                raise PipelineError(f"could not read shard {index} of the stream {self.where}: {err}") from err
        sample = _cap_chars(sample, max_chars)
        if not sample:
            raise PipelineError(f"the corpus ({self.where}) is empty: the stream gave no training text")
        return sample

    def check_written(self, splits: dict) -> None:
        if splits["train"]["documents"] == 0:
            raise PipelineError(f"the corpus ({self.where}) is empty: no document with text went to the train split")
        if splits["val"]["documents"] == 0:
            raise PipelineError(
                f"no document of the stream ({self.where}) fell into the validation split (data.val_fraction="
                f"{self.data.val_fraction}); raise data.val_fraction or data.max_documents"
            )


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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_unlisted_shards(build: Path, manifest: dict) -> None:
    """Shards of an earlier cut of a stopped build (another ``data.unit_bytes``) that the manifest does not list."""
    listed = {build / name for name in listed_files(manifest)}
    folders = [build / "train", build / "val"]
    folders += [
        build / SOURCES_DIR / source["label"] / split
        for source in manifest.get("sources", ())
        for split in ("train", "val")
    ]
    for folder in folders:
        for path in folder.glob("*") if folder.is_dir() else ():
            if path.is_file() and path not in listed:
                path.unlink()


def _note_old_format(cache_root: Path) -> None:
    """Corpora of the one-file format (format 1: train.bin, meta.json) are not read; say so once per prepare."""
    old = sorted(p.parent.name for p in cache_root.glob("*/meta.json"))
    if old:
        _say(
            f"{len(old)} corpora in {cache_root} are in the one-file format of earlier versions ({', '.join(old[:3])}"
            f"{' ...' if len(old) > 3 else ''}); they are not read: this corpus is prepared in the sharded format. "
            "Delete them once no run needs them"
        )


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
    # From the installed metadata: importing datasets for its version alone costs half a CPU-second.
    from importlib.metadata import version

    return {"sentencepiece": version("sentencepiece"), "datasets": version("datasets")}


def _train_totals(manifest: dict) -> dict:
    """The train split's totals; a mixture's are its sources' together."""
    if manifest["splits"]["train"]:
        return manifest["splits"]["train"]
    sources = [source["splits"]["train"] for source in manifest["sources"]]
    return {key: sum(split[key] for split in sources) for key in ("documents", "tokens")}


def _docs_total(manifest: dict) -> int:
    return _train_totals(manifest)["documents"] + manifest["splits"]["val"]["documents"]


def _tokens_total(manifest: dict) -> int:
    return _train_totals(manifest)["tokens"] + manifest["splits"]["val"]["tokens"]


def _say_summary(corpus: PreparedCorpus) -> None:
    manifest = corpus.manifest
    train = _train_totals(manifest)
    val = manifest["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    seconds = manifest["seconds"]["total"]
    disk = sum(p.stat().st_size for p in corpus.directory.rglob("*") if p.is_file())
    shards = sum(len(entry["shards"]) for entry in (manifest["splits"]["train"], val) if entry)
    _say(
        f"prepared {manifest['source']}: {train['documents'] + val['documents']:,} documents ({train['documents']:,} "
        f"train / {val['documents']:,} val), {tokens / 1e6:.2f}M tokens ({train['tokens'] / 1e6:.2f}M / "
        f"{val['tokens'] / 1e6:.2f}M), vocab {manifest['vocab_size']} ({manifest['dtype']}), "
        f"{manifest['units']} unit(s), {seconds:.1f} s ({tokens / max(seconds, 1e-9) / 1e3:,.0f}k tokens/s), "
        f"{disk / 1e6:.1f} MB on disk -> {corpus.directory}" + (f" ({shards} shards)" if shards > 2 else "")
    )
    for source in manifest.get("sources", ()):
        train, val = source["splits"]["train"], source["splits"]["val"]
        _say(
            f"  source {source['label']!r} ({source['kind']}, weight {source['weight']:g} = "
            f"{source['share']:.1%} of training windows): {train['documents']:,} train / {val['documents']:,} val "
            f"documents, {train['tokens'] / 1e6:.2f}M / {val['tokens'] / 1e6:.2f}M tokens"
        )
    dropped = manifest.get("documents_dropped_empty", 0)
    if dropped:
        _say(
            f"skipped {dropped:,} documents without text (an empty text, or a row whose data.text_field is missing "
            "or null); the manifest counts them as documents_dropped_empty"
        )


def _say(message: str) -> None:
    print(f"[prepare] {message}", flush=True)
