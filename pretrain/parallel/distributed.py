"""The process layout of a run: rank, world size, and the one place that reads the launcher's environment."""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.errors import ConfigError, PipelineError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run. ``is_main`` gates every file and log write (rank 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def all_reduce(values: torch.Tensor, ctx: DistContext, op=None) -> torch.Tensor:
    """``values`` reduced over every rank (sum, or ``op`` such as ``dist.ReduceOp.MAX``), on ``values``' own device.

    The reduction runs on the rank's device: NCCL reduces only CUDA tensors, so a CPU tensor travels there
    and back. With one rank, ``values`` itself.
    """
    if ctx.world_size == 1:
        return values
    on_device = values.to(ctx.device)
    if on_device is values:
        on_device = values.clone()
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM if op is None else op)
    return on_device.to(values.device)


def all_ranks(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` holds on every rank (every rank gets the same answer)."""
    value = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(value, ctx, op=dist.ReduceOp.MIN).item() > 0)


def run_on_main(ctx: DistContext, work, what: str, wait_dir: Path | None = None, waiting: str = "") -> str:
    """``work()`` (returning a string) on rank 0 while the other ranks wait; every rank returns its result.

    A failure on rank 0 is raised there and, as a PipelineError naming ``what`` ("prepare the corpus"), on every
    other rank, so no rank is left waiting for one that gave up.

    With ``wait_dir`` (a folder every rank can read: it must be shared between nodes) the other ranks wait by
    polling a status file there, saying every few minutes that they are still waiting for ``waiting``, instead of in
    a collective: the process group's timeout then bounds nothing, so ``work`` may take hours (a large prepare).
    """
    if ctx.world_size > 1 and wait_dir is not None and dist.is_initialized():
        return _run_on_main_by_file(ctx, work, what, Path(wait_dir), waiting or what)
    if ctx.is_main:
        failure, status = None, None
        try:
            status = ("ok", work())
        except Exception as err:
            failure = err
            status = ("error", _describe(err))
        broadcast_from_main(ctx, status)
        if failure is not None:
            raise failure
        return status[1]
    state, detail = broadcast_from_main(ctx, None)
    if state == "error":
        raise PipelineError(f"rank 0 could not {what}: {detail}")
    return detail


WAIT_NOTE_SECONDS = 300.0
# How long rank 0 waits, after a failure, for the other ranks to read it before it exits.
ACK_WAIT_SECONDS = 30.0


def _acks(status_file: Path) -> list[Path]:
    return list(status_file.parent.glob(f"{status_file.name}.ack-*"))


def _wait_for_acks(status_file: Path, expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(_acks(status_file)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, (ConfigError, PipelineError)) else f"{type(err).__name__}: {err}"


def _run_on_main_by_file(ctx: DistContext, work, what: str, folder: Path, waiting: str) -> str:
    # A name no earlier run used, agreed on in an instant collective; the long wait is on the file.
    token = broadcast_from_main(ctx, f"{os.getpid()}-{time.time_ns()}")
    status_file = folder / f".rank0-status-{token}.json"
    if ctx.is_main:
        # A failure leaves its status for the ranks still to read it; a day later nobody will.
        for stale in folder.glob(".rank0-status-*.json") if folder.is_dir() else ():
            try:
                if time.time() - stale.stat().st_mtime > 86400:
                    stale.unlink()
            except OSError:
                pass
        failure, status = None, None
        try:
            status = {"state": "ok", "detail": work()}
        except BaseException as err:
            failure = err
            status = {"state": "error", "detail": _describe(err)}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = status_file.with_name(status_file.name + ".tmp")
            tmp.write_text(json.dumps(status))
            os.replace(tmp, status_file)
        except OSError:
            if failure is None:
                raise
        if failure is not None:
            # Wait (briefly) until the other ranks have read the failure: a launcher that sees rank 0 exit kills them,
            # and each should first say why it stops.
            _wait_for_acks(status_file, ctx.world_size - 1, ACK_WAIT_SECONDS)
            for path in (status_file, *_acks(status_file)):
                path.unlink(missing_ok=True)
            raise failure
        ctx.barrier()  # every rank has read the status: remove it
        status_file.unlink(missing_ok=True)
        return status["detail"]
    started = last_note = time.monotonic()
    pause = 0.02
    while not status_file.is_file():
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)  # quick to see a fast answer, cheap on a long wait
        if time.monotonic() - last_note >= WAIT_NOTE_SECONDS:
            last_note = time.monotonic()
            print(
                f"[rank {ctx.rank}] still waiting for rank 0 ({waiting}): {(last_note - started) / 60:.0f} min",
                flush=True,
            )
    status = json.loads(status_file.read_text())
    if status["state"] == "error":
        try:  # read: rank 0, waiting for this, may now exit
            status_file.with_name(f"{status_file.name}.ack-{ctx.rank}").touch()
        except OSError:
            pass
        raise PipelineError(f"rank 0 could not {what}: {status['detail']}")
    ctx.barrier()
    return status["detail"]


def gather_objects(value, ctx: DistContext) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if ctx.world_size == 1:
        return [value]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(ctx: DistContext, value):
    """Rank 0's ``value`` (any picklable object) on every rank; the other ranks wait here until rank 0 arrives."""
    ctx.barrier()
    if ctx.world_size > 1 and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a holder of a lock or a build directory that crashed does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by the DeepSpeed launcher, torchrun or Slurm-started torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local_rank


def _remove_cpu_comm_workspace() -> None:
    """Unlink this rank's shared-memory all-reduce workspace at exit.

    On a CPU, DeepSpeed's communication backend maps a 66 MiB ``/dev/shm`` file per rank
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never removes it: every multi-process
    run would leave its files behind until ``/dev/shm`` (memory) is full. Unlinking only drops the name;
    any rank still mapping it keeps its memory until it exits.
    """
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if port is None or rank is None:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        path.unlink(missing_ok=True)


def init_deepspeed_comm(backend: str, **kwargs) -> None:
    """``deepspeed.init_distributed`` (its comm layer carries Ulysses' all-to-all), cleaned up at exit on CPU."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    if backend == "gloo":
        atexit.register(_remove_cpu_comm_workspace)


def init_distributed() -> DistContext:
    """Join the process group when started by a multi-rank launcher (gloo on CPU, NCCL on GPU)."""
    rank, world, local_rank = launcher_env()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Rank 0 may spend a long time preparing a corpus while the others wait at a barrier.
        init_deepspeed_comm(backend, timeout=timedelta(hours=2))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    _GROUPS.clear()  # they belong to the process group destroyed here
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group(ctx: DistContext) -> None:
    """DeepSpeed's engine needs a process group even for one process started without a launcher."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size), ("LOCAL_RANK", ctx.local_rank)):
        os.environ.setdefault(key, str(value))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_deepspeed_comm(backend, auto_mpi_discovery=False)


@dataclass(frozen=True)
class ParallelGroups:
    """The split of the world: data-parallel groups of ``world / sp_size`` and sequence-parallel groups of
    ``sp_size`` consecutive ranks (so a sequence stays inside a node). ``mpu`` is what DeepSpeed's engine
    reads to reduce gradients over the sequence and data dimensions and to size the global batch."""

    dp_rank: int
    dp_size: int
    sp_rank: int = 0
    sp_size: int = 1
    sp_group: object = None
    mpu: object = None


# The groups built in this process, by sp_size: DeepSpeed's mpu can be initialized only once, and stage=all
# needs the same groups in the train and the eval stage.
_GROUPS: dict[int, ParallelGroups] = {}


def build_parallel_groups(ctx: DistContext, sp_size: int) -> ParallelGroups:
    """Build the process groups once, from the config; all ranks call it. Later calls return the same groups."""
    if sp_size == 1:
        return ParallelGroups(dp_rank=ctx.rank, dp_size=ctx.world_size)
    if sp_size in _GROUPS:
        return _GROUPS[sp_size]
    if _GROUPS:
        raise RuntimeError(f"sequence-parallel groups of {next(iter(_GROUPS))} ranks exist; cannot build {sp_size}")
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(sp_size)
    _GROUPS[sp_size] = ParallelGroups(
        dp_rank=ctx.rank // sp_size,
        dp_size=ctx.world_size // sp_size,
        sp_rank=ctx.rank % sp_size,
        sp_size=sp_size,
        sp_group=mpu.get_sequence_parallel_group(),
        mpu=mpu,
    )
    return _GROUPS[sp_size]
