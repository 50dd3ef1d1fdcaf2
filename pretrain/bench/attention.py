"""Benchmark of the ALiBi attention backends: forward+backward time and peak extra memory against length.

    python -m pretrain.bench attention [--lengths 1024 2048 4096 8192] [--backends fused sdpa]
        [--batch 1 --heads 8 --head-dim 64 --dtype float32 --device cpu|cuda --repeats N --warmup N --out PATH.json]

Backends: those of ``pretrain.attention.alibi_attention`` (``fused``, ``sdpa`` with its materialized ``L x L``
bias, ``eager``), ``sdpa_causal_nobias``: ``scaled_dot_product_attention(q, k, v, is_causal=True)`` with
no bias, the floor an attention without ALiBi reaches, and ``fused_documents``: the fused kernel with document masks
(``train.document_mask``) on packed real windows: each row of the batch is a window of ``--corpus``'s train
stream (a prepared corpus folder; default: the first ``data/stdlib-*``) at a fixed random place, its documents
where the corpus's document offsets put them.

Time: the median over ``--repeats`` calls of forward + ``out.backward(grad)``, after ``--warmup`` calls (which
also compile FlexAttention on CUDA); CUDA calls are timed with CUDA events.

Peak extra memory: the most memory held at once during forward+backward beyond what was held just before it
(q, k, v, the output gradient, and whatever importing torch and the warm-up left). The gradients of q, k
and v are reset before every call, so they are part of it.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``
  before: the caching allocator's count of live tensor bytes.
- CPU: PyTorch allocates with plain malloc, which tracemalloc does not see, so each (backend, length) runs
  in a fresh process (this module with the hidden ``--one`` flag). After the warm-up it hands freed heap
  pages back to the OS (``malloc_trim``), reads its RSS, resets the kernel's RSS high-water mark (writing 5
  to ``/proc/self/clear_refs``) and, after the timed calls, reads the mark (``VmHWM``). The difference
  counts whole pages, so it includes malloc's slack, and it is an upper bound of the live tensor bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.bench.options import positive_int
from pretrain.bench.report import machine_info, now_iso, write_report
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import BACKENDS, alibi_attention
from pretrain.perf.memory import MIB, peak_memory_meter

BENCH_BACKENDS = (*BACKENDS, "sdpa_causal_nobias", "fused_documents")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per device: lengths, repeats, warm-up calls. A GPU call at these sizes takes milliseconds; a CPU call of
# the fused kernel at L=8192 about half a minute on two cores.
DEFAULTS = {
    "cpu": ((1024, 2048, 4096, 8192), 3, 1),
    "cuda": ((2048, 4096, 8192, 16384, 32768), 20, 3),
}

RESULT_PREFIX = "BENCH_RESULT "  # how a --one child hands its row to the parent, on one stdout line


@dataclass(frozen=True)
class AttentionBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    lengths: tuple[int, ...]
    backends: tuple[str, ...]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    repeats: int
    warmup: int
    corpus: str | None = None


# --- one measurement ---------------------------------------------------------------------------------------


def attention_call(backend: str, document_ids: torch.Tensor | None = None):
    """The function ``(q, k, v, slopes) -> out [B, H, L, D]`` that a backend name stands for."""
    if backend == "sdpa_causal_nobias":
        return lambda q, k, v, head_slopes: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "fused_documents":
        return lambda q, k, v, head_slopes: alibi_attention(q, k, v, head_slopes, document_ids=document_ids)
    return lambda q, k, v, head_slopes: alibi_attention(q, k, v, head_slopes, backend=backend)


def default_corpus() -> str | None:
    """The first prepared default corpus (``data/stdlib-*``) with a train split, or None."""
    found = sorted(p.parent.parent for p in Path("data").glob("stdlib-*/train/*.docs.npy"))
    return str(found[0]) if found else None


def document_lengths(corpus: str) -> np.ndarray:
    """The token counts of the train split's documents (each shard's ``.docs.npy`` offsets), in stream order."""
    paths = sorted((Path(corpus) / "train").glob("*.docs.npy"))
    if not paths:
        raise SystemExit(f"error: {corpus} holds no train/*.docs.npy: give --corpus a prepared corpus folder")
    return np.concatenate([np.diff(np.load(path)) for path in paths])


def packed_document_ids(corpus: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """int64 ``[batch, length]``: the document of each position of ``batch`` windows of the packed train stream,
    each at a random place, as the training loader cuts them."""
    offsets = np.concatenate([[0], np.cumsum(document_lengths(corpus))])
    starts = np.random.default_rng(seed).integers(0, max(1, offsets[-1] - length), size=batch)
    rows = [np.searchsorted(offsets, start + np.arange(length), side="right") - 1 for start in starts]
    return torch.from_numpy(np.stack(rows) - np.stack(rows)[:, :1]).long()


def make_inputs(params: AttentionBenchParams, length: int):
    """q, k, v ``[B, H, L, D]`` needing gradients, the output gradient of the same shape, float32 slopes ``[H]``."""
    gen = torch.Generator().manual_seed(0)
    shape = (params.batch, params.heads, length, params.head_dim)
    dtype, device = DTYPES[params.dtype], torch.device(params.device)
    q, k, v, grad = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, grad, slopes(params.heads).to(device)


def measure(params: AttentionBenchParams, backend: str, length: int) -> dict:
    """Time and peak extra memory of forward+backward of one backend at one length, in this process."""
    device = torch.device(params.device)
    q, k, v, grad, head_slopes = make_inputs(params, length)
    ids = None
    if backend == "fused_documents":
        ids = packed_document_ids(params.corpus, params.batch, length).to(device)
    attend = attention_call(backend, ids)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        out = attend(q, k, v, head_slopes)
        out.backward(grad)

    for _ in range(params.warmup):
        step()
    q.grad = k.grad = v.grad = None
    meter = peak_memory_meter(device)
    meter.start()
    times_ms = []
    for _ in range(params.repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times_ms.append((time.perf_counter() - t0) * 1000)
    extra = {}
    if ids is not None:
        extra["documents_per_window"] = float((ids[:, -1] + 1).float().mean())
    return {
        **extra,
        "length": length,
        "backend": backend,
        "status": "ok",
        "time_ms": statistics.median(times_ms),
        "times_ms": times_ms,
        "peak_extra_mib": meter.peak_extra_bytes() / MIB,
        "memory_method": meter.method,
    }


def measure_in_subprocess(params: AttentionBenchParams, backend: str, length: int) -> dict:
    """``measure`` in a fresh Python process, so the RSS of one measurement owes nothing to another."""
    argv = [sys.executable, "-m", "pretrain.bench", "attention", "--one", "--lengths", str(length)]
    argv += ["--backends", backend, "--batch", str(params.batch), "--heads", str(params.heads)]
    argv += ["--head-dim", str(params.head_dim), "--dtype", params.dtype, "--device", params.device]
    argv += ["--repeats", str(params.repeats), "--warmup", str(params.warmup)]
    if params.corpus is not None:
        argv += ["--corpus", params.corpus]
    env = dict(os.environ)
    # The child imports this same checkout of the package, wherever the parent was started from.
    project_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode < 0:
        status = f"killed by signal {-proc.returncode} (out of memory?)"
    else:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        status = f"failed (exit {proc.returncode}): {tail[0]}"
    return {"length": length, "backend": backend, "status": status}


def measure_row(params: AttentionBenchParams, backend: str, length: int) -> dict:
    """One row of the table: on CPU in a fresh process, on CUDA in this one (an out-of-memory becomes a row)."""
    if params.device == "cpu":
        return measure_in_subprocess(params, backend, length)
    try:
        return measure(params, backend, length)
    except torch.OutOfMemoryError:
        return {"length": length, "backend": backend, "status": "out of memory"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# --- the report --------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Add each row's time and memory over those of ``sdpa`` at the same length (None where either is missing)."""
    reference = {r["length"]: r for r in rows if r["backend"] == "sdpa" and r["status"] == "ok"}
    for row in rows:
        ref = reference.get(row["length"])
        ok = ref is not None and row["status"] == "ok"
        row["time_vs_sdpa"] = row["time_ms"] / ref["time_ms"] if ok and ref["time_ms"] > 0 else None
        row["memory_vs_sdpa"] = row["peak_extra_mib"] / ref["peak_extra_mib"] if ok and ref["peak_extra_mib"] else None


