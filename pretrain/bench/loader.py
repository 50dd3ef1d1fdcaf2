"""Benchmark of the training loader on a corpus of any size: start-up time, memory per rank, bytes read per byte used.

    python -m pretrain.bench loader --tokens N [--shards 1000] [--seq-len 2048] [--micro-batch 8] [--ranks 1 2]
        [--steps 100] [--dtype uint16] [--seed 0] [--dir DIR] [--keep] [--out PATH.json]

The corpus is synthetic and *sparse*: ``--shards`` files of ``N / shards`` tokens each, made with ``os.truncate``
(no data written: a hole reads as zeros and takes no disk space, so 500e9 tokens, a terabyte of uint16, fit on any
disk whose filesystem has sparse files; the benchmark refuses a filesystem that allocates them). A ``ShardSet`` over
them is what ``PreparedCorpus.open`` gives the training loop for a prepared corpus of that size.

For each ``--ranks`` count n, each data-parallel rank r of n runs, one after the other, in a fresh Python process
(so that its memory is the loader's own, not this program's), which imports torch and the loader, then times
``first_batch_s``: building the ``ShardSet`` and the ``TokenWindowLoader`` (rank r of n, with an ``identity`` as
training passes the manifest's digest, so no shard is read to identify the split) and its first ``next_batch``;
then ``--steps`` - 1 more batches (``step_ms``: their mean). Its row gives

- ``rss_mib``: the peak resident memory of that process (``VmHWM`` of ``/proc/self/status``), nothing taken
  off: the interpreter, numpy and torch are most of it (``baseline_rss_mib``: its resident memory after the
  imports, before the loader);
- ``read_amplification``: the bytes brought into memory from the shard files over the bytes of tokens its batches
  used (``steps x micro_batch x (seq_len + 1) x itemsize``). Memory-mapped reads are page faults, which the
  ``rchar``/``read_bytes`` of ``/proc/self/io`` do not count, so the bytes brought in are measured on the page cache:
  before the rank's process starts, every shard's pages are dropped from it (``posix_fadvise(POSIX_FADV_DONTNEED)``;
  nobody else reads these files), and after it ends, every shard it opened (the only ones it can have read) is
  mapped again and ``mincore()`` counts its pages in the page cache, times the page size. A hole of a sparse file
  is read like data (a fault creates a zeroed page in the page cache), so this counts what a real file would bring
  in on a local filesystem. The process's major faults after its imports (``ru_majflt``) times the page size are a
  second count (``read_amplification_majflt``): the same unless the kernel brings in more than the faulting page,
  or higher when the process also faults in pages of another file (a library's code read for the first time).

The floor of the read amplification is set by pages, not by the loader: a window of ``seq_len + 1`` tokens that
starts anywhere in a page spans whole pages, and with ``MADV_RANDOM`` (the loader's mapping advice) the kernel
reads only those. ``page_floor`` is that bound for the settings (the mean over the window's possible offsets in a
page of the pages it spans, times the page size, over its bytes): 8,192 / 4,098 = 1.999 for uint16 at seq_len 2048
(a 4,098-byte window at an even offset always spans exactly 2 pages of 4 KiB), so the target of <= 2 is met only
by a hair and any page shared by no two windows cannot go below it.

Targets (from the project's issue, for 500e9 tokens): ``first_batch_s`` <= 2, ``rss_mib`` <= 300 per rank,
``read_amplification`` <= 2; each is printed as PASS or MISS over the worst rank (the exit status is 0 either way).
The synthetic files are removed at the end unless ``--keep``. Reading holes costs no disk I/O, so ``first_batch_s``
and ``step_ms`` are the loader's own cost, without the storage's latency.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.bench.options import positive_int

PAGE = mmap.PAGESIZE
# (key, target, what it means) of the issue; each is an upper bound on the worst rank.
TARGETS = (
    ("first_batch_s", 2.0, "construct the loader + first batch"),
    ("rss_mib", 300.0, "peak RSS of a rank's process"),
    ("read_amplification", 2.0, "bytes brought in / bytes used"),
)
# The identity the training loop would pass (the manifest's digest of the split): no shard is read to identify it.
IDENTITY = "bench-loader-synthetic"


@dataclass(frozen=True)
class LoaderBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    tokens: int
    shards: int
    seq_len: int
    micro_batch: int
    ranks: tuple[int, ...]
    steps: int
    dtype: str
    seed: int


def shard_layout(directory: Path, tokens: int, shards: int) -> list[tuple[Path, int]]:
    """``(path, tokens)`` of each synthetic shard: ``tokens`` split as evenly as whole tokens allow."""
    base, extra = divmod(tokens, shards)
    return [(directory / f"{i:05d}.bin", base + (1 if i < extra else 0)) for i in range(shards)]


def build_sparse_corpus(directory: Path, layout: list[tuple[Path, int]], itemsize: int) -> int:
    """Create every shard as a sparse file of its size; return the bytes the filesystem allocated (about 0).

    Raises SystemExit with a message if the filesystem allocates them (no sparse files there: it would fill the disk).
    """
    directory.mkdir(parents=True, exist_ok=True)
    allocated = 0
    for path, size in layout:
        with open(path, "wb"):
            pass
        os.truncate(path, size * itemsize)
        blocks = os.stat(path).st_blocks * 512
        allocated += blocks
        if blocks > 1 << 20:
            raise SystemExit(
                f"error: {directory} is on a filesystem without sparse files ({path.name} took {blocks:,} bytes); "
                "give --dir on one that has them (ext4, xfs, btrfs, tmpfs)"
            )
    return allocated


def drop_cached_pages(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are clean: nothing is written to them)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _mincore():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.mincore.restype = ctypes.c_int
    return libc.mincore


def cached_pages(paths: list[Path]) -> list[int]:
    """Pages of each file in the page cache now: ``mincore()`` over a fresh read-only mapping (which reads nothing)."""
    mincore = _mincore()
    counts = []
    for path in paths:
        size = os.stat(path).st_size
        if size == 0:
            counts.append(0)
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = np.frombuffer(mapped, dtype=np.uint8)
            n_pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * n_pages)()
            if mincore(ctypes.c_void_p(view.ctypes.data), size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            del view
            counts.append(int(np.count_nonzero(np.frombuffer(vector, dtype=np.uint8) & 1)))
    return counts


def page_floor(seq_len: int, itemsize: int) -> float:
    """Pages a window of ``seq_len + 1`` tokens spans, times the page size, over its bytes: the mean over its possible
    starts in a page (multiples of the itemsize). No loader reading whole windows by page faults can do better."""
    window = (seq_len + 1) * itemsize
    starts = range(0, PAGE, itemsize)
    pages = sum(math.ceil((start + window) / PAGE) for start in starts) / len(starts)
    return pages * PAGE / window


# ---------------------------------------------------------------- one rank, in its own process


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rank_main(spec_json: str) -> int:
    """The child: one rank's loader on the synthetic corpus; prints its measurements as one JSON line."""
    import resource

    spec = json.loads(spec_json)
    started = time.perf_counter()
    import torch  # noqa: F401  (what a training process has loaded anyway)

    from pretrain.data.loader import TokenWindowLoader
    from pretrain.data.shards import ShardSet

    import_s = time.perf_counter() - started
    baseline_kib = _vm_kib("VmRSS")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    layout = shard_layout(Path(spec["dir"]), spec["tokens"], spec["shards"])

    t0 = time.perf_counter()
    shards = ShardSet(layout, spec["dtype"], random_access=True)
    loader = TokenWindowLoader(
        shards,
        spec["dtype"],
        spec["seq_len"],
        spec["micro_batch"],
        spec["seed"],
        dp_rank=spec["rank"],
        dp_size=spec["ranks"],
        identity=IDENTITY,
    )
    inputs, targets = loader.next_batch()
    first_batch_s = time.perf_counter() - t0
    assert tuple(inputs.shape) == (spec["micro_batch"], spec["seq_len"]) == tuple(targets.shape)
    t0 = time.perf_counter()
    for _ in range(spec["steps"] - 1):
        loader.next_batch()
    rest_s = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kib = _vm_kib("VmHWM") or usage.ru_maxrss
    result = {
        "import_s": import_s,
        "first_batch_s": first_batch_s,
        "step_ms": 1000 * rest_s / (spec["steps"] - 1) if spec["steps"] > 1 else None,
        "rss_mib": peak_kib / 1024,
        "baseline_rss_mib": baseline_kib / 1024 if baseline_kib is not None else None,
        "major_faults": usage.ru_majflt - faults,
        "windows": loader.n_windows,
        "shards_opened": sorted(shards._open),  # the shards it mapped, the only ones it can have read
    }
    print(json.dumps(result), flush=True)
    return 0


