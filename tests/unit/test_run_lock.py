"""One program at a time in a run directory: the lock, its stale-holder rule and its release."""

from __future__ import annotations

import json
import os
import socket

import pytest

from pretrain.errors import PipelineError
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import RunFiles
from pretrain.run_lock import RunLock

NO_SUCH_PID = 2**22 + 4321  # above Linux's largest pid_max


def write_lock(run_dir, host, pid):
    path = RunFiles(run_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "then", "command": "pretrain run_dir=x"}))
    return path


def test_the_lock_is_taken_named_and_released(tmp_path):
    lock = RunLock(tmp_path / "run", DistContext())
    lock.acquire()
    record = json.loads(RunFiles(tmp_path / "run").lock.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert not RunFiles(tmp_path / "run").lock.exists()
    lock.release()  # idempotent


def test_a_live_holder_refuses_a_second_run_in_one_line(tmp_path):
    path = write_lock(tmp_path / "run", socket.gethostname(), os.getppid())
    with pytest.raises(PipelineError, match=rf"is in use by another run \(pid {os.getppid()} on .*delete {path}"):
        RunLock(tmp_path / "run", DistContext()).acquire()
    assert path.exists(), "another run's lock is never removed"


def test_a_holder_on_another_host_is_refused(tmp_path):
    write_lock(tmp_path / "run", "some-other-node", NO_SUCH_PID)
    with pytest.raises(PipelineError, match="on some-other-node"):
        RunLock(tmp_path / "run", DistContext()).acquire()


def test_a_dead_holder_on_this_host_is_stale_and_taken_over(tmp_path, capsys):
    write_lock(tmp_path / "run", socket.gethostname(), NO_SUCH_PID)
    lock = RunLock(tmp_path / "run", DistContext())
    lock.acquire()
    assert f"removing the stale lock of pid {NO_SUCH_PID}" in capsys.readouterr().out
    assert json.loads(RunFiles(tmp_path / "run").lock.read_text())["pid"] == os.getpid()
    lock.release()


def test_an_empty_lock_names_no_run_and_says_what_to_delete(tmp_path):
    path = RunFiles(tmp_path / "run").lock
    path.parent.mkdir(parents=True)
    path.write_text("")  # a run killed between creating the lock and writing it
    os.utime(path, (0, 0))
    with pytest.raises(PipelineError, match=rf"names no run \(it is empty or damaged.*delete {path}") as err:
        RunLock(tmp_path / "run", DistContext()).acquire()
    assert "None" not in str(err.value)
    assert path.exists()


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(PipelineError, match=r"cannot write in run_dir=.*a-file/run.*choose a run_dir"):
        RunLock(tmp_path / "a-file" / "run", DistContext()).acquire()
