"""ALiBi math: the one home of the slope rule and of the bias (Press et al. 2022, "Train Short, Test Long").

ALiBi adds ``-m_h * (i - j)`` to the attention score of query position ``i`` and key position ``j`` in
head ``h``, where ``m_h`` is the head's slope. Positions are *global*: a rank that holds tokens 4096..8191
of a sequence, or one block of a ring, uses those numbers, not 0..4095. Slopes and bias are float32 even
when the model runs in bf16/fp16: bf16 holds integers exactly only up to 256, so a bias cast to bf16
gives neighbouring distant keys the same value.
"""

from __future__ import annotations

import math

import torch


def _geometric_slopes(n: int) -> list[float]:
    # For n a power of two: 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes, float32 ``[n_heads]``.

    For a power of two, the paper's geometric sequence. Otherwise (the paper's rule, as BLOOM implements
    it): the slopes of the nearest lower power of two, followed by every other slope of the next power
    of two, so for 12 heads the first eight are 2^-1..2^-8 and the last four 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    These are not monotone in the head index.
    """
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads={n_heads!r} is not allowed; it must be a positive integer")
    lower = 2 ** math.floor(math.log2(n_heads))
    values = _geometric_slopes(lower)
    if lower != n_heads:
        values += _geometric_slopes(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def head_slopes(n_heads: int, first_head: int, count: int) -> torch.Tensor:
    """Slopes of global heads ``first_head .. first_head + count - 1`` of an ``n_heads`` model, float32 ``[count]``.

    A rank that holds a slice of the heads (tensor parallel, Ulysses) must use the slopes of exactly those
    heads, not those of heads 0..count-1.
    """
    if first_head < 0 or count < 1 or first_head + count > n_heads:
        raise ValueError(f"heads {first_head}..{first_head + count - 1} are outside 0..{n_heads - 1}")
    return slopes(n_heads)[first_head : first_head + count]


def positions(offset: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``offset .. offset + length - 1``, int64 ``[length]``."""
    return torch.arange(offset, offset + length, device=device, dtype=torch.int64)


def alibi_bias(head_slopes: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """The bias of a block: float32 ``[heads, len(q_positions), len(k_positions)]``, ``-m_h * (i - j)``.

    Entries with ``j > i`` (the future) come out positive; callers mask them. The distance is formed in
    int64 and scaled in float32, so it is exact for any length a float32 can index.
    """
    distance = (q_positions[:, None] - k_positions[None, :]).to(torch.float32)
    return -head_slopes.to(torch.float32)[:, None, None] * distance


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean ``[len(q_positions), len(k_positions)]``, True where query ``i`` may see key ``j``.

    Causal: ``j <= i``. With ``window`` W, also ``i - j < W`` (each query sees at most its last W keys).
    """
    distance = q_positions[:, None] - k_positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed
