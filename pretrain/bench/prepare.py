"""Benchmark of the prepare stage: tokens/s of tokenizer training, tokenizing and shard writing on the stdlib corpus.

    python -m pretrain.bench prepare [--vocab-size 8192] [--max-files N] [--num-proc 2] [--repeats 1] [--out PATH.json]

Each repeat runs ``pretrain.prepare.prepare_corpus`` on ``data=stdlib`` (the ``.py`` files of the running
Python's standard library) into a fresh temporary ``cache_dir``, so nothing is reused, then once more on the
same directory to time a cache hit. A row gives the corpus (files, bytes, documents and tokens per split),
the wall time of the whole stage, the seconds of each phase as the stage records them in ``meta.json``
(``load``: reading files, ``split``: hashing documents into train/validation, ``tokenizer``: training the
sentencepiece model, ``tokenize``: tokenizing and writing the shards), and two rates: all tokens over the
whole stage's wall time, and all tokens over the ``tokenize`` phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.bench.options import positive_int

PHASES = ("load", "split", "tokenizer", "tokenize")


@dataclass(frozen=True)
class PrepareBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    vocab_size: int
    max_files: int | None
    num_proc: int
    repeats: int


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


def parse_params(argv: list[str], prog: str) -> tuple[PrepareBenchParams, argparse.Namespace]:
    from pretrain.errors import ConfigError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192, >= 260)")
    parser.add_argument("--max-files", type=positive_int, help="the first N stdlib files (default: all of them)")
    parser.add_argument("--num-proc", type=positive_int, default=2, help="tokenizing processes (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="cold prepares, each in a fresh cache")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    params = PrepareBenchParams(
        vocab_size=args.vocab_size, max_files=args.max_files, num_proc=args.num_proc, repeats=args.repeats
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
    files = "all" if params.max_files is None else f"the first {params.max_files}"
    print(
        f"prepare benchmark on {machine['device_name']}: data=stdlib ({files} files), vocab {params.vocab_size}, "
        f"{params.num_proc} processes, {params.repeats} cold run(s) in fresh cache directories",
        flush=True,
    )
    rows = []
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

    print()
    print(format_table(rows))
    if params.repeats > 1:
        print(
            f"median: {summary['wall_s']:.2f} s, {summary['tokens_per_s']:,.0f} tokens/s over the stage, "
            f"{summary['tokenize_tokens_per_s']:,.0f} tokens/s tokenizing"
        )
    write_report(args.out, "prepare", started, machine, params, rows, summary=summary)
    return 0
