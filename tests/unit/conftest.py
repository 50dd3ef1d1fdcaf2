"""The unit tier starts no process: whatever a test (or a fixture it uses, of any scope up to the module) starts,
through ``subprocess``, ``os.fork``/``posix_spawn``/``system`` or ``multiprocessing``, fails the test at once with
a message. A test that needs a process belongs in tests/e2e.

One exception: the standard library's look-ups of the machine that shell out to a system tool
(``platform.processor()`` runs ``uname -p``; ``ctypes.util.find_library`` runs ``ldconfig -p``). They describe the
machine, in-process code calls them (the benchmarks' machine report, the RSS meter's ``malloc_trim``), and they are
not the program, a worker or a launcher, so they are let through.
"""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
import sys

import pytest

MESSAGE = "unit tests start no process; move this test to tests/e2e (it tried to start: {what})"
MACHINE_LOOKUPS = {"platform", "ctypes.util"}  # modules whose own process starts are let through
PASS_THROUGH = {"subprocess", __name__}  # frames skipped to find who asked for the process


def requester() -> str:
    """The module of the first frame on the stack outside ``subprocess`` and this guard."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in PASS_THROUGH:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


def guard(what: str, original, show=lambda args: args[0] if args else ""):
    def guarded(*args, **kwargs):
        if requester() in MACHINE_LOOKUPS:
            return original(*args, **kwargs)
        shown = show(args)
        pytest.fail(MESSAGE.format(what=f"{what} {shown!r}" if shown else what), pytrace=True)

    return guarded


@pytest.fixture(scope="module", autouse=True)
def no_process():
    """Module-scoped, so that a module's own fixtures (set up after an autouse fixture of the same scope) are guarded
    too. pytest.fail raises a BaseException, which a library's ``except Exception`` does not swallow."""
    with pytest.MonkeyPatch.context() as patch:
        # Popen first, for a message that shows the command; fork_exec also covers multiprocessing's spawn.
        popen = subprocess.Popen._execute_child
        patch.setattr(subprocess.Popen, "_execute_child", guard("subprocess.Popen", popen, lambda a: a[1]))
        patch.setattr(_posixsubprocess, "fork_exec", guard("_posixsubprocess.fork_exec", _posixsubprocess.fork_exec))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, guard(f"os.{name}", getattr(os, name)))
        yield
