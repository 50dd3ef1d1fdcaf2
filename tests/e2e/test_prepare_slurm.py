"""``data.executor=slurm`` end to end, under a fake Slurm: ``sbatch``, ``squeue`` and ``srun`` on the PATH that record
what they are asked and run the array's tasks on this machine, one after the other, through the very script datatrove
wrote (``srun ... launch_pickled_pipeline executor.pik``), with the variables a real array task has.

One story: the first command (launch/prepare_slurm.sh) submits the array and exits 0; run again while the job runs
it submits nothing (and ``stage=train`` stops with exit 75); the job then loses a task; run again it submits only the
missing units; run once more it finishes the corpus, byte for byte the one ``data.executor=local data.workers=1``
prepares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli import REPO, cli_env, run_pretrain
from data_fixtures import complete_corpora, corpus_files, leftovers

from pretrain.errors import EXIT_STOPPED_EARLY

# One program under three names (and fake_slurm_run, which runs a held job's tasks). State in $FAKE_SLURM_DIR:
# <job>.json (the submission: sbatch options, #SBATCH lines, the submitter's environment, as --export=ALL keeps it),
# <job>.sh (the script), <job>.state (squeue's state of the job), sbatch.log (one JSON line per call).
# FAKE_SLURM_MODE=run runs the array before sbatch answers; hold leaves it RUNNING until fake_slurm_run runs it.
FAKE_SLURM = r"""#!{python}
import json, os, re, subprocess, sys
from pathlib import Path

name = os.path.basename(sys.argv[0])
state = Path(os.environ["FAKE_SLURM_DIR"])
state.mkdir(parents=True, exist_ok=True)


def log(what, **fields):
    with open(state / f"{what}.log", "a") as f:
        f.write(json.dumps(fields) + "\n")


