"""``data.executor=slurm``: prepare's work units as a Slurm array job, submitted through datatrove's
``SlurmPipelineExecutor``.

The prepare stage trains the tokenizer here (the login node), then submits the units not done yet as one array of
``min(data.tasks, units, 1000)`` tasks (task r runs units r, r + tasks, ...: ``UnitStep``) and stops with
``SlurmSubmitted``: ``stage=prepare`` exits 0 with one line saying how to go on, the other stages exit 75 ("try again
later"). The job writes the units' shards and markers into the build folder; the same command run again once it
ended finds every unit done and finishes the corpus (the manifest, the rename into place). The submission is
recorded in ``<build>/slurm.json``, so that a command run again:

- while the job is still queued or running (``squeue``) submits nothing and says how far it is;
- after it ended with units missing submits only those (a new, smaller array);
- after it ended with units that failed on their input (``units/NNNNN.error``) reports the first one (exit 2)
  instead of submitting them again; the command after that submits them again (after the fix);
- after it ended with none of its units done (every task crashed, was cancelled or ran out of time before finishing
  one: nothing a new submission would change) says where the logs are (exit 2), once; the next command submits again.

datatrove's logs (the sbatch script, ``slurm_logs/<job>_<task>.out``, ``logs/task_NNNNN.log``) go to
``<build>/datatrove/``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.data.executors import DATATROVE_DIR, Task, UnitStep, error_file, raise_unit_errors
from pretrain.data.units import UNITS_DIR, UnitJob
from pretrain.errors import PipelineError
from pretrain.run_files import write_atomic

RECORD = "slurm.json"
SLURM_LOGS = "slurm_logs"
# States in which a job (or an array task) has ended: squeue still lists them for a few minutes (MinJobAge).
ENDED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
SQUEUE_TIMEOUT_S = 60
# Array indices 0..999: within Slurm's default MaxArraySize (1001). More tasks would take several arrays, which
# datatrove runs one after the other; a task takes several units anyway.
MAX_ARRAY_TASKS = 1000


class SlurmSubmitted(PipelineError):
    """The prepare stage stopped on purpose: its units run (or wait to run) in a Slurm job, and the same command run
    once the job ended finishes the corpus. Not a failure: ``stage=prepare`` exits 0, the stages after it 75."""

    def __init__(self, message: str, job_ids: list[str]) -> None:
        super().__init__(message)
        self.job_ids = job_ids


class SlurmUnitStep(UnitStep):
    """``UnitStep`` that fails its array task when one of its units failed on its input, so that the job ends FAILED
    and a training job submitted with ``--dependency=afterok:<job>`` does not start on a corpus that cannot be
    finished. The unit's error stays in ``units/NNNNN.error`` for the next prepare to report."""

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        data = super().__call__(data, rank, world_size)
        mine = self.tasks[rank::world_size]
        failed = [task for task in mine if error_file(self.jobs[task.job], task.unit).is_file()]
        if failed:
            raise_unit_errors(self.jobs, failed)
        return data


# ---------------------------------------------------------------- pure parts


def unit_key(label: str, number: int) -> str:
    """A unit's name in the record: ``00007``, or ``books/00007`` for a source of a mixture."""
    return f"{label}/{number:05d}" if label else f"{number:05d}"