def format_table(rows: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{'L':>7}  {'backend':<20}{'time ms':>11}{'peak extra MiB':>16}{'time/sdpa':>11}{'mem/sdpa':>10}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['length']:>7}  {r['backend']:<20}  {r['status']}")
            continue
        lines.append(
            f"{r['length']:>7}  {r['backend']:<20}{num(r['time_ms'], 1):>11}{num(r['peak_extra_mib'], 1):>16}"
            f"{num(r['time_vs_sdpa'], 2):>11}{num(r['memory_vs_sdpa'], 3):>10}"
        )
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> list[dict]:
    """The two targets of the fused kernel (from the project's issue), each PASS, MISS or SKIP with its numbers."""
    ok = {(r["backend"], r["length"]): r for r in rows if r["status"] == "ok"}
    checks = []

    name = "at L=4096 fused uses at most 1/4 of sdpa's extra memory and is at least as fast"
    fused, sdpa = ok.get(("fused", 4096)), ok.get(("sdpa", 4096))
    if fused and sdpa:
        mem_ratio = fused["peak_extra_mib"] / max(sdpa["peak_extra_mib"], 1e-9)
        time_ratio = fused["time_ms"] / sdpa["time_ms"]
        passed = mem_ratio <= 0.25 and time_ratio <= 1.0
        detail = (
            f"memory {fused['peak_extra_mib']:.1f} / {sdpa['peak_extra_mib']:.1f} MiB = {mem_ratio:.3f} (<= 0.25), "
            f"time {fused['time_ms']:.1f} / {sdpa['time_ms']:.1f} ms = {time_ratio:.2f} (<= 1)"
        )
        checks.append({"name": name, "status": "PASS" if passed else "MISS", "detail": detail})
    else:
        checks.append({"name": name, "status": "SKIP", "detail": "needs fused and sdpa measured at L=4096"})

    name = "from L=4096 to L=8192 fused memory grows no faster than linearly"
    small, large = ok.get(("fused", 4096)), ok.get(("fused", 8192))
    if small and large:
        growth = large["peak_extra_mib"] / max(small["peak_extra_mib"], 1e-9)
        detail = f"{small['peak_extra_mib']:.1f} -> {large['peak_extra_mib']:.1f} MiB = {growth:.2f}x (<= 2.2)"
        checks.append({"name": name, "status": "PASS" if growth <= 2.2 else "MISS", "detail": detail})
    else:
        checks.append({"name": name, "status": "SKIP", "detail": "needs fused measured at L=4096 and L=8192"})

    # Document masks skip the key blocks of other documents: on real packed windows they cost no more than none.
    for length in sorted({r["length"] for r in rows}):
        masked, plain = ok.get(("fused_documents", length)), ok.get(("fused", length))
        if masked and plain:
            ratio = masked["time_ms"] / plain["time_ms"]
            detail = (
                f"{masked['time_ms']:.1f} / {plain['time_ms']:.1f} ms = {ratio:.2f} (<= 1; "
                f"{masked['documents_per_window']:.1f} documents a window)"
            )
            name = f"at L={length} fused with document masks takes at most fused's time"
            checks.append({"name": name, "status": "PASS" if ratio <= 1.0 else "MISS", "detail": detail})
    return checks


