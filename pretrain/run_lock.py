"""One program at a time in a run directory.

Two runs writing one run directory corrupt each other (interleaved metrics, one run's checkpoints read by the
other). Rank 0 takes ``<run_dir>/.pretrain.lock`` (created exclusively; it names the holder's host, pid, start
time and command) before any stage writes there, and removes it on any exit it survives. A lock whose holder
was on this host and is no longer alive (killed, or the machine crashed and came back) is stale and taken
over, with a line saying so; a lock held from another host cannot be checked and is refused with the path to
delete by hand.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from pretrain.errors import PipelineError
from pretrain.parallel.distributed import DistContext, broadcast_from_main, pid_alive
from pretrain.run_files import RunFiles


class RunLock:
    """The lock of one run directory, held by rank 0 (the other ranks hold nothing)."""

    def __init__(self, run_dir: str | Path, ctx: DistContext):
        self.path = RunFiles(run_dir).lock
        self.ctx = ctx
        self.held = False

    def acquire(self) -> None:
        """Take the lock on rank 0; every rank raises PipelineError when it is held by another live run."""
        failure = None
        if self.ctx.is_main:
            try:
                self._take()
            except PipelineError as err:
                failure = str(err)
        failure = broadcast_from_main(self.ctx, failure)
        if failure is not None:
            raise PipelineError(failure)

    def _take(self) -> None:
        try:
            self._take_or_raise()
        except OSError as err:  # a read-only or full file system, a path under a file, no permission
            raise PipelineError(
                f"cannot write in run_dir={str(self.path.parent)!r} ({err.strerror or err}); choose a run_dir this "
                "user can write to"
            ) from None

    def _take_or_raise(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not holder.get("pid") or not holder.get("host"):
                    # Empty or damaged: a run killed in the instant between creating and writing it, or an editor.
                    age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
                    if age < 10:
                        time.sleep(1.0)  # perhaps being written right now: look again
                        if self._holder().get("pid"):
                            continue
                    raise PipelineError(
                        f"{self.path} names no run (it is empty or damaged, written {age:.0f} s ago): if no program "
                        f"is using {self.path.parent}, delete {self.path} and run again"
                    ) from None
                if holder.get("host") == record["host"] and not pid_alive(int(holder.get("pid", -1))):
                    print(f"removing the stale lock of pid {holder.get('pid')} (no longer running): {self.path}")
                    self.path.unlink(missing_ok=True)
                    continue
                raise PipelineError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}: {holder.get('command')}); wait for it to end or use another "
                    f"run_dir. If that run is gone (its host is down), delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            self.held = True
            atexit.register(self.release)
            return
        raise PipelineError(f"could not take the lock {self.path}: another run took it at the same moment")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as held by an unknown run

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if self.held:
            self.held = False
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
