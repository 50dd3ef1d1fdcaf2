"""Peak memory meters: the CUDA caching allocator's count on a GPU, the RSS high-water mark on a CPU.

PyTorch allocates CPU tensors with plain malloc, which ``tracemalloc`` does not see; the kernel's RSS
high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``, does. It counts whole pages, so it
is an upper bound of the live tensor bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import torch

MIB = 1024 * 1024


class CudaPeakMemory:
    """Peak bytes allocated by the CUDA caching allocator since ``start``, beyond those allocated at ``start``."""

    method = "torch.cuda.max_memory_allocated - memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def peak_extra_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_heap() -> None:
    """Return malloc's free pages to the OS (glibc ``malloc_trim``), so the RSS holds only live memory."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def reset_rss_high_water_mark() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); True if the reset took."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        # Right after a reset the mark equals the RSS; allow a few pages touched in between.
        return _proc_status_bytes("VmHWM") - _proc_status_bytes("VmRSS") <= 4 * MIB
    except OSError:
        return False


class RssPeakMemory:
    """Peak RSS of this process since ``start``, beyond the RSS at ``start`` (Linux ``/proc``)."""

    method = "VmHWM - VmRSS of a fresh process, high-water mark reset through /proc/self/clear_refs"

    def start(self) -> None:
        release_free_heap()
        self.baseline = _proc_status_bytes("VmRSS")
        if not reset_rss_high_water_mark():
            self.method = "VmHWM - VmRSS of a fresh process, mark NOT reset (it may hold the import or warm-up peak)"
            print(f"warning: could not reset the RSS high-water mark; memory is {self.method}", file=sys.stderr)

    def peak_extra_bytes(self) -> int:
        return max(0, _proc_status_bytes("VmHWM") - self.baseline)


def preload_framework_code(zero_stage: int) -> None:
    """Import what the optimizer and DeepSpeed load on first use, so a meter started after this sees tensors.

    The optimizer's first construction imports TorchDynamo (~80 MiB of code on a CPU); DeepSpeed's ZeRO-1/2/3
    optimizers import their Muon and expert-parallel support, which bring TorchInductor and networkx (~45 MiB).
    """
    import importlib

    import torch._dynamo  # noqa: F401

    if zero_stage >= 1:
        for name in (
            "deepspeed.runtime.zero.muon",
            "deepspeed.module_inject.auto_ep_layer",
            "torch._inductor.compile_fx",
        ):
            try:
                importlib.import_module(name)
            except ImportError:  # a DeepSpeed without it does not load it either
                pass


def peak_memory_meter(device: torch.device):
    """The meter for ``device``: ``start()``, then ``peak_extra_bytes()``."""
    return CudaPeakMemory(device) if device.type == "cuda" else RssPeakMemory()
