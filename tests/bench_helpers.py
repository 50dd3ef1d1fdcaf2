"""Running ``python -m pretrain.bench`` from the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m pretrain.bench ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pretrain.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
