"""The launch recipes in launch/: Slurm's rendezvous under a fake Slurm environment, the scripts' syntax,
SIGTERM reaching the training ranks, and a two-node run simulated on this machine through
launch/slurm.sbatch itself (a fake `srun` starts it once per "node"; the DeepSpeed launchers and ranks are real).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import REPO, SMALL_RUN, cli_env, free_port, losses, run_pretrain

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
SOURCED = {"slurm_env.sh"}  # sourced by the others, not run

# Stands in for srun --ntasks-per-node=1: the command once per node, on this machine; the copies differ only
# in SLURM_NODEID / SLURM_PROCID, as on a real allocation.
FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >"$FAKE_SLURM_LOG/srun.args"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((k = 0; k < SLURM_NNODES; k++)); do
  SLURM_NODEID=$k SLURM_PROCID=$k SLURM_LOCALID=0 "$@" >"$FAKE_SLURM_LOG/node$k.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# Records requeue requests; expands node lists as the real one does.
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_SLURM_LOG/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then
  source "$SLURM_SUBMIT_DIR/launch/slurm_env.sh"
  slurm_expand_nodelist_bash "$3"
fi
"""


# Slurm's, the launchers' and the ranks' own variables: a test sets the ones it means.
LAUNCH_VARIABLES = (
    "SLURM_", "MASTER_", "PMI_", "OMPI_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GPUS_PER_NODE", "LAUNCHER",
    "OMP_NUM_THREADS",
)  # fmt: skip


def clean_env(**extra) -> dict:
    """The programs' environment (see ``cli_env``) without any Slurm or launcher variables, plus ``extra``."""
    return cli_env(extra, unset=LAUNCH_VARIABLES)


