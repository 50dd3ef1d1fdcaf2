"""Sequence parallelism with correct ALiBi: DeepSpeed-Ulysses and ring attention.

A sequence of L tokens is split over the P ranks of a sequence-parallel group. ALiBi needs each score's
*global* query and key positions and its head's slope; both modes keep them right:

- ``ulysses``: DeepSpeed's ``DistributedAttention`` all-to-all turns a sequence shard into a head shard;
  each rank runs the fused kernel over the whole sequence for heads ``sp_rank * H/P .. (sp_rank + 1) * H/P
  - 1``, **with the slopes of exactly those heads**.
- ``ring``: each rank keeps its queries while key/value chunks travel around the ring; each block's bias
  comes from the global positions of its query and key chunks (``q_offset``/``k_offset`` of the block
  kernel), partial results are merged with their log-sum-exp, and blocks the causal mask hides entirely
  are skipped. The backward pass is the ring again: key/value chunks travel with their gradient
  accumulators and arrive home after a full turn. With ``zigzag`` each rank holds chunks ``r`` and
  ``2P - 1 - r`` of 2P, so every rank does the same causal work.

The model knows nothing of this: ``apply_sequence_parallel`` installs the attention function on each
block from outside, and ``SequenceLayout`` tells the training loop which tokens a rank holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.errors import ConfigError
from pretrain.ops.attention import alibi_attention, blockwise_backward, blockwise_forward


@dataclass(frozen=True)
class SequenceLayout:
    """Which global positions of a sequence of ``seq_len`` tokens rank ``sp_rank`` of ``sp_size`` holds."""

    seq_len: int
    sp_size: int
    sp_rank: int
    zigzag: bool = False

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``(global start, length)`` of each contiguous piece this rank holds, in local order."""
        return segments_of(self.seq_len, self.sp_size, self.sp_rank, self.zigzag)

    def positions(self, device=None) -> torch.Tensor:
        """Global positions of the local tokens, int64 ``[seq_len / sp_size]``."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments])

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of ``tokens`` ``[B, seq_len]``: ``[B, seq_len / sp_size]``."""
        return torch.cat([tokens[:, s : s + n] for s, n in self.segments], dim=1)


def segments_of(seq_len: int, sp_size: int, sp_rank: int, zigzag: bool) -> list[tuple[int, int]]:
    if zigzag:
        chunk = seq_len // (2 * sp_size)
        return [(sp_rank * chunk, chunk), ((2 * sp_size - 1 - sp_rank) * chunk, chunk)]
    chunk = seq_len // sp_size
    return [(sp_rank * chunk, chunk)]


def sequence_parts(sp_size: int, mode: str, zigzag: bool) -> int:
    """How many equal chunks a sequence is cut into: ``sp_size``, or ``2 * sp_size`` for the zigzag ring (Ulysses
    ignores ``zigzag``). A sequence length must be a multiple of it."""
    return 2 * sp_size if (mode == "ring" and zigzag) else sp_size


def check_world_split(world_size: int, sp_size: int) -> None:
    """Raise ConfigError when the world cannot be cut into groups of ``sp_size`` ranks."""
    if world_size % sp_size:
        raise ConfigError(
            f"parallel.sp_size={sp_size} does not divide the world size {world_size}; "
            "the world is split into data-parallel groups of sp_size ranks"
        )


def check_sequence_parallel(seq_len: int, n_head: int, world_size: int, sp_size: int, mode: str, zigzag: bool):
    """Raise ConfigError naming the value when a split cannot be made."""
    check_world_split(world_size, sp_size)
    parts = sequence_parts(sp_size, mode, zigzag)
    if seq_len % parts:
        what = f"2 * parallel.sp_size = {parts} (zigzag ring)" if parts != sp_size else f"parallel.sp_size={sp_size}"
        raise ConfigError(f"model.seq_len={seq_len} is not divisible by {what}; each rank must hold equal chunks")
    if mode == "ulysses" and n_head % sp_size:
        raise ConfigError(
            f"model.n_head={n_head} is not divisible by parallel.sp_size={sp_size}; Ulysses gives each rank "
            "n_head / sp_size whole heads (use parallel.sp_mode=ring, or another sp_size)"
        )