def run_rank(params: LoaderBenchParams, directory: Path, ranks: int, rank: int) -> dict:
    spec = {
        "dir": str(directory),
        "tokens": params.tokens,
        "shards": params.shards,
        "dtype": params.dtype,
        "seq_len": params.seq_len,
        "micro_batch": params.micro_batch,
        "seed": params.seed,
        "steps": params.steps,
        "rank": rank,
        "ranks": ranks,
    }
    code = "import sys; from pretrain.bench.loader import rank_main; sys.exit(rank_main(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"rank {rank} of {ranks} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(params: LoaderBenchParams, directory: Path, layout: list[tuple[Path, int]], say=print) -> list[dict]:
    itemsize = np.dtype(params.dtype).itemsize
    paths = [path for path, _ in layout]
    used = params.steps * params.micro_batch * (params.seq_len + 1) * itemsize
    floor = page_floor(params.seq_len, itemsize)
    rows = []
    for ranks in params.ranks:
        for rank in range(ranks):
            drop_cached_pages(paths)
            child = run_rank(params, directory, ranks, rank)
            # Only the shards the loader opened can have been read: mincore over 1,000 mappings of 1 GB costs seconds.
            opened = child.pop("shards_opened")
            brought_in = sum(cached_pages([paths[i] for i in opened])) * PAGE
            row = {
                "ranks": ranks,
                "rank": rank,
                **child,
                "bytes_used": used,
                "bytes_brought_in": brought_in,
                "shards_touched": len(opened),
                "read_amplification": brought_in / used,
                "read_amplification_majflt": child["major_faults"] * PAGE / used,
                "page_floor": floor,
            }
            rows.append(row)
            say(
                f"  {ranks} rank(s), rank {rank}: first batch {row['first_batch_s']:.3f} s, peak RSS "
                f"{row['rss_mib']:.0f} MiB, read amplification {row['read_amplification']:.3f}",
                flush=True,
            )
    return rows