def sourced(script: str, **env) -> subprocess.CompletedProcess:
    """Run ``script`` in bash after sourcing launch/slurm_env.sh, under a fake Slurm environment."""
    command = f"set -euo pipefail; source {LAUNCH / 'slurm_env.sh'}; {script}"
    return subprocess.run(["bash", "-c", command], env=clean_env(**env), capture_output=True, text=True, timeout=60)


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("a[8-11]", ["a8", "a9", "a10", "a11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("x[1,3]-ib,y2", ["x1-ib", "x3-ib", "y2"]),
        ("10.0.0.[1-2],10.0.1.5", ["10.0.0.1", "10.0.0.2", "10.0.1.5"]),
    ],
)
def test_node_list_expansion_without_scontrol(nodelist, hosts):
    proc = sourced(f"slurm_expand_nodelist_bash '{nodelist}'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == hosts


RENDEZVOUS = 'slurm_rendezvous; echo "$MASTER_ADDR $MASTER_PORT $NODE_RANK $NNODES $GPUS_PER_NODE $NUM_PROCESSES"'


@pytest.mark.parametrize(
    "env, want",
    [
        # (master address, port, node rank, nodes, GPUs per node, processes in all)
        (
            dict(
                SLURM_JOB_NODELIST="gpu[01-03,07],cpu5",
                SLURM_NNODES=5,
                SLURM_NODEID=3,
                SLURM_GPUS_ON_NODE=8,
                SLURM_JOB_ID=1234567,
            ),
            ("gpu01", "24567", "3", "5", "8", "40"),
        ),
        (
            dict(
                SLURM_JOB_NODELIST="node[7-8]",
                SLURM_JOB_NUM_NODES=2,
                SLURM_NODEID=0,
                SLURM_GPUS_ON_NODE=4,
                SLURM_JOB_ID=99,
                MASTER_PORT=31000,
            ),
            ("node7", "31000", "0", "2", "4", "8"),
        ),
        (  # GPUS_PER_NODE set by hand wins over Slurm's count
            dict(
                SLURM_JOB_NODELIST="h1,h2,h3",
                SLURM_NNODES=3,
                SLURM_NODEID=2,
                SLURM_GPUS_ON_NODE=8,
                GPUS_PER_NODE=2,
                SLURM_JOB_ID=5,
            ),
            ("h1", "20005", "2", "3", "2", "6"),
        ),
    ],
)
def test_rendezvous_from_slurm_environment(env, want):
    proc = sourced(RENDEZVOUS, **env)
    assert proc.returncode == 0, proc.stderr
    assert tuple(proc.stdout.split()) == want


def test_gpus_per_node_falls_back_to_nvidia_smi_then_8(tmp_path):
    env = dict(SLURM_JOB_NODELIST="g[1-2]", SLURM_NNODES=2, SLURM_NODEID=1, SLURM_JOB_ID=1)
    write_executable(tmp_path / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n")
    path = os.environ["PATH"]
    assert sourced(RENDEZVOUS, PATH=f"{tmp_path}:{path}", **env).stdout.split()[4:] == ["2", "4"]
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # no driver: the default
    assert sourced(RENDEZVOUS, PATH=f"{tmp_path}:{path}", **env).stdout.split()[4:] == ["8", "16"]


@pytest.mark.parametrize(
    "env, message",
    [
        (dict(SLURM_NNODES=2, SLURM_NODEID=0), "SLURM_JOB_NODELIST is not set"),
        (dict(SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES=2, SLURM_NODEID=2), "SLURM_NODEID=2 is outside 0..1"),
        (dict(SLURM_JOB_NODELIST="n[1-3]", SLURM_NNODES=2, SLURM_NODEID=0), "names 3 hosts but SLURM_NNODES=2"),
    ],
)
def test_rendezvous_errors_name_the_variable(env, message):
    proc = sourced(RENDEZVOUS, SLURM_GPUS_ON_NODE=8, **env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_hostfile_lists_the_nodes_in_order(tmp_path):
    env = dict(SLURM_JOB_NODELIST="gpu[09-10],cpu1", SLURM_NNODES=3, SLURM_NODEID=0, SLURM_GPUS_ON_NODE=8)
    proc = sourced(f"slurm_rendezvous; slurm_hostfile {tmp_path / 'hosts'}", **env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hosts").read_text() == "gpu09 slots=8\ngpu10 slots=8\ncpu1 slots=8\n"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_strict(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if script.name not in SOURCED:
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
        assert "set -euo pipefail" in script.read_text()


# A launcher chain that behaves like the DeepSpeed launcher's, only harsher: the runner has no signal handler
# (a SIGTERM kills it and orphans the rest), and the per-node launcher kills its rank at once on SIGTERM. Only
# a signal delivered to the rank itself lets it finish its "checkpoint"; the node-1 rank stops when node 0
# has saved (the real ranks agree on stopping at every step).
FAKE_RUNNER = """
import os, subprocess, sys
sys.exit(subprocess.Popen([sys.executable, os.path.join(os.path.dirname(sys.argv[0]), "fake_launch.py")]).wait())
"""
FAKE_LAUNCH = """
import os, signal, subprocess, sys
rank = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "fake_rank.py")],
                        env=dict(os.environ, LOCAL_RANK="0", RANK=os.environ["SLURM_NODEID"]))
def kill_rank(signum, frame):
    rank.kill()
    sys.exit(1)
signal.signal(signal.SIGTERM, kill_rank)
sys.exit(rank.wait())
"""
FAKE_RANK = """
import os, signal, sys, time
from pathlib import Path
out, node = Path(os.environ["FAKE_OUT"]), os.environ["SLURM_NODEID"]
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append("SIGTERM"))
(out / f"started{node}").write_text(str(os.getpid()))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if got or (out / "saved0").exists():
        time.sleep(1.5)  # the step and the checkpoint take a while
        (out / f"saved{node}").write_text(got[0] if got else "peer")
        sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
"""


def fake_slurm(tmp_path: Path, nodes: int, **extra) -> dict:
    """A bin directory with the fake srun/scontrol first on PATH, and a batch job's environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm-log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_SLURM_LOG=log,
        TMPDIR=tmp_path / "tmp",
        SLURM_JOB_ID=777,
        SLURM_JOB_NODELIST=f"127.0.0.[1-{nodes}]",
        SLURM_NNODES=nodes,
        SLURM_GPUS_ON_NODE=1,
        SLURM_SUBMIT_DIR=REPO,
        MASTER_PORT=free_port(),
        **extra,
    )


def slurm_logs(env: dict) -> str:
    """The fake Slurm's records and each node's output (the end of it), for assertion messages."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(env["FAKE_SLURM_LOG"]).glob("*")))


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["USR1-requeues", "TERM-ends"]
)
def test_batch_signal_reaches_the_ranks_and_the_job_waits_for_their_checkpoint(tmp_path, sig, requeued):
    """SIGUSR1 (the time-limit warning) or SIGTERM to the batch script reaches the node-0 rank, not the
    launchers; the job ends only after the ranks have saved; only SIGUSR1 requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "deepspeed", f"#!{sys.executable}\n{FAKE_RUNNER}")
    (bin_dir / "fake_launch.py").write_text(FAKE_LAUNCH)
    (bin_dir / "fake_rank.py").write_text(FAKE_RANK)
    env = fake_slurm(tmp_path, nodes=2, FAKE_OUT=tmp_path)
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "model=tiny"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: all((tmp_path / f"started{k}").exists() for k in (0, 1)), "both ranks to start", proc, 60)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output + slurm_logs(env)
    # Read as soon as the job has ended: it must have waited for both ranks to save.
    assert (tmp_path / "saved0").read_text() == "SIGTERM", slurm_logs(env)
    assert (tmp_path / "saved1").read_text() == "peer"
    requeues = [
        line for line in (tmp_path / "slurm-log" / "scontrol.log").read_text().splitlines() if "requeue" in line
    ]
    assert requeues == (["requeue 777"] if requeued else [])
    srun_args = (tmp_path / "slurm-log" / "srun.args").read_text().split()
    assert srun_args[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun_args[-2:] == ["--node", "model=tiny"]
    assert not (tmp_path / "tmp" / "pretrain-slurm-777").exists()  # the pid files are cleaned up


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the small corpus prepared once (later runs hit the cache)."""
    path = tmp_path_factory.mktemp("launch")
    run_pretrain(["stage=prepare", f"run_dir={path / 'prep'}", f"data.cache_dir={path / 'data'}", *SMALL_RUN], cwd=path)
    return path


@pytest.mark.multirank
def test_slurm_script_on_two_simulated_nodes_stops_requeues_and_resumes_like_two_local_ranks(workdir):
    """launch/slurm.sbatch under a fake Slurm allocation of two nodes (both 127.0.0.1 here), one CPU rank each:
    the DeepSpeed launcher runs on each "node" with --no_ssh and its node rank. The time-limit signal stops both
    nodes after the same step with a checkpoint and requeues the job; the requeued job (the same command)
    resumes, and the losses are those of two ranks on one node."""
    args = ["stage=train", "train.max_steps=6", f"data.cache_dir={workdir / 'data'}", *SMALL_RUN]
    run_pretrain([f"run_dir={workdir / 'local'}", *args], cwd=workdir, ranks=2)
    want = losses(workdir / "local")

    run_dir = workdir / "slurm"
    command = ["bash", str(LAUNCH / "slurm.sbatch"), f"run_dir={run_dir}", *args]
    env = fake_slurm(workdir, nodes=2)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics_file = run_dir / "train" / "metrics.jsonl"
        wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 1, "step 1", proc)
        proc.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@120 sends before the time limit
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, output + slurm_logs(env)
    stopped_at = max(losses(run_dir))
    assert stopped_at < 6, "the run was not stopped early"
    assert f"stopped after step {stopped_at} (SIGTERM)" in slurm_logs(env)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert "requeue 777" in (workdir / "slurm-log" / "scontrol.log").read_text()
    srun_args = (workdir / "slurm-log" / "srun.args").read_text()
    assert srun_args.startswith("--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash ")

    # The requeued job: the same script and arguments (a new port, as it may land on other nodes).
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + slurm_logs(env)
    got = losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])
    for node in (0, 1):  # each "node" ran its own DeepSpeed launcher with its node rank
        log = (workdir / "slurm-log" / f"node{node}.log").read_text()
        assert f"[slurm] node {node}/2 on" in log and f"--node_rank={node}" in log, log[-3000:]
