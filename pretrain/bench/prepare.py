"""Benchmark of the prepare stage: tokens/s of tokenizer training, tokenizing and shard writing on the stdlib corpus.

    python -m pretrain.bench prepare [--vocab-size 8192] [--max-files N] [--num-proc 2] [--repeats 1] [--out PATH.json]
        [--sections stdlib scale encode workers | all] [--sizes-mb 20 100] [--unit-mb 1] [--workers 2] [--work-dir DIR]

Each repeat runs ``pretrain.prepare.prepare_corpus`` on ``data=stdlib`` (the ``.py`` files of the running
Python's standard library) into a fresh temporary ``cache_dir``, so nothing is reused, then once more on the
same directory to time a cache hit. A row gives the corpus (files, bytes, documents and tokens per split),
the wall time of the whole stage, the seconds of each phase as the stage records them in ``meta.json``
(``load``: reading files, ``split``: hashing documents into train/validation, ``tokenizer``: training the
sentencepiece model, ``tokenize``: tokenizing and writing the shards), and two rates: all tokens over the
whole stage's wall time, and all tokens over the ``tokenize`` phase.

``--sections`` adds what the stage's scaling targets ask (default: ``stdlib`` alone, the rows above), each on a
synthetic ``data=files`` corpus: the ``.py`` files of the standard library, each copy of a file with two of its
identifiers renamed and a line naming the copy (so no two documents are equal), written as ``{"text": ...}``
lines into ``.jsonl`` files under a temporary directory, once, for the largest of ``--sizes-mb`` (a smaller size
is a prefix of those files). Every measured prepare runs in its own Python process (``prepare_corpus`` on a fresh
``data.cache_dir``), so that its memory is its own; this process polls it with psutil every 0.1 s.

- ``scale``: a cold prepare (tokenizer training included; ``data.workers`` and ``data.unit_bytes`` at their
  defaults, ``data.num_proc`` = ``--num-proc``) at each of ``--sizes-mb``: wall time, CPU seconds of the process
  and its descendants (``getrusage`` and the polls: see ``run_child``), peak RSS (the prepare's own ``VmHWM``,
  and the most its process tree held at once by the polls, datatrove's workers included: a sum of RSS, which
  counts a page shared by two processes twice) and temporary disk: the peak size on disk of the ``.build-*``
  folder (where the corpus is built, shards included, before it is renamed into place; the ``datasets``
  conversion of the input lives there too) by the polls (so up to one poll's growth below the true peak), over the
  size of the finished corpus (target <= 1.2x); ``peak_work_bytes`` is the part of it in the build's ``work/``
  scratch folder at that poll.
- ``encode``: tokens per CPU-second of the whole stage against raw sentencepiece encoding of the same text, one
  process each, at the smallest size (target >= 0.9x). The stage runs with ``data.workers=1 data.num_proc=1`` and
  ``data.tokenizer`` set to the tokenizer of a first prepare of that input, so that it tokenizes and does not
  train; its CPU seconds (``getrusage`` of the process and its children, from the call of ``prepare_corpus`` to
  its return: the interpreter's start-up and imports are outside) cover reading and converting the ``.jsonl``
  files, the split pass, tokenizing, writing and hashing the shards and the manifest. The raw baseline reads the
  same ``.jsonl`` files, then times only ``SentencePieceProcessor.encode`` of every text, in batches of 1,000 with
  one thread (the stage's own call), counting one EOS per document as the shards do.
- ``workers``: wall time of the whole stage with ``data.workers=--workers`` against ``data.workers=1`` on the
  smallest size, with ``data.unit_bytes=--unit-mb`` MB so that there are many units, the same given tokenizer and
  ``data.num_proc=1`` in both (target <= 0.6x); both must write the same shards (their SHA-256s are compared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.bench.options import positive_float, positive_int

PHASES = ("load", "split", "tokenizer", "tokenize")
SECTIONS = ("stdlib", "scale", "encode", "workers")
MB = 10**6
POLL_S = 0.1
# The targets of the issue.
TARGET_ENCODE = 0.9  # the stage's tokens per CPU-second / raw sentencepiece's, at least
TARGET_WORKERS = 0.6  # wall time with --workers / with 1, at most
TARGET_TEMP_DISK = 1.2  # peak size of .build-* / final corpus, at most


@dataclass(frozen=True)
class PrepareBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    vocab_size: int
    max_files: int | None
    num_proc: int
    repeats: int
    sections: tuple[str, ...] = ("stdlib",)
    sizes_mb: tuple[float, ...] = (20.0, 100.0)
    unit_mb: float = 1.0
    workers: int = 2


def data_config(params: PrepareBenchParams, cache_dir: str):
    """The ``DataConfig`` of one run (``data=stdlib`` with the benchmark's settings); a ConfigError if they are bad."""
    from pretrain.config import DataConfig

    return DataConfig(
        source="stdlib",
        vocab_size=params.vocab_size,
        max_files=params.max_files,
        num_proc=params.num_proc,
        cache_dir=cache_dir,
    )


def measure(params: PrepareBenchParams) -> dict:
    """One cold prepare into a fresh cache directory, then a cache hit on it."""
    from pretrain.data.prepare import prepare_corpus

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as cache_dir:
        data = data_config(params, cache_dir)
        started = time.perf_counter()
        corpus = prepare_corpus(data, verbose=False)
        wall_s = time.perf_counter() - started
        started = time.perf_counter()
        again = prepare_corpus(data, verbose=False)
        cache_hit_s = time.perf_counter() - started
        assert again.directory == corpus.directory, "the second prepare did not reuse the first"
    meta = corpus.metadata
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    seconds = {phase: meta["seconds"].get(phase) for phase in PHASES}
    return {
        "files": meta["inputs"].get("files"),
        "bytes": meta["inputs"].get("bytes"),
        "documents": {"train": train["documents"], "val": val["documents"]},
        "tokens": {"train": train["tokens"], "val": val["tokens"]},
        "vocab_size": corpus.vocab_size,
        "wall_s": wall_s,
        "seconds": seconds,
        "cache_hit_s": cache_hit_s,
        "tokens_per_s": tokens / wall_s,
        "tokenize_tokens_per_s": tokens / seconds["tokenize"] if seconds["tokenize"] else None,
        "versions": meta.get("versions", {}),
    }


def summarize(rows: list[dict]) -> dict:
    """Medians over the repeats of the wall time, each phase, the cache hit and both rates."""

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    return {
        "wall_s": median(r["wall_s"] for r in rows),
        "seconds": {phase: median(r["seconds"][phase] for r in rows) for phase in PHASES},
        "cache_hit_s": median(r["cache_hit_s"] for r in rows),
        "tokens_per_s": median(r["tokens_per_s"] for r in rows),
        "tokenize_tokens_per_s": median(r["tokenize_tokens_per_s"] for r in rows),
    }


def format_table(rows: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:,.{digits}f}"

    phases = "".join(f"{phase + ' s':>12}" for phase in PHASES)
    lines = [
        f"{'run':>4}{'files':>7}{'documents tr/val':>18}{'tokens tr/val':>22}{'wall s':>8}{phases}{'hit s':>7}"
        f"{'tokens/s':>11}{'tokenize tok/s':>16}"
    ]
    for i, r in enumerate(rows, 1):
        docs = f"{r['documents']['train']:,}/{r['documents']['val']:,}"
        tokens = f"{r['tokens']['train']:,}/{r['tokens']['val']:,}"
        phase_cells = "".join(f"{num(r['seconds'][phase], 2):>12}" for phase in PHASES)
        lines.append(
            f"{i:>4}{num(r['files'], 0):>7}{docs:>18}{tokens:>22}{num(r['wall_s'], 2):>8}{phase_cells}"
            f"{num(r['cache_hit_s'], 2):>7}{num(r['tokens_per_s'], 0):>11}{num(r['tokenize_tokens_per_s'], 0):>16}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the synthetic data=files corpus


def write_synthetic_inputs(directory: Path, total_bytes: int, file_bytes: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``.jsonl`` files of ``{"text": ...}`` lines, about ``file_bytes`` each, ``total_bytes`` in all, from the
    standard library's ``.py`` files: copy c of a file has a first line naming the copy and two of its identifiers
    renamed (so no two documents are equal). Returns ``(path, bytes)`` of each file in order."""
    from pretrain.data.corpus import stdlib_files, stdlib_root

    root = stdlib_root()
    texts = []
    for rel in stdlib_files():
        try:
            texts.append((rel, (root / rel).read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    rng = random.Random(seed)
    identifier = re.compile(r"\b[a-z_][a-z0-9_]{3,}\b")
    directory.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, int]] = []
    written, copy = 0, 0
    out, out_bytes = None, 0
    try:
        while written < total_bytes:
            for rel, text in texts:
                words = sorted(set(identifier.findall(text, 0, 4000)))
                for word in rng.sample(words, min(2, len(words))):
                    text = text.replace(word, f"{word}_{copy}")
                line = (json.dumps({"text": f"# copy {copy} of {rel}\n{text}"}) + "\n").encode()
                if out is None:
                    path = directory / f"{len(files):05d}.jsonl"
                    out, out_bytes = open(path, "wb"), 0
                    files.append((path, 0))
                out.write(line)
                out_bytes += len(line)
                written += len(line)
                if out_bytes >= file_bytes or written >= total_bytes:
                    out.close()
                    files[-1] = (files[-1][0], out_bytes)
                    out = None
                if written >= total_bytes:
                    break
            copy += 1
    finally:
        if out is not None:
            out.close()
            files[-1] = (files[-1][0], out_bytes)
    return files


def prefix_of(files: list[tuple[Path, int]], size_bytes: int) -> list[Path]:
    """The first files whose sizes add up to at least ``size_bytes`` (all of them if they do not)."""
    chosen, total = [], 0
    for path, size in files:
        if total >= size_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (a file or a folder; what ``du`` counts), 0 if it is gone."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass  # removed while walking
    return total


# ---------------------------------------------------------------- one measured run, in its own process


def _peak_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its children it has waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def child_main(spec_json: str) -> int:
    """The child: ``{"kind": "prepare", "data": {DataConfig keys}}`` runs the stage, ``{"kind": "encode", "files":
    [...], "tokenizer": PATH}`` raw sentencepiece encoding; prints its measurements as one JSON line."""
    import resource

    spec = json.loads(spec_json)
    if spec["kind"] == "encode":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=spec["tokenizer"])
        texts = []
        for path in spec["files"]:
            with open(path, encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for line in f]
        texts = [text for text in texts if text]
        tokens = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for first in range(0, len(texts), 1000):
            ids = sp.encode(texts[first : first + 1000], num_threads=1)
            tokens += sum(map(len, ids)) + len(ids)  # and one EOS per document, as in the shards
        result = {
            "cpu_s": time.process_time() - cpu0,
            "wall_s": time.perf_counter() - wall0,
            "tokens": tokens,
            "documents": len(texts),
            "bytes": sum(len(text.encode()) for text in texts),
        }
    else:
        from pretrain.config import DataConfig
        from pretrain.data.prepare import prepare_corpus

        data = DataConfig(**spec["data"])
        (own0, waited0), wall0 = _cpu_seconds(), time.perf_counter()
        corpus = prepare_corpus(data, verbose=False)
        wall_s, (own1, waited1) = time.perf_counter() - wall0, _cpu_seconds()
        meta = corpus.manifest
        splits = meta["splits"]
        result = {
            "wall_s": wall_s,
            "own_cpu_s": own1 - own0,
            "waited_children_cpu_s": waited1 - waited0,
            "seconds": {phase: meta["seconds"].get(phase) for phase in PHASES},
            "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
            "documents": splits["train"]["documents"] + splits["val"]["documents"],
            "units": meta["units"],
            "directory": str(corpus.directory),
            "tokenizer": str(corpus.tokenizer_path),
            "shard_sha256": [s["sha256"] for split in ("train", "val") for s in splits[split]["shards"]],
            "own_peak_rss_mib": (_peak_kib() or 0) / 1024,
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
    print(json.dumps(result), flush=True)
    return 0


def run_child(spec: dict, cache_dir: Path | None = None) -> dict:
    """Run ``child_main(spec)`` in a new Python process, polling its process tree's RSS and CPU time and, with
    ``cache_dir``, the size of the ``.build-*`` folders in it. Returns its JSON line plus ``tree_peak_rss_mib`` (the
    largest sum of RSS over the tree at one poll), ``max_process_rss_mib``, ``max_descendant_rss_mib``,
    ``descendants_cpu_s`` (each descendant's CPU seconds at its last poll, summed), ``peak_build_bytes`` and
    ``peak_work_bytes`` (the build's ``work/`` scratch folder at that poll); for a prepare, ``cpu_s``: the process's
    own CPU seconds in the stage plus the larger of ``descendants_cpu_s`` and its waited children's (``getrusage``),
    both lower bounds: datatrove's workers are children of a forkserver that ``getrusage`` does not reach, and a
    poll misses up to ``POLL_S`` of a process's end."""
    import psutil

    code = "import sys; from pretrain.bench.prepare import child_main; sys.exit(child_main(sys.argv[1]))"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=out, stderr=err, text=True)
        root = psutil.Process(proc.pid)
        tree_peak = process_peak = descendant_peak = build_peak = work_peak = 0
        descendant_cpu: dict[tuple[int, float], float] = {}
        while proc.poll() is None:
            try:
                descendants = root.children(recursive=True)
                rss = [root.memory_info().rss]
            except psutil.Error:
                break
            for process in descendants:
                try:
                    with process.oneshot():
                        rss.append(process.memory_info().rss)
                        times = process.cpu_times()
                        descendant_cpu[(process.pid, process.create_time())] = times.user + times.system
                    descendant_peak = max(descendant_peak, rss[-1])
                except psutil.Error:
                    pass
            tree_peak = max(tree_peak, sum(rss))
            process_peak = max([process_peak, *rss])
            if cache_dir is not None and cache_dir.is_dir():
                builds = list(cache_dir.glob(".build-*"))
                build = sum(disk_bytes(path) for path in builds)
                if build > build_peak:
                    build_peak, work_peak = build, sum(disk_bytes(path / "work") for path in builds)
            time.sleep(POLL_S)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"a measured {spec['kind']} run failed ({proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(
        tree_peak_rss_mib=tree_peak / 2**20,
        max_process_rss_mib=process_peak / 2**20,
        max_descendant_rss_mib=descendant_peak / 2**20,
        descendants_cpu_s=sum(descendant_cpu.values()),
        peak_build_bytes=build_peak,
        peak_work_bytes=work_peak,
    )
    if "own_cpu_s" in result:
        result["cpu_s"] = result["own_cpu_s"] + max(result["descendants_cpu_s"], result["waited_children_cpu_s"])
    return result


def files_data(paths: list[Path], cache_dir: Path, params: PrepareBenchParams, **settings) -> dict:
    """DataConfig keys of a data=files prepare of ``paths`` into ``cache_dir``."""
    return {
        "source": "files",
        "paths": [str(path) for path in paths],
        "vocab_size": params.vocab_size,
        "num_proc": params.num_proc,
        "cache_dir": str(cache_dir),
        **settings,
    }


# ---------------------------------------------------------------- the sections


def measure_scale(params: PrepareBenchParams, inputs: list[tuple[Path, int]], work: Path, say=print) -> list[dict]:
    """A cold prepare (tokenizer training included, default workers and units) at each size."""
    from pretrain.config import DataConfig

    rows = []
    for size_mb in params.sizes_mb:
        paths = prefix_of(inputs, int(size_mb * MB))
        cache = work / f"cache-scale-{size_mb:g}"
        run = run_child({"kind": "prepare", "data": files_data(paths, cache, params)}, cache)
        corpus_bytes = disk_bytes(Path(run["directory"]))
        row = {
            "size_mb": size_mb,
            "input_bytes": sum(path.stat().st_size for path in paths),
            "files": len(paths),
            "data_workers": None,  # the default: every core
            "unit_bytes": DataConfig.unit_bytes,  # the default
            **{k: run[k] for k in ("documents", "tokens", "units", "wall_s", "cpu_s", "seconds", "tokenizer")},
            "tokens_per_cpu_s": run["tokens"] / run["cpu_s"],
            "own_cpu_s": run["own_cpu_s"],
            "peak_rss_mib": run["own_peak_rss_mib"],
            "children_peak_rss_mib": run["children_peak_rss_mib"],
            "tree_peak_rss_mib": run["tree_peak_rss_mib"],
            "max_process_rss_mib": run["max_process_rss_mib"],
            "max_descendant_rss_mib": run["max_descendant_rss_mib"],
            "peak_build_bytes": run["peak_build_bytes"],
            "peak_work_bytes": run["peak_work_bytes"],
            "corpus_bytes": corpus_bytes,
            "temp_disk_ratio": run["peak_build_bytes"] / corpus_bytes if corpus_bytes else None,
        }
        rows.append(row)
        say(
            f"  scale {size_mb:g} MB: {row['wall_s']:.1f} s, {row['tokens']:,} tokens, peak RSS "
            f"{row['peak_rss_mib']:.0f} MiB (tree {row['tree_peak_rss_mib']:.0f}), temporary disk "
            f"{row['peak_build_bytes'] / MB:,.1f} MB = {row['temp_disk_ratio']:.2f}x the corpus",
            flush=True,
        )
    return rows


def tokenizer_for(params: PrepareBenchParams, paths: list[Path], work: Path, scale_rows: list[dict]) -> str:
    """The tokenizer trained on the smallest input: the scale row's, or one unmeasured prepare's."""
    smallest = min(params.sizes_mb)
    for row in scale_rows:
        if row["size_mb"] == smallest:
            return row["tokenizer"]
    cache = work / "cache-tokenizer"
    return run_child({"kind": "prepare", "data": files_data(paths, cache, params)})["tokenizer"]


def measure_encode(params: PrepareBenchParams, paths: list[Path], tokenizer: str, work: Path, say=print) -> list[dict]:
    """The stage (given tokenizer, one process) against raw sentencepiece encoding, tokens per CPU-second."""
    cache = work / "cache-encode"
    data = files_data(paths, cache, params, tokenizer=tokenizer, workers=1, num_proc=1)
    stage = run_child({"kind": "prepare", "data": data})
    raw = run_child({"kind": "encode", "files": [str(path) for path in paths], "tokenizer": tokenizer})
    rows = [
        {"what": "prepare stage (data.tokenizer given, workers=1, num_proc=1)", "tokens": stage["tokens"],
         "documents": stage["documents"], "cpu_s": stage["cpu_s"], "wall_s": stage["wall_s"],
         "seconds": stage["seconds"], "tokens_per_cpu_s": stage["tokens"] / stage["cpu_s"]},
        {"what": "raw sentencepiece encode (1 thread)", "tokens": raw["tokens"], "documents": raw["documents"],
         "cpu_s": raw["cpu_s"], "wall_s": raw["wall_s"], "tokens_per_cpu_s": raw["tokens"] / raw["cpu_s"]},
    ]  # fmt: skip
    ratio = rows[0]["tokens_per_cpu_s"] / rows[1]["tokens_per_cpu_s"]
    rows[0]["vs_raw"], rows[1]["vs_raw"] = ratio, 1.0
    rows[0]["same_tokens"] = stage["tokens"] == raw["tokens"]
    shutil.rmtree(cache, ignore_errors=True)
    say(f"  encode: the stage at {ratio:.2f}x raw sentencepiece's tokens per CPU-second", flush=True)
    return rows


def measure_workers(params: PrepareBenchParams, paths: list[Path], tokenizer: str, work: Path, say=print) -> list[dict]:
    """The whole stage with ``--workers`` against 1, many small units, the same given tokenizer."""
    rows = []
    for workers in (1, params.workers):
        cache = work / f"cache-workers-{workers}"
        unit_bytes = max(1, int(params.unit_mb * MB))
        data = files_data(paths, cache, params, tokenizer=tokenizer, workers=workers, num_proc=1, unit_bytes=unit_bytes)
        run = run_child({"kind": "prepare", "data": data})
        rows.append(
            {"workers": workers, "unit_bytes": unit_bytes, "units": run["units"], "tokens": run["tokens"],
             "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "seconds": run["seconds"],
             "tree_peak_rss_mib": run["tree_peak_rss_mib"], "shard_sha256": run["shard_sha256"]}
        )  # fmt: skip
        shutil.rmtree(cache, ignore_errors=True)
    one = rows[0]
    for row in rows:
        row["wall_vs_1"] = row["wall_s"] / one["wall_s"]
        tokenize, tokenize_one = row["seconds"]["tokenize"], one["seconds"]["tokenize"]
        row["tokenize_vs_1"] = tokenize / tokenize_one if tokenize and tokenize_one else None
    shards = [row.pop("shard_sha256") for row in rows]
    for row, own in zip(rows, shards, strict=True):
        row["same_shards"] = own == shards[0]
    say(f"  workers: {params.workers} workers take {rows[-1]['wall_vs_1']:.2f}x the wall time of 1", flush=True)
    return rows


def section_checks(encode: list[dict], workers: list[dict], scale: list[dict], params: PrepareBenchParams) -> list:
    """The issue's targets for the sections that ran: PASS or MISS with the numbers, INFO for what is reported."""
    checks = []
    if encode:
        ratio = encode[0]["vs_raw"]
        checks.append(
            {"name": f"tokens per CPU-second of the stage >= {TARGET_ENCODE}x raw sentencepiece",
             "status": "PASS" if ratio >= TARGET_ENCODE else "MISS",
             "detail": f"{encode[0]['tokens_per_cpu_s']:,.0f} / {encode[1]['tokens_per_cpu_s']:,.0f} = {ratio:.2f}x"}
        )  # fmt: skip
    if workers:
        ratio = workers[-1]["wall_vs_1"]
        checks.append(
            {"name": f"wall time with data.workers={params.workers} <= {TARGET_WORKERS}x data.workers=1",
             "status": "PASS" if ratio <= TARGET_WORKERS else "MISS",
             "detail": f"{workers[-1]['wall_s']:.1f} / {workers[0]['wall_s']:.1f} s = {ratio:.2f}x over "
             f"{workers[0]['units']} units (tokenize phase {workers[-1]['tokenize_vs_1']:.2f}x)"}
        )  # fmt: skip
    if scale:
        worst = max(scale, key=lambda row: row["temp_disk_ratio"] or 0)
        checks.append(
            {"name": f"temporary disk (peak .build-* / final corpus) <= {TARGET_TEMP_DISK}x",
             "status": "PASS" if (worst["temp_disk_ratio"] or 0) <= TARGET_TEMP_DISK else "MISS",
             "detail": ", ".join(f"{r['size_mb']:g} MB: {r['temp_disk_ratio']:.2f}x" for r in scale)}
        )  # fmt: skip
        checks.append(
            {"name": "peak RSS against input size", "status": "INFO",
             "detail": ", ".join(f"{r['size_mb']:g} MB: {r['peak_rss_mib']:.0f} MiB (tree {r['tree_peak_rss_mib']:.0f})"
                                 for r in scale)}
        )  # fmt: skip
    return checks


def format_sections(encode: list[dict], workers: list[dict], scale: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = []
    if scale:
        lines.append("scale: cold prepare (tokenizer training included) of the synthetic data=files corpus")
        lines.append(
            f"{'input MB':>9}{'tokens':>13}{'units':>7}{'wall s':>8}{'CPU s':>8}{'tok/CPU-s':>11}{'peak RSS MiB':>14}"
            f"{'tree MiB':>10}{'temp disk MB':>14}{'of it work/':>13}{'corpus MB':>11}{'temp/corpus':>13}"
        )
        for r in scale:
            lines.append(
                f"{r['input_bytes'] / MB:>9.1f}{r['tokens']:>13,}{r['units']:>7}{num(r['wall_s'], 1):>8}"
                f"{num(r['cpu_s'], 1):>8}{num(r['tokens_per_cpu_s'], 0):>11}{num(r['peak_rss_mib'], 0):>14}"
                f"{num(r['tree_peak_rss_mib'], 0):>10}{r['peak_build_bytes'] / MB:>14.1f}"
                f"{r['peak_work_bytes'] / MB:>13.1f}{r['corpus_bytes'] / MB:>11.1f}{num(r['temp_disk_ratio'], 2):>13}"
            )
    if encode:
        lines += ["", "encode: tokens per CPU-second, one process each"] if lines else ["encode"]
        lines.append(f"{'':<62}{'tokens':>13}{'CPU s':>8}{'tok/CPU-s':>11}{'vs raw':>8}")
        for r in encode:
            lines.append(
                f"{r['what']:<62}{r['tokens']:>13,}{num(r['cpu_s'], 2):>8}{num(r['tokens_per_cpu_s'], 0):>11}"
                f"{num(r['vs_raw'], 2):>8}"
            )
    if workers:
        lines += ["", "workers: wall time of the stage (given tokenizer, num_proc=1)"]
        lines.append(f"{'workers':>8}{'units':>7}{'wall s':>8}{'tokenize s':>12}{'wall vs 1':>11}{'same shards':>13}")
        for r in workers:
            lines.append(
                f"{r['workers']:>8}{r['units']:>7}{num(r['wall_s'], 2):>8}{num(r['seconds']['tokenize'], 2):>12}"
                f"{num(r['wall_vs_1'], 2):>11}{'yes' if r['same_shards'] else 'NO':>13}"
            )
    return "\n".join(lines)


def run_sections(params: PrepareBenchParams, work_dir: Path | None, say=print) -> dict:
    """The synthetic-corpus sections that ``params.sections`` names: ``{"scale", "encode", "workers"}`` rows."""
    wanted = set(params.sections)
    found: dict[str, list] = {"scale": [], "encode": [], "workers": []}
    if not wanted & set(found):
        return found
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=work_dir))
    try:
        largest = max(params.sizes_mb) if "scale" in wanted else min(params.sizes_mb)
        file_bytes = max(64 * 1024, min(8 * MB, int(min(params.sizes_mb) * MB / 4)))
        started = time.perf_counter()
        inputs = write_synthetic_inputs(work / "inputs", int(largest * MB), file_bytes)
        say(
            f"  wrote {sum(size for _, size in inputs) / MB:,.1f} MB of synthetic .jsonl in {len(inputs)} files "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        if "scale" in wanted:
            found["scale"] = measure_scale(params, inputs, work, say)
        if wanted & {"encode", "workers"}:
            paths = prefix_of(inputs, int(min(params.sizes_mb) * MB))
            tokenizer = tokenizer_for(params, paths, work, found["scale"])
            if "encode" in wanted:
                found["encode"] = measure_encode(params, paths, tokenizer, work, say)
            if "workers" in wanted:
                found["workers"] = measure_workers(params, paths, tokenizer, work, say)
        for row in found["scale"]:
            row.pop("tokenizer")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return found


def parse_params(argv: list[str], prog: str) -> tuple[PrepareBenchParams, argparse.Namespace]:
    from pretrain.errors import ConfigError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192, >= 260)")
    parser.add_argument("--max-files", type=positive_int, help="the first N stdlib files (default: all of them)")
    parser.add_argument("--num-proc", type=positive_int, default=2, help="tokenizing processes (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="cold prepares, each in a fresh cache")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=(*SECTIONS, "all"),
        default=["stdlib"],
        help="what to measure (default stdlib: the rows above; all: every section, see the module's docstring)",
    )
    parser.add_argument(
        "--sizes-mb",
        type=positive_float,
        nargs="+",
        default=[20.0, 100.0],
        help="synthetic input sizes in MB of the scale rows; encode and workers use the smallest (default 20 100)",
    )
    parser.add_argument(
        "--unit-mb", type=positive_float, default=1.0, help="data.unit_bytes in MB of the workers rows (default 1)"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=2, help="data.workers compared with 1 in the workers rows (default 2)"
    )
    parser.add_argument("--work-dir", type=Path, help="where the synthetic inputs and caches go (default: temp)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sections = SECTIONS if "all" in args.sections else tuple(s for s in SECTIONS if s in args.sections)
    params = PrepareBenchParams(
        vocab_size=args.vocab_size,
        max_files=args.max_files,
        num_proc=args.num_proc,
        repeats=args.repeats,
        sections=sections,
        sizes_mb=tuple(sorted(set(args.sizes_mb))),
        unit_mb=args.unit_mb,
        workers=args.workers,
    )
    try:
        data_config(params, "unused")  # the stage's own checks, with its own message
    except ConfigError as err:
        parser.error(f"{err} (data.vocab_size is --vocab-size, data.max_files --max-files)")
    return params, args


def main(argv: list[str], prog: str = "python -m pretrain.bench prepare") -> int:
    params, args = parse_params(argv, prog)
    from pretrain.bench.report import machine_info, now_iso, write_report
    from pretrain.errors import PipelineError

    started = now_iso()
    machine = machine_info("cpu")
    rows, summary = [], None
    if "stdlib" in params.sections:
        files = "all" if params.max_files is None else f"the first {params.max_files}"
        print(
            f"prepare benchmark on {machine['device_name']}: data=stdlib ({files} files), vocab {params.vocab_size}, "
            f"{params.num_proc} processes, {params.repeats} cold run(s) in fresh cache directories",
            flush=True,
        )
        for i in range(params.repeats):
            try:
                row = measure(params)
            except PipelineError as err:  # a setting the corpus cannot take (a vocabulary below its alphabet)
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 2
            rows.append(row)
            print(f"  run {i + 1}: {row['wall_s']:.2f} s, {row['tokens_per_s']:,.0f} tokens/s", flush=True)
        summary = summarize(rows)
        machine = {**machine, **rows[0]["versions"]}
    others = [section for section in params.sections if section != "stdlib"]
    if others:
        print(
            f"prepare benchmark on {machine['device_name']}: {', '.join(others)} on synthetic data=files inputs of "
            f"{', '.join(f'{size:g}' for size in params.sizes_mb)} MB, vocab {params.vocab_size}",
            flush=True,
        )
    try:
        found = run_sections(params, args.work_dir)
    except RuntimeError as err:  # a measured run failed: its stderr's end is in the message
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    checks = section_checks(found["encode"], found["workers"], found["scale"], params)
    if others:
        from importlib.metadata import version

        machine.update({name: version(name) for name in ("sentencepiece", "datasets", "datatrove", "psutil")})

    if rows:
        print()
        print(format_table(rows))
        if params.repeats > 1:
            print(
                f"median: {summary['wall_s']:.2f} s, {summary['tokens_per_s']:,.0f} tokens/s over the stage, "
                f"{summary['tokenize_tokens_per_s']:,.0f} tokens/s tokenizing"
            )
    if others:
        print()
        print(format_sections(found["encode"], found["workers"], found["scale"]))
        print()
        for check in checks:
            print(f"{check['status']:<5} {check['name']}: {check['detail']}")
    extra = {"summary": summary} if summary is not None else {}
    if others:
        extra.update(found, checks=checks)
    write_report(args.out, "prepare", started, machine, params, rows, **extra)
    return 0