def target_checks(rows: list[dict], params: LoaderBenchParams) -> list[dict]:
    """Each target against the worst rank: PASS or MISS, with the worst value and the page floor."""
    checks = []
    at = ""
    if params.tokens < 500_000_000_000:
        at = f" (the targets are for 500e9 tokens; this run has {params.tokens:,})"
    for key, bound, what in TARGETS:
        worst = max(rows, key=lambda r: r[key])
        detail = f"worst {worst[key]:.3f} (rank {worst['rank']} of {worst['ranks']}), target <= {bound:g}{at}"
        if key == "read_amplification":
            detail += f"; the page floor for these settings is {worst['page_floor']:.3f}"
        if key == "rss_mib" and worst.get("baseline_rss_mib") is not None:
            detail += f"; {worst['baseline_rss_mib']:.0f} MiB of it is the interpreter, numpy and torch"
        checks.append(
            {"name": f"{key} <= {bound:g} ({what})", "status": "PASS" if worst[key] <= bound else "MISS",
             "detail": detail, "worst": worst[key], "target": bound}
        )  # fmt: skip
    return checks


def format_table(rows: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"{'ranks':>5}{'rank':>5}{'first batch s':>15}{'step ms':>9}{'peak RSS MiB':>14}{'after imports':>15}"
        f"{'shards touched':>16}{'read ampl.':>12}{'(majflt)':>10}{'page floor':>12}"
    ]
    for r in rows:
        lines.append(
            f"{r['ranks']:>5}{r['rank']:>5}{num(r['first_batch_s'], 3):>15}{num(r['step_ms'], 2):>9}"
            f"{num(r['rss_mib'], 1):>14}{num(r['baseline_rss_mib'], 1):>15}{r['shards_touched']:>16}"
            f"{num(r['read_amplification'], 3):>12}{num(r['read_amplification_majflt'], 3):>10}"
            f"{num(r['page_floor'], 3):>12}"
        )
    return "\n".join(lines)