def parse_squeue(text: str) -> list[tuple[str, str]]:
    """``squeue -h -o "%i %T"`` output as (job or array task id, state) pairs; blank lines skipped."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            rows.append((fields[0], fields[1].upper()))
    return rows


def still_active(rows: list[tuple[str, str]]) -> bool:
    """Whether any listed job or array task has not ended yet (pending, running, completing, suspended, ...)."""
    return any(state.rstrip("+") not in ENDED_STATES for _, state in rows)


def job_id_from_sbatch(output: str) -> str:
    """The job id in sbatch's answer: ``Submitted batch job 4242`` (``... on cluster X`` on a federation), or
    ``4242`` / ``4242;X`` under ``--parsable``."""
    found = re.search(r"Submitted batch job (\d+)", output) or re.fullmatch(r"\s*(\d+)(?:;\S*)?\s*", output)
    if found is None:  # --parsable prints JOB or JOB;CLUSTER
        raise PipelineError(f"sbatch answered {output.strip()!r}, with no job id in it")
    return found.group(1)


def next_step(last: dict[str, Any] | None, active: bool, missing: set[str], failed: bool) -> str:
    """What to do about the units still ``missing``, given the ``last`` submission (None: never submitted) and
    whether its job is ``active`` and any missing unit has an error file:

    - ``submit``: nothing submitted yet, or the last job ended with some of its units done (the rest are submitted
      again), or its outcome was already reported by an earlier command;
    - ``wait``: the last job is still queued or running;
    - ``report``: the last job ended and units failed on their input: say the first error, do not resubmit;
    - ``stalled``: the last job ended and none of its units is done: say where the logs are, do not resubmit.
    """
    if last is None:
        return "submit"
    if active:
        return "wait"
    if last.get("reported"):
        return "submit"
    if failed:
        return "report"
    if set(last.get("units", ())) <= missing:
        return "stalled"
    return "submit"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def joined(job_ids: list[str]) -> str:
    return ":".join(job_ids)


# ---------------------------------------------------------------- the record


def read_record(build: Path) -> dict[str, Any]:
    try:
        record = json.loads((build / RECORD).read_text())
    except (OSError, ValueError):
        return {"submissions": []}
    if not isinstance(record, dict) or not isinstance(record.get("submissions"), list):
        return {"submissions": []}
    return record


def last_submission(record: dict[str, Any]) -> dict[str, Any] | None:
    return record["submissions"][-1] if record["submissions"] else None


def write_record(build: Path, record: dict[str, Any]) -> None:
    write_atomic(build / RECORD, json.dumps(record, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------- Slurm


def job_states(job_id: str) -> list[tuple[str, str]] | None:
    """The job's rows in ``squeue`` ([] once it left the queue), or None when squeue cannot be asked."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        proc = subprocess.run(
            [squeue, "-h", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # "slurm_load_jobs error: Invalid job id specified": the job ended long enough ago to leave the queue.
        return [] if "invalid job id" in proc.stderr.lower() else None
    return parse_squeue(proc.stdout)


_noted: set[str] = set()  # jobs squeue could not tell about, said once per command


def _active_jobs(job_ids: list[str], say) -> list[tuple[str, str]]:
    """The rows of the jobs still active; a job squeue cannot tell about is taken as ended (with a note)."""
    active = []
    for job_id in job_ids:
        rows = job_states(job_id)
        if rows is None:
            if job_id not in _noted:
                _noted.add(job_id)
                say(f"squeue could not tell whether Slurm job {job_id} still runs; taking it as ended")
            continue
        active.extend(row for row in rows if still_active([row]))
    return active


def _waiting(done: int, total: int, job_ids: list[str], active: list[tuple[str, str]], logs: Path) -> SlurmSubmitted:
    word = "running" if any(state not in ("PENDING", "REQUEUED") for _, state in active) else "queued"
    return SlurmSubmitted(
        f"{done} of {total} units done; Slurm job {', '.join(job_ids)} is still {word} (logs: {logs}); run the same "
        f"command again once it ends to finish the corpus, or submit the training job with "
        f"--dependency=afterok:{joined(job_ids)}",
        job_ids,
    )


def stop_if_running(build: Path, say) -> None:
    """``SlurmSubmitted`` when the job last submitted for this build still runs: for the prepare stage to call before
    it touches the build folder (its sweep of temporary files would delete the ones the job's tasks are writing)."""
    last = last_submission(read_record(build))
    if last is None:
        return
    active = _active_jobs(last["job_ids"], say)
    if active:
        done = sum(1 for marker in build.rglob(f"{UNITS_DIR}/*.json") if marker.stem.isdigit())
        total = max(int(last.get("units_total", 0)), done)
        raise _waiting(done, total, last["job_ids"], active, build / DATATROVE_DIR / SLURM_LOGS)


class _JobIds:
    """datatrove's job-id retriever, keeping every id (more than ``max_array_size`` tasks make several jobs)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, output: str) -> str:
        job_id = job_id_from_sbatch(output)
        self.ids.append(job_id)
        return job_id


def _executor_class():
    from datatrove.executor import SlurmPipelineExecutor

    class UnitsSlurmExecutor(SlurmPipelineExecutor):
        def launch_merge_stats(self) -> None:
            """No stats job after the array: the units' markers are the record of what was done."""

        def get_sbatch_args(self, max_array: int = 1) -> dict:
            # datatrove writes a bare `#SBATCH --partition` for partition=None: leave unset options out.
            return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None}

        def get_distributed_env(self, node_rank: int = -1):
            # One node per task: no `scontrol show hostnames` call in every task.
            return {
                "datatrove_node_ips": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                "datatrove_cpus_per_task": str(self.cpus_per_task),
                "datatrove_mem_per_cpu": str(self.mem_per_cpu_gb),
                "datatrove_gpus_on_node": str(self.gpus_per_task),
                "datatrove_executor": "SLURM",
            }

    return UnitsSlurmExecutor