def run_job(job, only=None):
    sub = json.loads((state / f"{job}.json").read_text())
    first, last = map(int, re.fullmatch(r"(\d+)-(\d+)(%\d+)?", sub["directives"]["array"]).groups()[:2])
    statuses = {}
    for task in range(first, last + 1):
        if only is not None and task not in only:
            statuses[task] = "CANCELLED"
            continue
        env = dict(sub["env"], **sub["export"])
        env.update(SLURM_JOB_ID=str(job * 100 + task), SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_ARRAY_TASK_COUNT=str(last - first + 1), SLURM_NODELIST="localhost",
                   SLURMD_NODENAME="localhost", SLURM_JOB_NAME=sub["directives"]["job-name"])
        out = sub["directives"]["output"].replace("%A", str(job)).replace("%a", str(task)).replace("%j", str(job))
        with open(out, "a") as f:
            script = state / f"{job}.sh"
            rc = subprocess.run(["bash", str(script)], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        statuses[task] = "COMPLETED" if rc == 0 else "FAILED"
    (state / f"{job}.state").write_text(json.dumps(statuses))


if name == "sbatch":
    *options, script = sys.argv[1:]
    text = Path(script).read_text()
    directives = {}
    for line in text.splitlines():
        found = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if found:
            directives[found.group(1)] = found.group(2) or ""
    export = {}
    for option in options:
        if option.startswith("--export="):
            export = dict(item.split("=", 1) for item in option.split("=", 1)[1].split(",") if "=" in item)
    counter = state / "next_id"
    job = int(counter.read_text()) if counter.exists() else 4242
    counter.write_text(str(job + 1))
    (state / f"{job}.sh").write_text(text)
    sub = dict(job=job, options=options, directives=directives, export=export, env=dict(os.environ))
    (state / f"{job}.json").write_text(json.dumps(sub))
    log("sbatch", job=job, options=options, directives=directives)
    (state / f"{job}.state").write_text(json.dumps({"0": "RUNNING"}))
    if os.environ.get("FAKE_SLURM_MODE", "run") == "run":
        run_job(job)
    print(f"Submitted batch job {job}")
elif name == "fake_slurm_run":  # fake_slurm_run JOB [TASK ...]: run a held job (only those tasks; the others cancelled)
    run_job(int(sys.argv[1]), {int(task) for task in sys.argv[2:]} or None)
elif name == "squeue":  # squeue -h -j JOB -o "%i %T"
    args = sys.argv[1:]
    log("squeue", args=args)
    job = args[args.index("-j") + 1]
    path = state / f"{job}.state"
    if not path.exists():
        sys.exit("slurm_load_jobs error: Invalid job id specified")
    for task, task_state in json.loads(path.read_text()).items():
        print(f"{job}_{task} {task_state}")
elif name == "srun":  # srun [-l] [-n N] COMMAND ...: the command, here
    args = sys.argv[1:]
    log("srun", args=args)
    while args and args[0].startswith("-"):
        args = args[2:] if args[0] in ("-n", "-N", "-c") else args[1:]
    os.execvp(args[0], args)
"""

ARGS = [
    "stage=prepare",
    "data.tasks=2",
    "data.unit_bytes=40000",
    "data.max_files=30",
    "data.vocab_size=400",
    "data.num_proc=1",
    "data.tokenizer_sample_chars=300000",
]


def fake_slurm(tmp_path: Path) -> tuple[Path, dict]:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    text = FAKE_SLURM.replace("{python}", sys.executable)
    for name in ("sbatch", "squeue", "srun", "fake_slurm_run"):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return state, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}


def calls(state: Path, what: str) -> list[dict]:
    path = state / f"{what}.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def task_logs(state: Path) -> str:
    """The fake array tasks' output, for assertion messages."""
    return "\n".join(path.read_text()[-3000:] for path in sorted(state.parent.rglob("slurm_logs/*.out")))


def test_slurm_executor_submits_waits_resubmits_and_finishes_the_same_corpus(tmp_path):
    state, env = fake_slurm(tmp_path)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    slurm_args = [
        *ARGS,
        "data.executor=slurm",
        "data.slurm.partition=cpu",
        "+data.slurm.sbatch_args.account=proj",
        f"data.cache_dir={cache}",
        f"run_dir={run_dir}",
    ]

    # 1. Submitted through launch/prepare_slurm.sh, not run (the job is held RUNNING): exit 0, one line saying how to
    # go on, and the script's own two lines.
    script_args = [a for a in slurm_args if a not in ("stage=prepare", "data.executor=slurm")]
    first = subprocess.run(
        ["bash", str(REPO / "launch" / "prepare_slurm.sh"), *script_args],
        env=cli_env({**env, "FAKE_SLURM_MODE": "hold", "PYTHON": sys.executable}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[prepare] submitted Slurm job 4242: 15 of 15 units in 2 array tasks (logs: " in first.stdout, first.stdout
    assert "--dependency=afterok:4242" in first.stdout and "Traceback" not in first.stderr, first.stderr
    assert "next: once job 4242 ends, run this command again" in first.stdout
    assert "sbatch --dependency=afterok:4242 launch/slurm.sbatch data.tasks=2 " in first.stdout
    (build,) = leftovers(cache)
    (sbatch,) = calls(state, "sbatch")
    assert sbatch["directives"]["array"] == "0-1" and sbatch["directives"]["job-name"] == "pretrain-prepare"
    assert sbatch["directives"]["partition"] == "cpu" and sbatch["directives"]["account"] == "proj"
    assert sbatch["directives"]["time"] == "04:00:00" and "qos" not in sbatch["directives"]
    assert sbatch["directives"]["output"] == f"{build}/datatrove/slurm_logs/%A_%a.out"
    assert "launch_pickled_pipeline" in (state / "4242.sh").read_text()
    record = json.loads((build / "slurm.json").read_text())
    assert [s["job_ids"] for s in record["submissions"]] == [["4242"]] and len(record["submissions"][0]["units"]) == 15

    # 2. Run again while the job runs: nothing submitted; stage=prepare exits 0, stage=train 75 (try again later).
    waiting = run_pretrain(slurm_args, cwd=tmp_path, env=env)
    assert "0 of 15 units done; Slurm job 4242 is still running" in waiting.stdout, waiting.stdout
    train = [*slurm_args, "stage=train"]
    stopped = run_pretrain(train, cwd=tmp_path, env=env, check=False)
    assert stopped.returncode == EXIT_STOPPED_EARLY, stopped.stdout + stopped.stderr
    assert "Slurm job 4242 is still running" in stopped.stdout and "stage=train stopped after prepare" in stopped.stdout
    assert len(calls(state, "sbatch")) == 1 and len(calls(state, "squeue")) == 2
    assert complete_corpora(cache) == []

    # 3. The job ends having run only task 0 (units 0, 2, ..., 14; task 1 cancelled): the next command submits the
    # other 7 units, in a new array of 2 tasks that runs before sbatch answers.
    ran = subprocess.run(
        [str(tmp_path / "bin" / "fake_slurm_run"), "4242", "0"], env=cli_env(env), capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads((state / "4242.state").read_text()) == {"0": "COMPLETED", "1": "CANCELLED"}, task_logs(state)
    again = run_pretrain(slurm_args, cwd=tmp_path, env=env)
    assert "Slurm job 4242 ended with 7 of 15 units not done; submitting those 7 again" in again.stdout, again.stdout
    assert "submitted Slurm job 4243: 7 of 15 units in 2 array tasks" in again.stdout, again.stdout
    assert [call["job"] for call in calls(state, "sbatch")] == [4242, 4243]
    assert json.loads((state / "4243.state").read_text()) == {"0": "COMPLETED", "1": "COMPLETED"}, task_logs(state)
    assert all(call["args"][:3] == ["-l", "-n", "1"] for call in calls(state, "srun"))
    record = json.loads((build / "slurm.json").read_text())
    assert sorted(record["submissions"][1]["units"]) == [f"{n:05d}" for n in range(1, 15, 2)]

    # 4. The job ended with every unit done: the same command finishes the corpus (nothing submitted).
    finished = run_pretrain(slurm_args, cwd=tmp_path, env=env)
    assert "[prepare] prepared stdlib" in finished.stdout and "Slurm job" not in finished.stdout, finished.stdout
    assert len(calls(state, "sbatch")) == 2
    (corpus,) = complete_corpora(cache)
    assert leftovers(cache) == []
    assert (corpus / "slurm.json").is_file() and not (corpus / "datatrove").exists()  # the record stays, the logs go

    # The same bytes as one local worker writes.
    local_cache = tmp_path / "local-cache"
    local = [*ARGS, "data.executor=local", "data.workers=1", f"data.cache_dir={local_cache}", f"run_dir={run_dir}"]
    run_pretrain(local, cwd=tmp_path)
    (reference,) = complete_corpora(local_cache)
    assert corpus.name == reference.name
    assert corpus_files(corpus) == corpus_files(reference)
