"""Where the prepare stage's work units run: in this process, on local worker processes, or as a Slurm array.

``data.executor=local`` with ``data.workers=1`` (or a single unit to build) runs the units here, one after the
other. More workers run them on datatrove's ``LocalPipelineExecutor`` (a process pool); ``data.executor=slurm`` on
its ``SlurmPipelineExecutor`` (an array job of ``data.tasks`` tasks, each taking every ``data.tasks``-th unit).
The work of a unit is the same everywhere (``UnitJob.run_unit``), so every executor writes the same bytes, and a
unit already done (its marker written) is skipped wherever it would run.

A failing unit does not end the others: its error (one line, naming the file and rows) is written to
``units/NNNNN.error`` beside the markers, the other units finish and keep their shards, and the stage then fails
with the first error; run again after the fix, it builds only what is missing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.data.units import UNITS_DIR, Unit, UnitJob, forks_die_with_parent, set_parent_death_signal
from pretrain.errors import PipelineError
from pretrain.run_files import write_atomic

DATATROVE_DIR = "datatrove"


@dataclass(frozen=True)
class Task:
    job: int  # index into the jobs list
    unit: Unit


def error_file(job: UnitJob, unit: Unit) -> Path:
    return job.out / UNITS_DIR / f"{unit.number:05d}.error"


def run_task(jobs: list[UnitJob], task: Task) -> None:
    """Run one unit, recording a user error beside the markers instead of raising (the other units go on); a bug
    raises with its traceback (the units done so far keep their markers)."""
    job = jobs[task.job]
    error = error_file(job, task.unit)
    error.unlink(missing_ok=True)
    try:
        job.run_unit(task.unit)
    except PipelineError as err:  # bad input: said in one line once every other unit is done
        error.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(error, json.dumps({"message": str(err)}).encode())


class UnitStep:
    """A datatrove pipeline step: task ``rank`` of ``world_size`` runs units rank, rank + world_size, ..."""

    name = "tokenize units"
    type = "pretrain"

    def __init__(self, jobs: list[UnitJob], tasks: list[Task]) -> None:
        self.jobs, self.tasks = jobs, tasks

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        set_parent_death_signal()
        for task in self.tasks[rank::world_size]:
            run_task(self.jobs, task)
        return data


def _quiet_datatrove() -> None:
    """datatrove logs every task at INFO on the console; keep its warnings and errors only."""
    from datatrove.utils.logging import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _local_executor_class():
    from datatrove.executor import LocalPipelineExecutor

    class QuietLocalExecutor(LocalPipelineExecutor):
        # datatrove prints a task's INFO lines on the console when its local_rank is 0; the log file keeps them.
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            try:
                return super()._run_for_rank(rank, local_rank=local_rank + 1, node_rank=node_rank)
            finally:
                _quiet_datatrove()  # it restores its INFO console logger after each task ("k/N tasks completed")

    return QuietLocalExecutor


class _Progress:
    """A progress bar of units done, counted from their markers (workers run elsewhere)."""

    def __init__(self, jobs: list[UnitJob], tasks: list[Task], done_before: int) -> None:
        from tqdm.auto import tqdm

        self.jobs, self.tasks = jobs, tasks
        self.bar = tqdm(total=len(tasks) + done_before, initial=done_before, unit="unit", desc="tokenizing")
        self.done_before = done_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def count(self) -> int:
        return sum(
            self.jobs[t.job].marker(t.unit).is_file() or error_file(self.jobs[t.job], t.unit).is_file()
            for t in self.tasks
        )

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.n = self.done_before + self.count()
            self.bar.refresh()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.n = self.done_before + self.count()
        self.bar.close()


def run_units(jobs: list[UnitJob], units: list[list[Unit]], build: Path, data, say, submit=None) -> None:
    """Build every unit not done yet, on ``data.executor``; a PipelineError with the first unit's error if any failed.

    For ``data.executor=slurm``, ``submit(jobs, todo, build, data, say)`` (``pretrain.data.slurm.submit_units``, which
    the prepare stage passes in) submits the array and raises ``SlurmSubmitted``: the stage ends there."""
    tasks = [Task(j, unit) for j, job_units in enumerate(units) for unit in job_units]
    todo = [task for task in tasks if jobs[task.job].done(task.unit) is None]
    done = len(tasks) - len(todo)
    if not todo:
        return
    if done:
        say(f"{done} of {len(tasks)} units already done; building the other {len(todo)}")
    if data.executor == "slurm":
        assert submit is not None, "data.executor=slurm needs the submit function (pretrain.data.slurm.submit_units)"
        submit(jobs, todo, build, data, say)  # raises SlurmSubmitted
    workers = min(data.workers or available_cpus(), len(todo))
    started = time.perf_counter()
    if workers <= 1:
        from tqdm.auto import tqdm

        for task in tqdm(todo, unit="unit", desc="tokenizing", disable=len(todo) <= 1):
            run_task(jobs, task)
    else:
        say(f"tokenizing {len(todo)} units on {workers} worker processes (datatrove)")
        _quiet_datatrove()
        executor = _local_executor_class()(
            pipeline=[UnitStep(jobs, todo)],
            tasks=len(todo),
            workers=workers,
            logging_dir=str(build / DATATROVE_DIR),
            skip_completed=False,  # the units' own markers decide what is done
            start_method="forkserver",
        )
        with _Progress(jobs, todo, done), forks_die_with_parent():
            executor.run()
    raise_unit_errors(jobs, tasks)
    if len(todo) > 1:
        say(f"built {len(todo)} units in {time.perf_counter() - started:.1f} s")


def raise_unit_errors(jobs: list[UnitJob], tasks: list[Task]) -> None:
    failed = []
    for task in tasks:
        path = error_file(jobs[task.job], task.unit)
        if path.is_file():
            try:
                failed.append(json.loads(path.read_text())["message"])
            except (OSError, ValueError, KeyError):
                failed.append(f"unit {task.unit.number} failed (unreadable {path})")
    if failed:
        more = f" ({len(failed) - 1} more units failed; see units/*.error)" if len(failed) > 1 else ""
        raise PipelineError(
            f"{failed[0]}{more}; the other units' shards are kept, and the same command builds only what is missing"
        )


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
