"""Running the real program (one process, or ranks under the DeepSpeed launcher) on a small corpus."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A small stdlib corpus and a small model: each run takes seconds on two CPU cores.
SMALL_RUN = [
    "data.max_files=30",
    "data.val_fraction=0.2",
    "data.vocab_size=512",
    "data.num_proc=1",
    "data.tokenizer_sample_chars=300000",
    "model.seq_len=32",
    "model.d_model=64",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.eval_every=1000",
    "train.eval_batches=2",
    "wandb.mode=disabled",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pretrain(
    args: list[str], cwd: Path, ranks: int = 1, timeout: int = 600, check: bool = True, env: dict | None = None
):
    """``python -m pretrain ARGS``, or ``deepspeed --num_gpus RANKS --module pretrain ARGS``; ``env`` is added."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, **(env or {})}
    env.update(PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    if ranks == 1:
        command = [sys.executable, "-m", "pretrain", *args]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pretrain"]
        command += args
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}
