"""The one way the end-to-end tests start the program: ``python -m MODULE ARGS`` in a subprocess, alone or as
ranks under a launcher, always with the same environment. Also the small run they share and readers of its output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

# A small stdlib corpus and a small model: each run takes seconds on two CPU cores.
SMALL_RUN = [
    "data.max_files=30",
    "data.val_fraction=0.2",
    "data.vocab_size=512",
    "data.num_proc=1",
    "data.tokenizer_sample_chars=300000",
    # Several work units, so every training test reads a corpus of several shards (one worker: no process pool).
    "data.unit_bytes=100000",
    "data.workers=1",
    "model.seq_len=32",
    "model.d_model=64",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.eval_every=1000",
    "train.eval_batches=2",
    "wandb.mode=disabled",
    # Scoring longer windows at each validation has its own test (test_train_watch.py); elsewhere it only costs time.
    "train.eval_lengths=[]",
]


def free_port() -> int:
    """A TCP port free on this machine now, so that parallel test runs do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(extra: dict | None = None, unset: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a child: without ``WANDB_*`` nor the names in ``unset`` (an entry ending in
    ``_`` unsets every name it starts), this checkout first on the path, unbuffered output, Hugging Face offline;
    then ``extra`` (values as strings)."""
    prefixes = ("WANDB_", *(name for name in unset if name.endswith("_")))
    names = {name for name in unset if not name.endswith("_")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update(PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def cli_command(module_args: list[str], ranks: int = 1) -> list[str]:
    """``python -m MODULE ARGS`` for ``module_args = [MODULE, *ARGS]``; with ``ranks`` > 1,
    ``deepspeed --num_gpus RANKS --master_port PORT --module MODULE ARGS`` (CPU ranks on this machine)."""
    module, *args = module_args
    if ranks == 1:
        return [sys.executable, "-m", module, *args]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args]


def run_cli(
    module_args: list[str],
    cwd: Path = REPO,
    ranks: int = 1,
    timeout: int = 600,
    check: bool = False,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cli_command(module_args, ranks)`` in ``cwd`` with ``cli_env(env)``, output captured as text.
    With ``check``, a non-zero exit is an AssertionError that shows the end of the output."""
    command = cli_command(module_args, ranks)
    proc = subprocess.run(command, cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def start_cli(module_args: list[str], cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    """``python -m MODULE ARGS`` started and left running (to be signalled), stderr merged into stdout."""
    command = cli_command(module_args)
    return subprocess.Popen(
        command, cwd=cwd, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_python(code: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -c CODE`` with the same environment, output captured."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def run_torchrun(script: Path, args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """``torchrun --standalone --nproc_per_node NPROC SCRIPT ARGS`` (CPU ranks), output captured."""
    command = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), str(script), *args]
    return subprocess.run(command, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def run_pretrain(
    args: list[str], cwd: Path, ranks: int = 1, timeout: int = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGS`` (or its ``ranks`` under the DeepSpeed launcher); a failure raises by default."""
    return run_cli(["pretrain", *args], cwd=cwd, ranks=ranks, timeout=timeout, check=check, env=env)


def run_bench(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m pretrain.bench ARGS`` from the repository root; the caller checks the exit status."""
    return run_cli(["pretrain.bench", *args], timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command ends with (exit 2, ``error: ...``), with no traceback before it."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line
