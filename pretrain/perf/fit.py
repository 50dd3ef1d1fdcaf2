"""Sizes that cannot fit, known before any work: the memory a decode's KV cache and a forward pass's activations
take, from the model's config and the length, against the memory there is (the device's, or this machine's
available RAM).

The estimates are lower bounds of what the run would allocate (float32, the tensors that are alive together at the
peak): a size refused here could never run; one accepted may still be tight.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pretrain.config import ModelConfig

FLOAT_BYTES = 4
# Live float32 values per token and row at the peak of a forward pass without gradients: the residual stream, the
# fused QKV (3 d), the MLP's inner activation (4 d) and its GELU, a LayerNorm's output (about 10 d in all).
ACTIVATION_WIDTHS = 10


def kv_cache_bytes(model_cfg: ModelConfig, rows: int, tokens: int) -> int:
    """A decoding cache of ``tokens`` positions for ``rows`` sequences: keys and values of every layer."""
    return 2 * model_cfg.n_layer * rows * tokens * model_cfg.d_model * FLOAT_BYTES


def activation_bytes(model_cfg: ModelConfig, rows: int, tokens: int) -> int:
    """One forward pass over ``rows`` sequences of ``tokens`` (no gradients): the token ids and the activations
    alive at once (attention never holds a tokens x tokens matrix: the kernels work blockwise)."""
    return rows * tokens * (ACTIVATION_WIDTHS * model_cfg.d_model * FLOAT_BYTES + 8)


def available_memory() -> tuple[int, str]:
    """``(bytes, where)``: the memory of this rank's GPU (its total: asking for its free memory would make a CUDA
    context before any work), else this machine's available RAM (``MemAvailable``)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        total = torch.cuda.get_device_properties(index).total_memory
        return total, f"GPU {index} ({torch.cuda.get_device_name(index)}) has {format_bytes(total)}"
    return _available_ram(), f"this machine has {format_bytes(_available_ram())} of memory available"


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not known here: nothing is refused
        return 1 << 62


def format_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def largest_fitting(need, limit: int, budget: int) -> int:
    """The largest ``n`` in ``[0, limit]`` with ``need(n) <= budget`` (``need`` increasing)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if need(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
