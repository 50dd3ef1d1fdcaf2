"""Benchmark of sequence parallelism: per-rank peak memory and time of one training step against sp_size.

    python -m pretrain.bench sequence_parallel [--seq-len 8192] [--modes none ulysses ring] [--out PATH.json]

Each mode starts its own ranks with torchrun (``none``: one rank holding the whole sequence; ``ulysses`` and
``ring``: the sequence split over ``--sp-size`` ranks, zigzag for ring). Every rank builds the same model
(``model=tiny`` shape, vocabulary 8192, micro-batch 1, one thread), takes one warm-up step, then measures forward,
backward and an AdamW step: the time of a step, and its peak extra memory (the RSS high-water mark over the
RSS before the step; see ``attention.py``). The row reports the largest per-rank peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("none", "ulysses", "ring")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from pretrain.config import ModelConfig
    from pretrain.model.gpt import GPT
    from pretrain.parallel.distributed import init_deepspeed_comm
    from pretrain.parallel.sequence_parallel import apply_sequence_parallel
    from pretrain.perf.memory import MIB, RssPeakMemory

    init_deepspeed_comm("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=128, seq_len=args.seq_len, vocab_size=8192)
    model = GPT(cfg)
    layout = None
    if args.mode != "none":
        group = dist.new_group(list(range(world)))
        layout = apply_sequence_parallel(model, group, args.mode, args.seq_len, zigzag=args.mode == "ring")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 8192, (1, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if layout is None:
            loss = model(inputs, targets)
        else:
            loss = model(layout.shard(inputs), layout.shard(targets), positions=layout.positions()) / world
        loss.backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()

    step()  # warm-up: optimizer state, allocator pools
    meter = RssPeakMemory()
    meter.start()
    times = []
    for _ in range(args.steps):
        if world > 1:
            dist.barrier()
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    row = {"rank": rank, "time_s": statistics.median(times), "peak_extra_mib": meter.peak_extra_bytes() / MIB}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    # Every rank done communicating before any tears its connections down: a gloo peer closed mid-collective
    # aborts the other rank at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def run_mode(mode: str, seq_len: int, sp_size: int, steps: int) -> dict:
    ranks = 1 if mode == "none" else sp_size
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        # One thread per rank in every mode: more threads than free cores makes OpenMP spin and wait, which
        # distorts the one-rank time badly on a small shared machine. P ranks then use P cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", "pretrain.bench.sequence_parallel", "--worker", "--mode", mode,
            "--seq-len", str(seq_len), "--steps", str(steps), "--out", str(out),
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: the ranks failed:\n{proc.stderr[-3000:]}")
        rows = json.loads(out.read_text())
    return {
        "mode": mode,
        "ranks": ranks,
        "seq_len": seq_len,
        "time_s": max(r["time_s"] for r in rows),
        "peak_extra_mib_per_rank": max(r["peak_extra_mib"] for r in rows),
        "per_rank": rows,
    }


def main(argv: list[str], prog: str = "python -m pretrain.bench sequence_parallel") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--sp-size", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = [run_mode(mode, args.seq_len, args.sp_size, args.steps) for mode in args.modes]
    base = next((r for r in rows if r["mode"] == "none"), None)
    print(f"{'mode':>8} {'ranks':>5} {'seq':>6} {'step s':>8} {'peak MiB/rank':>14} {'mem vs 1 rank':>14}")
    for r in rows:
        ratio = r["peak_extra_mib_per_rank"] / base["peak_extra_mib_per_rank"] if base else float("nan")
        r["memory_vs_one_rank"] = ratio
        print(
            f"{r['mode']:>8} {r['ranks']:>5} {r['seq_len']:>6} {r['time_s']:>8.2f} "
            f"{r['peak_extra_mib_per_rank']:>14.1f} {ratio:>14.2f}"
        )
    from pretrain.bench.report import machine_info, now_iso, write_report

    params = {"seq_len": args.seq_len, "sp_size": args.sp_size, "steps": args.steps, "model": "tiny"}
    write_report(args.out, "sequence_parallel", now_iso(), machine_info("cpu"), params, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