# --- Ulysses ----------------------------------------------------------------------------------------------


class UlyssesAttention:
    """Attention over a sequence shard through DeepSpeed-Ulysses' all-to-all, with this rank's head slopes."""

    def __init__(self, group, n_head: int, backend: str = "fused"):
        from deepspeed.sequence.layer import DistributedAttention

        self.group = group
        self.sp_size = dist.get_world_size(group)
        self.sp_rank = dist.get_rank(group)
        self.n_head = n_head
        self.backend = backend
        # Tensors cross the all-to-all as [batch, seq, heads, dim]: scatter heads (2), gather sequence (1).
        self.dist_attn = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)
        self._slopes: Optional[torch.Tensor] = None
        self._window: Optional[int] = None

    def _local(self, q, k, v, *args, **kwargs):
        # [B, L, H/P, D] for the whole sequence and this rank's heads.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = alibi_attention(q, k, v, self._slopes, 0, 0, backend=self.backend, window=self._window)
        return out.transpose(1, 2)

    def __call__(self, q, k, v, slopes, q_offset=0, k_offset=0, window=None):
        heads_here = self.n_head // self.sp_size
        # The heads this rank attends after the all-to-all are global heads sp_rank*H/P ...: their slopes.
        first = self.sp_rank * heads_here
        self._slopes = None if slopes is None else slopes[first : first + heads_here]
        self._window = window
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, L/P, H, D]
        out = self.dist_attn(q, k, v, 0)
        return out.transpose(1, 2)


# --- Ring attention ---------------------------------------------------------------------------------------


