"""``data.executor=slurm`` without Slurm: reading squeue and sbatch, the decision to wait, submit again or report, the
record of submissions, the sbatch script's options and an array task that fails on a unit's bad input. ``squeue``
and the submission itself are replaced here (no process starts); tests/e2e/test_prepare_slurm.py runs them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pretrain.config import DataConfig, SlurmConfig
from pretrain.data import executors, slurm
from pretrain.data.executors import Task, error_file
from pretrain.data.slurm import (
    SlurmSubmitted,
    SlurmUnitStep,
    array_tasks,
    job_id_from_sbatch,
    next_step,
    parse_squeue,
    still_active,
    stop_if_running,
    submit_units,
    unit_key,
)
from pretrain.data.units import Unit, UnitJob
from pretrain.errors import PipelineError


def test_squeue_rows_and_whether_a_job_still_runs():
    text = "4242_[2-5] PENDING\n\n4242_0 RUNNING\n4242_1 COMPLETED\n"
    rows = parse_squeue(text)
    assert rows == [("4242_[2-5]", "PENDING"), ("4242_0", "RUNNING"), ("4242_1", "COMPLETED")]
    assert still_active(rows)
    assert still_active([("7", "COMPLETING")]) and still_active([("7", "SUSPENDED")])
    ended = [
        ("7_0", "COMPLETED"),
        ("7_1", "CANCELLED"),
        ("7_2", "FAILED"),
        ("7_3", "TIMEOUT"),
        ("7_4", "OUT_OF_MEMORY"),
    ]
    assert not still_active(ended) and not still_active([])


def test_job_id_from_sbatch():
    assert job_id_from_sbatch("Submitted batch job 4242\n") == "4242"
    assert job_id_from_sbatch("Submitted batch job 77 on cluster c2\n") == "77"  # a federation names the cluster last
    assert job_id_from_sbatch("123;c2\n") == "123"  # --parsable
    with pytest.raises(PipelineError, match="no job id"):
        job_id_from_sbatch("sbatch: error: Batch job submission failed")


@pytest.mark.parametrize(
    "last, active, missing, failed, step",
    [
        (None, False, {"00000"}, False, "submit"),  # never submitted
        (None, False, {"00000"}, True, "submit"),  # errors of a local run: retried, as a local run would
        (
            {"units": ["00000", "00001"]},
            True,
            {"00000", "00001"},
            True,
            "wait",
        ),  # still running: errors told at the end
        ({"units": ["00000", "00001"]}, False, {"00001"}, False, "submit"),  # ended with some done: the rest again
        ({"units": ["00000", "00001"]}, False, {"00001"}, True, "report"),  # ended with a unit failed on its input
        ({"units": ["00000", "00001"]}, False, {"00000", "00001"}, False, "stalled"),  # ended with none done
        ({"units": ["00000"], "reported": True}, False, {"00000"}, True, "submit"),  # told once: submitted again
        ({"units": ["00000"], "reported": True}, False, {"00000"}, False, "submit"),
    ],
)
def test_next_step(last, active, missing, failed, step):
    assert next_step(last, active, missing, failed) == step


def test_unit_key_and_array_size():
    assert unit_key("", 7) == "00007" and unit_key("books", 7) == "books/00007"
    assert array_tasks(64, 10) == 10 and array_tasks(64, 8000) == 64 and array_tasks(4096, 8000) == 1000


# ---------------------------------------------------------------- submit_units with a fake squeue and sbatch


def unit_job(build: Path, label: str = "") -> UnitJob:
    out = build / "sources" / label if label else build
    return UnitJob(label, None, None, build, out, build / "spm.model", 400, 0.1, False)


def tasks_of(units: range) -> list[Task]:
    return [Task(0, Unit(n, n, n + 1)) for n in units]


def mark_done(job: UnitJob, numbers) -> None:
    for n in numbers:
        job.marker(Unit(n, n, n + 1)).parent.mkdir(parents=True, exist_ok=True)
        job.marker(Unit(n, n, n + 1)).write_text("{}")


class FakeSlurm:
    """Stands in for squeue (``states``: job id -> squeue rows, None: squeue unavailable; a job not listed has left
    the queue) and for the submission (job ids 4242, 4243, ...)."""

    def __init__(self, monkeypatch) -> None:
        self.states: dict[str, list[tuple[str, str]] | None] = {}
        self.submitted: list[list[Task]] = []
        self.said: list[str] = []
        monkeypatch.setattr(slurm, "job_states", lambda job_id: self.states.get(job_id, []))
        monkeypatch.setattr(slurm, "_launch", self.launch)
        monkeypatch.setattr(slurm, "_noted", set())

    def launch(self, jobs, todo, build, data):
        self.submitted.append(list(todo))
        return [str(4241 + len(self.submitted))], min(data.tasks, len(todo))

    def say(self, message: str) -> None:
        self.said.append(message)


def submit(jobs, todo, build, fake) -> BaseException:
    with pytest.raises(PipelineError) as caught:
        submit_units(jobs, todo, build, DataConfig(executor="slurm", tasks=2), fake.say)
    return caught.value


def test_submits_then_waits_then_submits_only_the_units_missing(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    job = unit_job(tmp_path)
    stop = submit([job], tasks_of(range(5)), tmp_path, fake)
    assert isinstance(stop, SlurmSubmitted) and stop.job_ids == ["4242"]
    assert str(stop).startswith("submitted Slurm job 4242: 5 of 5 units in 2 array tasks (logs: ")
    assert "--dependency=afterok:4242" in str(stop) and "\n" not in str(stop)
    (record,) = json.loads((tmp_path / "slurm.json").read_text())["submissions"]
    assert record["job_ids"] == ["4242"] and record["tasks"] == 2 and record["units_total"] == 5
    assert record["units"] == ["00000", "00001", "00002", "00003", "00004"] and "submitted" in record

    fake.states["4242"] = [("4242_0", "RUNNING"), ("4242_1", "PENDING")]
    mark_done(job, [0, 2])
    stop = submit([job], tasks_of([1, 3, 4]), tmp_path, fake)
    assert isinstance(stop, SlurmSubmitted) and len(fake.submitted) == 1
    assert str(stop).startswith("2 of 5 units done; Slurm job 4242 is still running (logs: ")
    with pytest.raises(SlurmSubmitted, match="Slurm job 4242 is still running"):
        stop_if_running(tmp_path, fake.say)  # the same answer, before the build folder is touched

    fake.states["4242"] = [("4242_0", "PENDING")]
    assert "Slurm job 4242 is still queued" in str(submit([job], tasks_of([1, 3, 4]), tmp_path, fake))

    fake.states["4242"] = [("4242_0", "COMPLETED"), ("4242_1", "CANCELLED")]  # ended, still listed for a while
    stop_if_running(tmp_path, fake.say)  # nothing to wait for
    stop = submit([job], tasks_of([1, 3, 4]), tmp_path, fake)
    assert isinstance(stop, SlurmSubmitted) and stop.job_ids == ["4243"]
    assert [t.unit.number for t in fake.submitted[-1]] == [1, 3, 4]
    assert fake.said == ["Slurm job 4242 ended with 3 of 5 units not done; submitting those 3 again"]
    assert str(stop).startswith("submitted Slurm job 4243: 3 of 5 units in 2 array tasks")
    records = json.loads((tmp_path / "slurm.json").read_text())["submissions"]
    assert [r["job_ids"] for r in records] == [["4242"], ["4243"]] and records[1]["units"] == [
        "00001",
        "00003",
        "00004",
    ]


def test_unit_errors_are_reported_once_not_resubmitted_forever(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    job = unit_job(tmp_path)
    submit([job], tasks_of(range(3)), tmp_path, fake)
    mark_done(job, [0])
    for n, message in ((1, "could not read rows 1..1 of data.paths (a.jsonl): bad line"), (2, "another")):
        error_file(job, Unit(n, n, n + 1)).write_text(json.dumps({"message": message}))
    err = submit([job], tasks_of([1, 2]), tmp_path, fake)
    assert not isinstance(err, SlurmSubmitted) and len(fake.submitted) == 1
    assert str(err).startswith("could not read rows 1..1 of data.paths (a.jsonl): bad line (1 more units failed")
    assert json.loads((tmp_path / "slurm.json").read_text())["submissions"][-1]["reported"] is True
    # Told once: the next command (after the fix) submits the failed units again.
    stop = submit([job], tasks_of([1, 2]), tmp_path, fake)
    assert isinstance(stop, SlurmSubmitted) and [t.unit.number for t in fake.submitted[-1]] == [1, 2]


def test_a_job_that_finished_no_unit_points_at_its_logs_once(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    job = unit_job(tmp_path)
    submit([job], tasks_of(range(2)), tmp_path, fake)
    err = submit([job], tasks_of(range(2)), tmp_path, fake)  # the job left the queue, nothing done
    assert not isinstance(err, SlurmSubmitted) and len(fake.submitted) == 1
    assert str(err).startswith("Slurm job 4242 ended and none of its 2 units is done")
    assert f"see {tmp_path}/datatrove/slurm_logs and {tmp_path}/datatrove/logs" in str(err)
    assert isinstance(submit([job], tasks_of(range(2)), tmp_path, fake), SlurmSubmitted)
    assert len(fake.submitted) == 2


def test_without_squeue_a_job_is_taken_as_ended(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    job = unit_job(tmp_path)
    submit([job], tasks_of(range(2)), tmp_path, fake)
    mark_done(job, [0])
    fake.states["4242"] = None
    stop_if_running(tmp_path, fake.say)
    assert isinstance(submit([job], tasks_of([1]), tmp_path, fake), SlurmSubmitted)
    assert fake.said[0] == "squeue could not tell whether Slurm job 4242 still runs; taking it as ended"
    assert len(fake.said) == 2 and len(fake.submitted) == 2  # said once, though asked twice


def test_units_of_a_mixture_are_named_by_source(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    jobs = [unit_job(tmp_path, "code"), unit_job(tmp_path, "books")]
    mark_done(jobs[0], [0])
    todo = [Task(0, Unit(1, 1, 2)), Task(1, Unit(0, 0, 1))]
    assert "2 of 3 units" in str(submit(jobs, todo, tmp_path, fake))
    (record,) = json.loads((tmp_path / "slurm.json").read_text())["submissions"]
    assert record["units"] == ["books/00000", "code/00001"]


def test_an_unreadable_record_counts_as_no_submission(tmp_path, monkeypatch):
    fake = FakeSlurm(monkeypatch)
    (tmp_path / "slurm.json").write_text("{not json")
    stop_if_running(tmp_path, fake.say)
    assert isinstance(submit([unit_job(tmp_path)], tasks_of(range(1)), tmp_path, fake), SlurmSubmitted)


# ---------------------------------------------------------------- what runs on the cluster


class BadInputJob(UnitJob):
    def run_unit(self, unit):
        if unit.number == 1:
            raise PipelineError(f"could not read rows {unit.start}..{unit.stop - 1} of a.jsonl: bad line")
        self.marker(unit).parent.mkdir(parents=True, exist_ok=True)
        self.marker(unit).write_text("{}")


def test_an_array_task_fails_when_one_of_its_units_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "set_parent_death_signal", lambda: None)
    job = BadInputJob("", None, None, tmp_path, tmp_path, tmp_path / "spm.model", 400, 0.1, False)
    step = SlurmUnitStep([job], tasks_of(range(4)))
    assert step(None, rank=0, world_size=2) is None  # units 0 and 2
    with pytest.raises(PipelineError, match="could not read rows 1..1 of a.jsonl"):
        step(None, rank=1, world_size=2)  # units 1 (bad) and 3: both tried, the task then fails
    assert job.marker(Unit(3, 3, 4)).is_file() and error_file(job, Unit(1, 1, 2)).is_file()


def test_the_sbatch_script(tmp_path):
    config = SlurmConfig(env_command="source /shared/venv/bin/activate", sbatch_args={"account": "proj"})
    executor = slurm._executor_class()(
        pipeline=[],
        tasks=3,
        time=config.time,
        partition=None,
        cpus_per_task=2,
        mem_per_cpu_gb=4,
        qos=None,
        job_name=config.job_name,
        env_command=slurm.env_command(config),
        sbatch_args=config.sbatch_args,
        logging_dir=str(tmp_path / "datatrove"),
        skip_completed=False,
    )
    script = executor.get_launch_file_contents(executor.get_sbatch_args(3), "launch_pickled_pipeline x.pik")
    lines = script.splitlines()
    assert "#SBATCH --array=0-2" in lines and "#SBATCH --account=proj" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --mem-per-cpu=4G" in lines
    assert f"#SBATCH --output={tmp_path}/datatrove/slurm_logs/%A_%a.out" in lines
    assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --qos")) for line in lines)
    path_line = next(i for i, line in enumerate(lines) if line.strip().startswith("export PATH="))
    assert lines[path_line].strip() == f"export PATH={Path(sys.executable).parent}:$PATH"
    assert lines[path_line + 1].strip() == "source /shared/venv/bin/activate"
    env = executor.get_distributed_env()
    assert env["datatrove_executor"] == "SLURM" and env["datatrove_cpus_per_task"] == "2"