# --- command line ------------------------------------------------------------------------------------------


def parse_params(argv: list[str], prog: str) -> tuple[AttentionBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", help="sequence lengths (default cpu: 1024..8192, cuda: 2048..32768)"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BENCH_BACKENDS, default=["fused", "sdpa"], help="default: fused sdpa"
    )
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    parser.add_argument("--repeats", type=positive_int, help="timed calls (default cpu: 3, cuda: 20)")
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls first (default cpu: 1, cuda: 3); with 0, the first call's one-time costs count",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--corpus",
        help="fused_documents: a prepared corpus folder whose documents pack the windows (default: data/stdlib-*)",
    )
    # Internal: measure one (backend, length) in this process and print the row (the CPU parent's child).
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch; use --device cpu")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup {args.warmup} is not allowed; it must be >= 0")
    if args.one and (args.lengths is None or len(args.lengths) != 1 or len(args.backends) != 1):
        parser.error("--one measures exactly one length and one backend")
    corpus = args.corpus
    if "fused_documents" in args.backends and corpus is None:
        corpus = default_corpus()
        if corpus is None:
            parser.error("--backends fused_documents needs --corpus, a prepared corpus folder (none in data/stdlib-*)")
    lengths, repeats, warmup = DEFAULTS[args.device]
    params = AttentionBenchParams(
        lengths=tuple(args.lengths or lengths),
        backends=tuple(dict.fromkeys(args.backends)),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats or repeats,
        warmup=warmup if args.warmup is None else args.warmup,
        corpus=corpus,
    )
    return params, args


def main(argv: list[str], prog: str = "python -m pretrain.bench attention") -> int:
    params, args = parse_params(argv, prog)
    if args.one:
        row = measure(params, params.backends[0], params.lengths[0])
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return 0

    started = now_iso()
    machine = machine_info(params.device)
    print(
        f"attention benchmark on {machine['device_name']} ({params.device}, {machine['torch_threads']} torch threads): "
        f"batch {params.batch}, heads {params.heads}, head_dim {params.head_dim}, {params.dtype}, "
        f"{params.warmup} warm-up + {params.repeats} timed calls of forward+backward each",
        flush=True,
    )
    rows = []
    for length in params.lengths:
        for backend in params.backends:
            row = measure_row(params, backend, length)
            rows.append(row)
            summary = (
                f"{row['time_ms']:.1f} ms, {row['peak_extra_mib']:.1f} MiB" if row["status"] == "ok" else row["status"]
            )
            print(f"  L={length} {backend}: {summary}", flush=True)
    add_ratios(rows)
    checks = target_checks(rows)

    print()
    print(format_table(rows))
    print()
    for check in checks:
        print(f"{check['status']}: {check['name']}: {check['detail']}")
    write_report(args.out, "attention", started, machine, params, rows, checks=checks)
    return 0