def _merge(out, lse, block_out, block_lse):
    """Fold one block's normalized output and log-sum-exp into the running ones, in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    # Rows where both are -inf have seen no key yet: keep them at zero.
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(block_out * torch.exp(block_lse - safe)[..., None])
    lse.copy_(new_lse)


def _visible(q_start: int, q_len: int, k_start: int, k_len: int, window: Optional[int]) -> bool:
    """Whether any query of the segment sees any key of the other (causal, within the window)."""
    if k_start > q_start + q_len - 1:
        return False
    if window is not None and (q_start - (k_start + k_len - 1)) >= window:
        return False
    return True


def _local_slices(segments):
    out, at = [], 0
    for start, length in segments:
        out.append((start, length, slice(at, at + length)))
        at += length
    return out


def _exchange(tensors: list[torch.Tensor], group, send_to: int, recv_from: int):
    """Send ``tensors`` to the next rank of the ring and receive the previous rank's; returns (requests, received)."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in received]
    return dist.batch_isend_irecv(ops), received


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, group, seq_len, zigzag, window, scale):
        sp_size, sp_rank = dist.get_world_size(group), dist.get_rank(group)
        send_to = dist.get_global_rank(group, (sp_rank + 1) % sp_size)
        recv_from = dist.get_global_rank(group, (sp_rank - 1) % sp_size)
        q_segments = _local_slices(segments_of(seq_len, sp_size, sp_rank, zigzag))
        out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for step in range(sp_size):
            pending = None
            if step < sp_size - 1:  # start passing this chunk on while computing with it
                pending = _exchange([k_cur, v_cur], group, send_to, recv_from)
            owner = (sp_rank - step) % sp_size
            for ks, kl, kslice in _local_slices(segments_of(seq_len, sp_size, owner, zigzag)):
                for qs, ql, qslice in q_segments:
                    if not _visible(qs, ql, ks, kl, window):
                        continue
                    block_out, block_lse = blockwise_forward(
                        q[:, :, qslice], k_cur[:, :, kslice], v_cur[:, :, kslice], slopes, qs, ks, window, scale
                    )
                    _merge(out[:, :, qslice], lse[:, :, qslice], block_out, block_lse)
            if pending is not None:
                for request in pending[0]:
                    request.wait()
                k_cur, v_cur = pending[1]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.args = (group, seq_len, zigzag, window, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        group, seq_len, zigzag, window, scale = ctx.args
        sp_size, sp_rank = dist.get_world_size(group), dist.get_rank(group)
        send_to = dist.get_global_rank(group, (sp_rank + 1) % sp_size)
        recv_from = dist.get_global_rank(group, (sp_rank - 1) % sp_size)
        q_segments = _local_slices(segments_of(seq_len, sp_size, sp_rank, zigzag))
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dk_cur = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv_cur = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for step in range(sp_size):
            owner = (sp_rank - step) % sp_size
            for ks, kl, kslice in _local_slices(segments_of(seq_len, sp_size, owner, zigzag)):
                for qs, ql, qslice in q_segments:
                    if not _visible(qs, ql, ks, kl, window):
                        continue
                    # FlashAttention's identity: with the *merged* output and log-sum-exp, each block's
                    # gradient is computed on its own.
                    bq, bk, bv = blockwise_backward(
                        dout[:, :, qslice], q[:, :, qslice], k_cur[:, :, kslice], v_cur[:, :, kslice],
                        out[:, :, qslice], lse[:, :, qslice], slopes, qs, ks, window, scale,
                    )  # fmt: skip
                    dq[:, :, qslice] += bq
                    dk_cur[:, :, kslice] += bk
                    dv_cur[:, :, kslice] += bv
            # The chunk moves on with its gradient accumulators; after the last step only the
            # accumulators travel, and each arrives back at the rank that owns the chunk.
            moving = [dk_cur, dv_cur] if step == sp_size - 1 else [k_cur, v_cur, dk_cur, dv_cur]
            requests, received = _exchange(moving, group, send_to, recv_from)
            for request in requests:
                request.wait()
            if step == sp_size - 1:
                dk_cur, dv_cur = received
            else:
                k_cur, v_cur, dk_cur, dv_cur = received
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None, None, None


class RingAttention:
    """Attention over a sequence shard by ring passing of key/value chunks (see the module docstring)."""

    def __init__(self, group, seq_len: int, zigzag: bool = False):
        self.group = group
        self.seq_len = seq_len
        self.zigzag = zigzag

    def __call__(self, q, k, v, slopes, q_offset=0, k_offset=0, window=None):
        scale = q.shape[-1] ** -0.5
        return _RingAttention.apply(q, k, v, slopes, self.group, self.seq_len, self.zigzag, window, scale)


def ring_attention(q, k, v, slopes, group, seq_len: int, zigzag: bool = False, window: Optional[int] = None):
    """Causal ALiBi attention of a sequence split over ``group``: q/k/v are this rank's ``[B, H, L/P, D]``."""
    return RingAttention(group, seq_len, zigzag)(q, k, v, slopes, window=window)


def apply_sequence_parallel(model, group, mode: str, seq_len: int, zigzag: bool = False) -> SequenceLayout:
    """Install the sequence-parallel attention on every block of ``model``; return this rank's layout."""
    sp_size, sp_rank = dist.get_world_size(group), dist.get_rank(group)
    if mode == "ulysses":
        attend = UlyssesAttention(group, model.cfg.n_head, backend=model.cfg.attention)
        layout = SequenceLayout(seq_len, sp_size, sp_rank, zigzag=False)
    else:
        attend = RingAttention(group, seq_len, zigzag)
        layout = SequenceLayout(seq_len, sp_size, sp_rank, zigzag=zigzag)
    for block in model.h:
        block.self_attention.attend = attend
    return layout


@contextmanager
def sequence_parallel_attention(
    model, group, mode: str, seq_len: int, zigzag: bool = False
) -> Iterator[SequenceLayout]:
    """``apply_sequence_parallel`` for the duration of a ``with`` block, then the blocks' own attention again.

    The evaluation stage needs this: the ring's chunk arithmetic is fixed per sequence length, so each eval length
    installs its own, and work that keeps whole sequences on one rank (passkey prompts) must find the plain
    attention back.
    """
    saved = [block.self_attention.attend for block in model.h]
    try:
        yield apply_sequence_parallel(model, group, mode, seq_len, zigzag)
    finally:
        for block, attend in zip(model.h, saved):
            block.self_attention.attend = attend