def env_command(slurm) -> str:
    """Shell lines run before each task: this Python's bin folder first on the PATH (datatrove's task starter,
    ``launch_pickled_pipeline``, is installed there), then ``data.slurm.env_command``."""
    lines = [f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"]
    if slurm.env_command:
        lines.append(slurm.env_command)
    return "\n".join(lines)


def array_tasks(requested: int, units: int) -> int:
    """The array's size: ``data.tasks``, but no more than the units to build nor than one array holds."""
    return min(requested, units, MAX_ARRAY_TASKS)


def _launch(jobs: list[UnitJob], todo: list[Task], build: Path, data) -> tuple[list[str], int]:
    """Submit ``todo`` as an array job; return its job ids and the number of array tasks."""
    from pretrain.data.executors import _quiet_datatrove

    if shutil.which("sbatch") is None:
        raise PipelineError(
            "data.executor=slurm needs Slurm's sbatch on the PATH, and this machine has none; run the command on the "
            "cluster's login node, or use data.executor=local"
        )
    _quiet_datatrove()
    slurm = data.slurm
    tasks = array_tasks(data.tasks, len(todo))
    ids = _JobIds()
    executor = _executor_class()(
        pipeline=[SlurmUnitStep(jobs, todo)],
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        qos=slurm.qos,
        job_name=slurm.job_name,
        env_command=env_command(slurm),
        sbatch_args=dict(slurm.sbatch_args or {}),
        logging_dir=str(build / DATATROVE_DIR),
        skip_completed=False,  # the units' own markers decide what is done
        job_id_retriever=ids,
        max_array_size=MAX_ARRAY_TASKS,
    )
    try:
        executor.launch_job()  # not run(): inside an array task of its own it would run a task instead
    except subprocess.CalledProcessError as err:
        raise PipelineError(
            f"sbatch refused the job (exit status {err.returncode}; its message is above); check data.slurm.* "
            "(partition, time, qos, sbatch_args) and data.tasks (the cluster's MaxArraySize); the script is "
            f"{build / DATATROVE_DIR / 'launch_script.slurm'}"
        ) from err
    if not ids.ids:
        raise PipelineError("datatrove submitted no Slurm job")  # every task complete: cannot happen, skip_completed
    return ids.ids, tasks


def _done_count(jobs: list[UnitJob], todo: list[Task]) -> int:
    """Units done: markers present of units not in ``todo`` (a unit in todo may have a stale marker)."""
    missing = {(task.job, task.unit.number) for task in todo}
    done = 0
    for j, job in enumerate(jobs):
        for marker in (job.out / UNITS_DIR).glob("*.json"):
            if marker.stem.isdigit() and (j, int(marker.stem)) not in missing:
                done += 1
    return done


def submit_units(jobs: list[UnitJob], todo: list[Task], build: Path, data, say) -> None:
    """Submit the units in ``todo`` as a Slurm array (or see that the job submitted before still runs) and raise
    ``SlurmSubmitted``; a PipelineError when the job before ended with failed units or without finishing any."""
    record = read_record(build)
    last = last_submission(record)
    total = _done_count(jobs, todo) + len(todo)
    done = total - len(todo)
    logs = build / DATATROVE_DIR / SLURM_LOGS
    missing = {unit_key(jobs[task.job].label, task.unit.number) for task in todo}
    failed = any(error_file(jobs[task.job], task.unit).is_file() for task in todo)
    active = _active_jobs(last["job_ids"], say) if last is not None else []
    step = next_step(last, bool(active), missing, failed)
    if step == "wait":
        raise _waiting(done, total, last["job_ids"], active, logs)
    if step in ("report", "stalled"):
        last["reported"] = True
        write_record(build, record)
        ids = ", ".join(last["job_ids"])
        if step == "report":
            raise_unit_errors(jobs, todo)
        raise PipelineError(
            f"Slurm job {ids} ended and none of its {plural(len(last['units']), 'unit')} is done (a task crashed, was "
            f"cancelled, ran out of time or memory); see {logs} and {build / DATATROVE_DIR / 'logs'}; after the fix "
            "the same command submits them again"
        )
    if last is not None:
        say(
            f"Slurm job {', '.join(last['job_ids'])} ended with {len(todo)} of {total} units not done; "
            f"submitting {'it' if len(todo) == 1 else f'those {len(todo)}'} again"
        )
    job_ids, tasks = _launch(jobs, todo, build, data)
    record["submissions"].append(
        {
            "job_ids": job_ids,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tasks": tasks,
            "units": sorted(missing),
            "units_total": total,
            "logs": str(logs),
        }
    )
    write_record(build, record)
    raise SlurmSubmitted(
        f"submitted Slurm job {', '.join(job_ids)}: {len(todo)} of {total} units in {plural(tasks, 'array task')} "
        f"(logs: {logs}); once it ends, run the same command again to finish the corpus (it writes the manifest), "
        f"or submit the training job now with --dependency=afterok:{joined(job_ids)}",
        job_ids,
    )
