"""Faults a user running long jobs meets, injected into real runs of the command line.

Two runs in one run directory would corrupt each other: the second is refused in one line while the first holds
the directory's lock.

A checkpoint someone sends you must not run code: DeepSpeed unpickles its files with full pickle, so every
``.pt`` file of a checkpoint is read as pickle opcodes first and refused when it refers to anything a checkpoint
of this pipeline never holds; the project's own files load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from cli import SMALL_RUN, run_pretrain, start_cli

TRAIN = ["stage=train", "model=tiny", *SMALL_RUN, "train.max_steps=4", "train.ckpt_every=2"]


class RunsCode:
    """Unpickling this calls ``os.system``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    run_dir = workdir / "run"
    run_pretrain([f"run_dir={run_dir}", *TRAIN], cwd=workdir)
    return workdir, run_dir


def plant(step_dir, marker):
    """Replace a checkpoint's model file by a pickle that runs a command when loaded."""
    path = step_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode(marker)}, path)
    return path


@pytest.mark.parametrize("how", ["eval.checkpoint", "train.resume"])
def test_a_crafted_checkpoint_is_refused_and_never_run(trained, tmp_path, how):
    workdir, run_dir = trained
    victim = tmp_path / "run"
    shutil.copytree(run_dir, victim)
    marker = tmp_path / "code-ran"
    planted = plant(victim / "checkpoints" / "step_00000004", marker)
    if how == "eval.checkpoint":
        args = ["stage=eval", f"run_dir={tmp_path / 'eval'}", f"eval.checkpoint={planted.parent}", *SMALL_RUN]
    else:
        args = [f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6", "train.ckpt_every=2"]
    proc = run_pretrain(args, cwd=workdir, check=False)
    assert not marker.exists(), "the crafted pickle ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(planted) in last and "posix.system" in last, last


def test_a_second_run_in_the_same_run_directory_is_refused_in_one_line(trained, tmp_path):
    workdir, _ = trained
    run_dir = tmp_path / "busy"
    lock = run_dir / ".pretrain.lock"
    first = start_cli(["pretrain", f"run_dir={run_dir}", *TRAIN[:-2], "train.max_steps=300"], cwd=workdir)
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lock.exists(), first.stdout.read() if first.poll() is not None else "no lock after 120 s"
    second = run_pretrain([f"run_dir={run_dir}", *TRAIN, "train.seed=7"], cwd=workdir, check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is in use by another run (pid ")
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert not lock.exists(), "the lock is released when the run ends"