def parse_params(argv: list[str], prog: str) -> tuple[LoaderBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, required=True, help="tokens of the synthetic corpus")
    parser.add_argument("--shards", type=positive_int, default=1000, help="shards it is split into (default 1000)")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="model.seq_len (default 2048)")
    parser.add_argument("--micro-batch", type=positive_int, default=8, help="train.micro_batch_size (default 8)")
    parser.add_argument(
        "--ranks", type=positive_int, nargs="+", default=[1, 2], help="data-parallel rank counts (default 1 2)"
    )
    parser.add_argument("--steps", type=positive_int, default=100, help="batches per rank (default 100)")
    parser.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16", help="token dtype (default uint16)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of the loader (default 0)")
    parser.add_argument("--dir", type=Path, help="where the sparse files go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="leave the synthetic files in place")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.tokens < args.shards:
        parser.error(f"--tokens {args.tokens} is fewer than --shards {args.shards}")
    params = LoaderBenchParams(
        tokens=args.tokens,
        shards=args.shards,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        ranks=tuple(args.ranks),
        steps=args.steps,
        dtype=args.dtype,
        seed=args.seed,
    )
    return params, args


def main(argv: list[str], prog: str = "python -m pretrain.bench loader") -> int:
    params, args = parse_params(argv, prog)
    from pretrain.bench.report import machine_info, now_iso, write_report

    started = now_iso()
    machine = machine_info("cpu")
    itemsize = np.dtype(params.dtype).itemsize
    created = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="bench-loader-")) if created else args.dir
    if not created and directory.exists() and any(directory.iterdir()):
        print(f"{prog}: error: --dir {directory} is not empty", file=sys.stderr)
        return 2
    layout = shard_layout(directory, params.tokens, params.shards)
    print(
        f"loader benchmark on {machine['device_name']}: {params.tokens:,} tokens ({params.dtype}, "
        f"{params.tokens * itemsize / 1e12:,.3f} TB apparent) in {params.shards} sparse shards under {directory}, "
        f"seq_len {params.seq_len}, micro-batch {params.micro_batch}, ranks {' '.join(map(str, params.ranks))}, "
        f"{params.steps} batches per rank",
        flush=True,
    )
    try:
        t0 = time.perf_counter()
        allocated = build_sparse_corpus(directory, layout, itemsize)
        build_s = time.perf_counter() - t0
        print(f"  created {params.shards} sparse files in {build_s:.2f} s ({allocated:,} bytes allocated)", flush=True)
        rows = measure(params, directory, layout)
    finally:
        if args.keep:
            print(f"kept the synthetic corpus in {directory}")
        elif created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for path, _ in layout:
                path.unlink(missing_ok=True)
    checks = target_checks(rows, params)
    print()
    print(format_table(rows))
    print()
    for check in checks:
        print(f"{check['status']:<5} {check['name']}: {check['detail']}")
    floor = rows[0]["page_floor"]
    if floor > 1.9:
        print(
            f"note: a window of {params.seq_len + 1} {params.dtype} tokens spans whole {PAGE}-byte pages, so "
            f"{floor:.3f} is the least read amplification any page-faulting reader gets at these settings"
        )
    machine = {**machine, "page_size": PAGE, "kernel": os.uname().release}
    corpus = {"directory": str(directory), "apparent_bytes": params.tokens * itemsize, "allocated_bytes": allocated}
    write_report(args.out, "loader", started, machine, params, rows, checks=checks, corpus=corpus)
    return 0
