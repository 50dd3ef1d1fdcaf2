"""Entry point of ``python -m pretrain.bench NAME [options]``: picks the benchmark, which parses its own options."""

from __future__ import annotations

import argparse
import importlib
import sys

from pretrain.bench import BENCHMARKS
from pretrain.extras import MissingExtraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.bench",
        description="Benchmarks of the pretraining pipeline.",
        epilog="benchmarks:\n" + "\n".join(f"  {name:<12} {text}" for name, (_, text) in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark (NAME --help lists them)")
    ns = parser.parse_args(argv)
    module = importlib.import_module(BENCHMARKS[ns.name][0])
    try:
        return module.main(ns.args, prog=f"{parser.prog} {ns.name}")
    except MissingExtraError as err:  # one line naming the extra, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
