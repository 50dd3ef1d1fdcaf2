"""Ring attention with correct ALiBi: queries stay, key/value chunks travel around the ring.

Each block's bias comes from the global positions of its query and key chunks (``q_offset``/``k_offset`` of
the block kernel), partial results merge through their log-sum-exp, and blocks the causal mask hides entirely
are skipped. The backward pass is the ring again: key/value chunks travel with their gradient accumulators
and arrive home after a full turn. With ``zigzag`` each rank holds chunks ``r`` and ``2P - 1 - r`` of 2P, so
every rank does the same causal work (``layout.segments_of``).

Each block runs the device's fused kernel: FlexAttention on CUDA (in the model's dtype, the bias in float32),
the blockwise kernel on CPU. The blockwise kernel has a backward that takes the merged output and log-sum-exp
directly; FlexAttention's block gradients come through autograd, from the gradients that reach the block's
output and log-sum-exp through the merge (``block_backward_through_autograd``).

Documents (``document_ids`` ``[B, L]``, global positions) travel with nothing: every rank holds the whole window's
ids, and each block reads the ids of its query and key positions from them (its offsets), zigzag included.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.ops.attention import uses_flex
from pretrain.ops.attention.blockwise import blockwise_backward, blockwise_forward
from pretrain.ops.attention.flex import flex_alibi_attention
from pretrain.parallel.layout import segments_of


def block_kernel(q: torch.Tensor) -> str:
    """The kernel a ring block runs for these queries: ``flex`` on CUDA (head dim >= 16), else ``blockwise``."""
    return "flex" if uses_flex(q) else "blockwise"


def block_forward(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids=None):
    """One block's ``(out, lse)``, both float32 ``[B, H, Lq, D]`` / ``[B, H, Lq]``."""
    if block_kernel(q) == "flex":
        out, lse = flex_alibi_attention(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids=document_ids)
        return out.float(), lse
    return blockwise_forward(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids)


def block_backward(dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale, document_ids=None):
    """One block's ``(dq, dk, dv)`` float32, given the *merged* output and log-sum-exp of its query rows."""
    if block_kernel(q) == "flex":
        args = (dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale)
        kernel = functools.partial(flex_alibi_attention, document_ids=document_ids)
        return block_backward_through_autograd(kernel, *args)
    return blockwise_backward(
        dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale, document_ids=document_ids
    )


def block_backward_through_autograd(kernel, dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale):
    """A block's gradients from any kernel ``(q, k, v, slopes, q_offset, k_offset, window, scale) -> (out_b, lse_b)``
    with autograd through both outputs.

    The merged output is ``out = sum_b w_b out_b`` with ``w_b = exp(lse_b - lse)``. So the gradient reaching
    ``out_b`` is ``w_b dout``, and the one reaching ``lse_b`` is ``w_b (dout . (out_b - out))`` (the weights of
    the other blocks move with ``lse`` too). The block's forward is recomputed, as FlashAttention's backward does.
    """
    with torch.enable_grad():
        qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
        out_b, lse_b = kernel(qb, kb, vb, slopes, q_offset, k_offset, window, scale)
        safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        weight = torch.where(torch.isinf(lse_b), torch.zeros_like(lse_b), torch.exp(lse_b - safe))
        d_out = weight[..., None] * dout.float()
        d_lse = weight * (dout.float() * (out_b.float() - out.float())).sum(dim=-1)
        grads = torch.autograd.grad((out_b, lse_b), (qb, kb, vb), (d_out.to(out_b.dtype), d_lse))
    return tuple(g.float() for g in grads)


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
    def forward(ctx, q, k, v, slopes, group, seq_len, zigzag, window, scale, document_ids=None):
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
                    block_out, block_lse = block_forward(
                        q[:, :, qslice], k_cur[:, :, kslice], v_cur[:, :, kslice], slopes, qs, ks, window, scale,
                        document_ids,
                    )  # fmt: skip
                    _merge(out[:, :, qslice], lse[:, :, qslice], block_out, block_lse)
            if pending is not None:
                for request in pending[0]:
                    request.wait()
                k_cur, v_cur = pending[1]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes, document_ids)
        ctx.args = (group, seq_len, zigzag, window, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes, document_ids = ctx.saved_tensors
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
                    bq, bk, bv = block_backward(
                        dout[:, :, qslice], q[:, :, qslice], k_cur[:, :, kslice], v_cur[:, :, kslice],
                        out[:, :, qslice], lse[:, :, qslice], slopes, qs, ks, window, scale, document_ids,
                    )  # fmt: skip
                    dq[:, :, qslice] += bq
                    dk_cur[:, :, kslice] += bk
                    dv_cur[:, :, kslice] += bv
            if sp_size == 1:
                break  # one rank: the chunk and its accumulators are already home; nothing is sent to itself
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
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None, None, None, None


class RingAttention:
    """Attention over a sequence shard by ring passing of key/value chunks (see the module docstring)."""

    def __init__(self, group, seq_len: int, zigzag: bool = False):
        self.group = group
        self.seq_len = seq_len
        self.zigzag = zigzag

    def __call__(self, q, k, v, slopes, q_offset=0, k_offset=0, window=None, document_ids=None):
        scale = q.shape[-1] ** -0.5
        return _RingAttention.apply(q, k, v, slopes, self.group, self.seq_len, self.zigzag, window, scale, document_ids)
