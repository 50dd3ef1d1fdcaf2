"""Faults a user running long jobs meets, injected into real runs of the command line.

Two runs in one run directory would corrupt each other: the second is refused in one line while the first holds
the directory's lock.

A checkpoint someone sends you must not run code: DeepSpeed unpickles its files with full pickle, so every
``.pt`` file of a checkpoint is read as pickle opcodes first and refused when it refers to anything a checkpoint
of this pipeline never holds; the project's own files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import REPO, SMALL_RUN, cli_env, losses, metrics, run_cli, run_pretrain, start_cli

from pretrain.run_files import file_sha256
from pretrain.train.weights import load_checkpoint_weights

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
    """Replace a checkpoint's model file by a pickle that runs a command when loaded, and its checksum in
    complete.json too (whoever sends a checkpoint writes that file as well)."""
    path = step_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode(marker)}, path)
    record = json.loads((step_dir / "complete.json").read_text())
    record["checksums"][path.name] = file_sha256(path)
    (step_dir / "complete.json").write_text(json.dumps(record))
    return path


def snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


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


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(trained, tmp_path):
    workdir, _ = trained
    run_dir = tmp_path / "diverged"
    args = [f"run_dir={run_dir}", *TRAIN[:-2], "train.lr=1e6", "train.max_steps=40", "train.ckpt_every=2"]
    proc = run_pretrain([*args, "train.max_bad_steps=3"], cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc).startswith("error: training diverged: the loss or gradients were not finite in 3 steps")
    rows = metrics(run_dir)
    assert [row["step"] for row in rows if row.get("skipped")] == [row["step"] for row in rows][-3:]
    assert all(not math.isfinite(row["loss"]) for row in rows[-3:])
    latest = (run_dir / "checkpoints" / "latest").read_text()
    _, state = load_checkpoint_weights(run_dir / "checkpoints" / latest)  # refuses non-finite weights itself
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    assert not (run_dir / "checkpoints" / "model.safetensors").exists()


def test_a_corrupt_checkpoint_is_skipped_on_resume_and_named_when_asked_for(trained, tmp_path):
    workdir, run_dir = trained
    victim = tmp_path / "run"
    shutil.copytree(run_dir, victim)
    newest = victim / "checkpoints" / "step_00000004"
    flip_bytes(newest / "mp_rank_00_model_states.pt")
    explicit = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], f"train.resume={newest}", "train.max_steps=6"],
                            cwd=workdir, check=False)  # fmt: skip
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    assert str(newest / "mp_rank_00_model_states.pt") in last_line(explicit) and "checksum" in last_line(explicit)
    (newest / "rng_rank0.pt").write_bytes((newest / "rng_rank0.pt").read_bytes()[:50])  # truncated too
    proc = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6", "train.ckpt_every=2"], cwd=workdir)
    assert "skipping checkpoint step_00000004" in proc.stdout and "resumed from" in proc.stdout
    assert f"{victim / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert (victim / "checkpoints" / "step_00000004.corrupt").is_dir()  # kept for inspection
    assert [row["step"] for row in metrics(victim)] == list(range(1, 7))
    eval_proc = run_pretrain(["stage=eval", f"run_dir={tmp_path / 'e'}", *SMALL_RUN,
                              f"eval.checkpoint={victim / 'checkpoints' / 'step_00000004.corrupt'}"],
                             cwd=workdir, check=False)  # fmt: skip
    assert eval_proc.returncode == 2 and last_line(eval_proc).startswith("error: "), eval_proc.stderr[-3000:]


def test_a_full_disk_is_reported_and_the_partial_checkpoint_removed(trained, tmp_path):
    workdir, run_dir = trained
    victim = tmp_path / "run"
    shutil.copytree(run_dir, victim)
    command = " ".join([sys.executable, "-m", "pretrain", f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6",
                        "train.ckpt_every=2"])  # fmt: skip
    # 1000 blocks of 1 KiB: smaller than the checkpoint's model file, larger than anything else this run writes.
    proc = subprocess.run(["bash", "-c", f"ulimit -f 1000; exec {command}"], cwd=workdir, env=cli_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith(f"error: could not save checkpoint {victim / 'checkpoints' / 'step_00000006'}"), line
    assert "size limit" in line and "step_00000004 is still the latest checkpoint" in line
    assert not (victim / "checkpoints" / "step_00000006").exists()
    assert (victim / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6", "train.ckpt_every=2"], cwd=workdir)
    assert "at step 4" in resumed.stdout


def test_resume_rules_and_a_refused_command_leaves_the_run_unchanged(trained, tmp_path):
    workdir, run_dir = trained
    victim = tmp_path / "run"
    shutil.copytree(run_dir, victim)
    before = snapshot(victim)
    refusals = {
        "model.d_model=128": "holds a model with d_model=64",
        "train.lr=0.01": "train.resume_override=[train.lr]",
        "data.max_files=25": "another train split",  # another corpus: its tokenizer must not replace the run's
    }
    for override, expected in refusals.items():
        proc = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6", override], cwd=workdir, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert last_line(proc).startswith("error: ") and expected in last_line(proc), last_line(proc)
        assert snapshot(victim) == before, f"{override}: the refused command changed the run directory"
    proc = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=6", "train.lr=0.01",
                         "train.resume_override=[train.lr]"], cwd=workdir)  # fmt: skip
    assert "changed on resume: train.lr: 0.003 -> 0.01 (train.resume_override)" in proc.stdout
    rows = metrics(victim)
    assert rows[-1]["step"] == 6 and abs(rows[-2]["lr"] / 0.01 - rows[1]["lr"] / 0.003) > 0  # the new rate applies
    history = [json.loads(line) for line in (victim / ".hydra" / "history.jsonl").read_text().splitlines()]
    assert [entry["config"]["train"]["lr"] for entry in history] == [0.003, 0.01]  # the training's record survives


def test_stage_all_stops_after_a_preempted_training_with_a_requeue_status(trained, tmp_path):
    workdir, _ = trained
    run_dir = tmp_path / "all"
    proc = start_cli(["pretrain", "stage=all", f"run_dir={run_dir}", *TRAIN[1:-2], "train.max_steps=100000"], workdir)
    metrics_file = run_dir / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: treated as SIGTERM, a checkpoint first
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    last = metrics(run_dir)[-1]["step"]
    assert f"stopped after step {last} (SIGINT)" in output
    assert "the later stages did not run" in output and "Traceback" not in output
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert not (run_dir / "eval").exists()


def test_init_from_starts_at_the_trained_loss_and_refuses_another_shape(trained, tmp_path):
    workdir, run_dir = trained
    first_loss = metrics(run_dir)[0]["loss"]
    trained_loss = metrics(run_dir)[-1]["loss"]
    new = tmp_path / "longer"
    proc = run_pretrain([f"run_dir={new}", *TRAIN[:-2], "train.max_steps=1", "model.seq_len=64",
                         f"train.init_from={run_dir}"], cwd=workdir)  # fmt: skip
    assert f"initialised from {run_dir}" in proc.stdout
    start = metrics(new)[0]["loss"]
    assert abs(start - trained_loss) < abs(start - first_loss), (start, trained_loss, first_loss)
    bad = run_pretrain([f"run_dir={tmp_path / 'wide'}", *TRAIN[:-2], "model.d_model=128", f"train.init_from={run_dir}"],
                       cwd=workdir, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert "d_model=64" in last_line(bad) and "d_model=128" in last_line(bad), last_line(bad)


@pytest.mark.multirank
@pytest.mark.slow
def test_one_rank_killed_during_a_zero2_save_resumes_exactly(trained, tmp_path):
    """kill -9 of rank 1 while it writes its ZeRO-2 optimizer partition of step 4: the half-written checkpoint never
    becomes latest, and the same command resumes from step 2 to the losses of an uninterrupted run."""
    workdir, _ = trained
    common = [*TRAIN[:-2], "train.max_steps=6", "train.ckpt_every=2", "train.zero_stage=2"]
    reference = tmp_path / "reference"
    run_pretrain([f"run_dir={reference}", *common], cwd=workdir, ranks=2)
    run_dir = tmp_path / "killed"
    workers = Path(__file__).resolve().parent / "workers"
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{workers}", "DIE_AT_STEP": "4", "DIE_ON_RANK": "1"}
    killed = run_cli(["dies_while_saving", f"run_dir={run_dir}", *common], cwd=workdir, ranks=2, env=env)
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run_dir / "checkpoints" / "step_00000004" / "complete.json").exists()
    resumed = run_pretrain([f"run_dir={run_dir}", *common], cwd=workdir, ranks=2)
    assert "at step 2" in resumed.stdout
    want, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
