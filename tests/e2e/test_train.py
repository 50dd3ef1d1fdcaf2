"""The train stage through the real command line: DeepSpeed engine, checkpoints, exact resume, wandb."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
from cli import SMALL_RUN, losses, metrics, run_pretrain, start_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the small corpus prepared once (later runs hit the cache)."""
    path = tmp_path_factory.mktemp("train")
    run_pretrain(["stage=prepare", f"run_dir={path / 'prep'}", *SMALL_RUN], cwd=path)
    return path


def train(workdir, name, *extra, ranks=1, check=True):
    run_dir = workdir / name
    proc = run_pretrain(
        ["stage=train", f"run_dir={run_dir}", *SMALL_RUN, *extra], cwd=workdir, ranks=ranks, check=check
    )
    return run_dir, proc


def test_one_process_lowers_the_loss_and_logs_to_wandb(workdir):
    run_dir, _ = train(
        workdir, "falls", "train.max_steps=40", "train.lr=3e-3", "wandb.mode=offline", "train.eval_every=20"
    )
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert abs(rows[0]["loss"] - math.log(512)) < 0.2
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert rows[-1]["tokens"] == 40 * 4 * 32
    assert (run_dir / "checkpoints" / "model.safetensors").exists()
    assert (run_dir / "tokenizer" / "spm.model").exists()
    # wandb offline: one run directory holding the resolved config and the logged metrics.
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline, the config and the history are records of the run's .wandb log.
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b'"pos_encoding":"alibi"' in log and b'"vocab_size":512' in log and b'"max_steps":40' in log
    assert b"train/loss" in log and b"train/grad_norm" in log and b"val/loss" in log


def test_resumed_run_is_the_uninterrupted_run_and_old_checkpoints_are_pruned(workdir):
    common = ["train.max_steps=20", "train.ckpt_every=5", "train.keep_last=2"]
    straight, _ = train(workdir, "straight", *common)
    stopped, proc = train(workdir, "stopped", *common, "train.stop_at_step=10")
    assert "stopped after step 10" in proc.stdout + proc.stderr
    assert sorted(losses(stopped)) == list(range(1, 11))
    train(workdir, "stopped", *common)  # the same command again: resume=auto
    want, got = losses(straight), losses(stopped)
    assert sorted(got) == list(range(1, 21))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    _, again = train(workdir, "stopped", *common)  # once more: nothing left to train
    out = again.stdout + again.stderr
    assert "already trained: the checkpoint is at step 20 of train.max_steps=20" in out and "nan" not in out
    assert len(losses(stopped)) == 20
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert kept == ["step_00000015", "step_00000020"]
    assert (straight / "checkpoints" / "latest").read_text() == "step_00000020"

    # train.log_every=3 reads the device once per logged step: rows every 3 steps and at each checkpoint, with the
    # losses of the run that logged every step, and a resume from the step-10 checkpoint as exact.
    sparse, _ = train(workdir, "sparse", *common, "train.log_every=3", "train.stop_at_step=10")
    train(workdir, "sparse", *common, "train.log_every=3")
    got = losses(sparse)
    assert sorted(got) == [3, 5, 6, 9, 10, 12, 15, 18, 20]
    for step, loss in got.items():
        assert loss == want[step], (step, loss, want[step])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.no_such_key=1"], "error: unknown config key 'train.no_such_key'"),
        (["train.lr=-0.1"], "error: train.lr=-0.1 is not allowed; it must be > 0"),
        (["train.micro_batch_size=0"], "error: train.micro_batch_size=0 is not allowed; it must be > 0"),
        (["train.zero_stage=4"], "error: train.zero_stage=4 is not allowed; choose one of: 0, 1, 2, 3"),
        (["train.resume=/no/such/dir"], "error: train.resume='/no/such/dir': no such checkpoint directory"),
        (["train.time_limit=soon"], "error: train.time_limit='soon' is not allowed; write HH:MM"),
    ],
)
def test_bad_input_fails_with_one_clear_message(workdir, args, message):
    _, proc = train(workdir, "bad", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_latest_naming_a_missing_checkpoint_is_refused(workdir):
    checkpoints = workdir / "dangling" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step_00000099")
    _, proc = train(workdir, "dangling", check=False)
    assert proc.returncode == 2
    assert "names checkpoint 'step_00000099', which is missing or incomplete" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank_with_twice_the_accumulation(workdir, zero_stage):
    common = ["train.max_steps=8", f"train.zero_stage={zero_stage}"]
    one, _ = train(workdir, f"one-z{zero_stage}", *common, "train.grad_accum=2")
    shared_memory = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    two, _ = train(workdir, f"two-z{zero_stage}", *common, "train.grad_accum=1", ranks=2)
    # DeepSpeed's CPU all-reduce workspace (66 MiB a rank in /dev/shm) is removed when the ranks exit.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_memory
    want, got = losses(one), losses(two)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])
    assert (two / "checkpoints" / "model.safetensors").exists()


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resume_two_ranks_on_one(workdir, zero_stage):
    """2 ranks stop at step 5; one rank with twice the accumulation continues the same token stream.

    ZeRO-2 shards the optimizer state by rank: the resume goes through a universal checkpoint."""
    common = ["train.max_steps=10", "train.ckpt_every=5", f"train.zero_stage={zero_stage}"]
    want = losses(train(workdir, f"ref-1rank-z{zero_stage}", *common, "train.grad_accum=2")[0])
    train(workdir, f"moved-z{zero_stage}", *common, "train.stop_at_step=5", ranks=2)
    run_dir, _ = train(workdir, f"moved-z{zero_stage}", *common, "train.grad_accum=2")
    assert (run_dir / "checkpoints" / "step_00000005_universal").exists() == (zero_stage > 0)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])


def test_sigterm_stops_cleanly_with_a_checkpoint(workdir):
    """A scheduler's SIGTERM (preemption) ends the run after the current step, with a checkpoint to resume."""
    run_dir = workdir / "preempted"
    proc = start_cli(["pretrain", "stage=train", f"run_dir={run_dir}", *SMALL_RUN, "train.max_steps=100000"], workdir)
    metrics_file = run_dir / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]  # stopped early with a checkpoint: a scheduler requeues on it
    last = metrics(run_dir)[-1]["step"]
    assert f"stopped after step {last} (SIGTERM)" in output
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last:08d}"


@pytest.mark.slow
def test_compiled_model_trains_to_the_same_losses(workdir):
    plain, _ = train(workdir, "eager", "train.max_steps=3")
    compiled, _ = train(workdir, "compiled", "train.max_steps=3", "train.compile=true")
    for step, loss in losses(plain).items():
        assert abs(losses(compiled)[step] - loss) < 1e-4
