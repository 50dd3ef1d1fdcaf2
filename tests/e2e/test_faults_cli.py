"""The rest of issue 21's faults through the real command line: a run directory inside the corpus cache, starting over
in a used run directory, a torn metrics line, wandb=online without a server, a run directory that cannot be written
and an empty lock, and a precision change on resume. Each refusal is one line before any work, and the run directory
is left byte-identical; each test fails on the code before these checks. All share one 6-step run (checkpoints at 2,
4 and 6) and work on copies of it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from cli import SMALL_RUN, metrics, refusal, run_pretrain

TRAIN = ["stage=train", *SMALL_RUN, "train.max_steps=6", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults_cli")
    run_pretrain([f"run_dir={workdir / 'run'}", *TRAIN], cwd=workdir)
    return workdir, workdir / "run"


def copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_run_dir_inside_the_cache_is_refused_and_a_foreign_folder_is_moved_aside(trained, tmp_path):
    workdir, _ = trained
    inside = run_pretrain(["stage=prepare", *SMALL_RUN, "run_dir=data/runs/x"], cwd=workdir, check=False)
    assert "is inside data.cache_dir='data'" in refusal(inside)
    assert not (workdir / "data" / "runs").exists()
    # A folder in a corpus's place that prepare did not finish (say, a run someone put there) is never deleted.
    (corpus,) = (workdir / "data").glob("stdlib-*")
    cache = tmp_path / "cache"
    foreign = cache / corpus.name
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "latest").write_text("step_00000006")
    again = run_pretrain(
        ["stage=prepare", *SMALL_RUN, f"data.cache_dir={cache}", f"run_dir={tmp_path / 'r'}"], cwd=workdir
    )
    assert "has no manifest (not a complete prepared corpus); moved it aside to" in again.stdout
    (aside,) = cache.glob(f"{corpus.name}.incomplete-*")
    assert (aside / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (foreign / "manifest.json").is_file()


def test_starting_over_in_a_used_run_directory_is_refused_and_changes_nothing(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    before = snapshot(victim)
    proc = run_pretrain([f"run_dir={victim}", *TRAIN, "train.resume=none"], cwd=workdir, check=False)
    line = refusal(proc)
    assert "train.resume=none, but run_dir=" in line and "use another run_dir" in line
    assert snapshot(victim) == before
    assert len(metrics(victim)) == 6


def test_a_torn_metrics_line_does_not_stop_the_resume(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    with (victim / "train" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # killed while writing step 7
    proc = run_pretrain([f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=8", "train.ckpt_every=2"], cwd=workdir)
    assert "dropped 1 unreadable line(s)" in proc.stdout
    assert [row["step"] for row in metrics(victim)] == list(range(1, 9))


def test_wandb_online_without_a_server_is_one_line_within_seconds(trained, tmp_path):
    workdir, _ = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    started = time.monotonic()
    proc = run_pretrain(
        [f"run_dir={tmp_path / 'run'}", *TRAIN, "wandb.mode=online"],
        cwd=workdir,
        check=False,
        env={"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"},
    )
    assert "wandb=online cannot reach 127.0.0.1" in refusal(proc) and "wandb=offline" in proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()  # nothing written: no tokenizer, .hydra/, metrics or wandb id


def test_an_unwritable_run_dir_and_an_empty_lock_are_one_line(trained, tmp_path):
    workdir, run_dir = trained
    (tmp_path / "a-file").write_text("not a directory")
    unwritable = run_pretrain([f"run_dir={tmp_path / 'a-file' / 'run'}", *TRAIN], cwd=workdir, check=False)
    assert "cannot write in run_dir=" in refusal(unwritable)
    victim = copy(run_dir, tmp_path)
    lock = victim / ".pretrain.lock"
    lock.write_text("")
    old = time.time() - 600
    os.utime(lock, (old, old))
    empty = run_pretrain([f"run_dir={victim}", *TRAIN], cwd=workdir, check=False)
    line = refusal(empty)
    assert "names no run (it is empty or damaged" in line and f"delete {lock}" in line and "None" not in line


def test_a_precision_change_on_resume_is_refused_without_suggesting_an_override(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    before = snapshot(victim)
    proc = run_pretrain(
        [f"run_dir={victim}", *TRAIN[:-2], "train.max_steps=8", "train.precision=bf16"], cwd=workdir, check=False
    )
    line = refusal(proc)
    assert "train.precision='bf16'" in line and "cannot change within a run" in line
    assert "resume_override" not in line
    assert snapshot(victim) == before  # .hydra/ records nothing for a refused command
    override = run_pretrain(
        [f"run_dir={victim}", *TRAIN, "train.precision=bf16", "train.resume_override=[train.precision]"],
        cwd=workdir,
        check=False,
    )
    assert "train.resume_override holds 'train.precision'" in refusal(override)
