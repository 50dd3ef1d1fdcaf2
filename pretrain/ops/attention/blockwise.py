"""The CPU fused kernel: blockwise online-softmax ALiBi attention with its own backward pass.

No ``L x L`` tensor is built or kept: scores exist one block at a time, the bias of each block is computed
from global positions and slopes, and the backward pass recomputes each block from the saved log-sum-exp
(FlexAttention has no backward on CPU). Ring attention calls ``blockwise_forward`` / ``blockwise_backward``
on each pair of chunks.

With ``document_ids`` (int64 ``[B, >= last position + 1]`` over global positions) a query sees only keys of its own
document. Each batch row then runs on its own (rows hold different documents): a key chunk is left out when none of
its keys shares a document with the query block, its rows are narrowed to those of the chunk's documents (ids run
along the window), a chunk inside one document is computed as without documents, and the others fold the document
mask into the visibility plane that the causal mask uses (no extra pass over the block).

Grouped-query attention (``k``, ``v`` with ``H_kv`` heads, each shared by ``G = H / H_kv`` query heads): the ``G``
query heads of a group share one key matrix, so their rows of a block are folded into one ``[G x rows, D]`` operand
of a single matrix product against the shared keys (and the same for the values, and for ``dk``/``dv``, which then
sum over the group inside the product). Keys and values are never repeated; the cost is one copy per block of its
queries (and in the backward of its output gradients), ``G x rows x D`` floats against the block's ``G x rows x keys``
scores. The score buffer keeps its ``[B, H, rows, keys]`` layout, so bias, masks and softmax are as without groups.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Query rows per block of the CPU kernel; the most score elements (batch x heads x rows x keys) one block
# may hold: 2^20 float32 = 4 MiB, whatever the sequence length; and the most one head's tile of a block may
# hold: 2^17 float32 = 512 KiB, half of a core's L2 cache on the 2-core benchmark machine. Tiles stay in
# cache; 512 rows x 256 keys were fastest at 8 heads (docs/benchmarks.md), and at 2 and 4 heads 256 keys
# were 15-35% faster than the 512-1024 that the 4 MiB bound alone allows.
BLOCK_Q = 512
BLOCK_ELEMENTS = 1 << 20
HEAD_TILE_ELEMENTS = 1 << 17


# exp() of float32 is subnormal below about -87.3 and 0 below about -104; the vectorized exp takes a slow
# path for those inputs and for -inf (3-30x slower per element, measured on this 2-core CPU), and subnormal
# probabilities slow every product that reads them afterwards. ALiBi sends most far keys there. Shifted
# scores are clamped to EXP_FLOOR before the exp: a visible entry then weighs exp(-87) = 1.6e-38 instead of
# less than 1.2e-38, a difference lost in rounding against the row's largest probability (1 in the forward;
# the row's probabilities sum to 1 in the backward). Hidden entries must weigh exactly 0, so masked blocks
# multiply the probabilities by their 1/0 visibility after the exp; blocks without hidden entries need none.
EXP_FLOOR = -87.0
# The backward does not set hidden entries to -inf before the exp (they are zeroed after it), so their
# shifted score can be large and positive (a future key's bias is +slope * distance), or +inf for a row
# with lse -inf. Capping it keeps exp() finite, so that the zeroing gives 0 and not inf * 0 = nan. A visible
# entry's shifted score is at most a rounding error above 0.
EXP_CEIL = 80.0


def _visible_keys(q_first: int, q_last: int, k_offset: int, k_len: int, window: int | None) -> tuple[int, int]:
    """Index range ``[lo, hi)`` of the keys that any of the queries ``q_first..q_last`` may see."""
    hi = min(k_len, q_last - k_offset + 1)
    lo = 0 if window is None else max(0, q_first - window + 1 - k_offset)
    return lo, hi


def _key_chunk(batch_heads: int, rows: int) -> int:
    """Keys per chunk for a block of ``rows`` queries: within both element bounds, and at least 128."""
    return max(128, min(BLOCK_ELEMENTS // max(1, batch_heads * rows), HEAD_TILE_ELEMENTS // max(1, rows)))


def _blocks(q_len, k_len, batch_heads, q_offset, k_offset, window, docs=None):
    """The blocks of the CPU kernel, as ``(qs, qe, chunks)`` for each block of queries that sees any key.

    ``chunks`` lists ``(ks, ke, r0, r1, d0, masked, split)``: a key chunk, the rows ``qs + r0 .. qs + r1 - 1`` of
    the query block that see any of its keys (the others are left out of the block, which keeps the diagonal
    blocks small), the distance of the first of those rows to the first key, whether the block still hides any
    entry (only blocks that cross the diagonal or the window's edge do), and whether documents cut it (``docs``:
    the ``(query ids [Lq], key ids [Lk])`` of one batch row's local positions; a chunk none of whose keys shares a
    document with its rows is left out, and with ids that never fall the rows are narrowed to the chunk's documents).
    """
    rising = docs is not None and bool((np.diff(docs[0]) >= 0).all())
    blocks = []
    for qs in range(0, q_len, BLOCK_Q):
        qe = min(qs + BLOCK_Q, q_len)
        q_first, q_last = q_offset + qs, q_offset + qe - 1
        lo, hi = _visible_keys(q_first, q_last, k_offset, k_len, window)
        step = _key_chunk(batch_heads, qe - qs)
        chunks = []
        for ks in range(lo, hi, step):
            ke = min(ks + step, hi)
            k_first, k_last = k_offset + ks, k_offset + ke - 1
            # Causal: rows from the first key's position on; with a window, rows up to the last one whose
            # window still reaches the last key.
            r0 = max(0, k_first - q_first)
            r1 = qe - qs if window is None else min(qe - qs, k_last + window - q_first)
            split = False
            if docs is not None and r1 > r0:
                r0, r1, split = _document_rows(docs, qs, r0, r1, ks, ke, rising)
            if r1 <= r0:
                continue
            first, last = q_first + r0, q_first + r1 - 1
            masked = k_last > first or (window is not None and last - k_first >= window)
            chunks.append((ks, ke, r0, r1, first - k_first, masked, split))
        if chunks:
            blocks.append((qs, qe, chunks))
    return blocks


def _document_rows(docs, qs: int, r0: int, r1: int, ks: int, ke: int, rising: bool) -> tuple[int, int, bool]:
    """``(r0, r1, split)``: the rows ``qs + r0 .. qs + r1 - 1`` narrowed to those that may share a document with keys
    ``ks .. ke - 1`` (empty when none does), and whether the block still spans more than one document."""
    q_ids, k_ids = docs
    k_min, k_max = k_ids[ks:ke].min(), k_ids[ks:ke].max()
    rows = q_ids[qs + r0 : qs + r1]
    if rising:  # ids run along the window: the rows of the chunk's documents are one range
        r0, r1 = r0 + int(np.searchsorted(rows, k_min, "left")), r0 + int(np.searchsorted(rows, k_max, "right"))
        if r1 <= r0:
            return r0, r1, False
        rows = q_ids[qs + r0 : qs + r1]
    elif rows.max() < k_min or rows.min() > k_max:
        return r0, r0, False
    return r0, r1, not (rows.min() == rows.max() == k_min == k_max)


def _local_documents(document_ids, q_offset, q_len, k_offset, k_len, device):
    """The ids of one batch row's local query and key positions: ``(numpy pair for the block plan, float32 tensor
    pair for the masks)``, or ``(None, None)`` without documents."""
    if document_ids is None:
        return None, None
    assert document_ids.shape[0] == 1, "with documents the kernel runs one batch row at a time"
    q_ids = document_ids[0, q_offset : q_offset + q_len]
    k_ids = document_ids[0, k_offset : k_offset + k_len]
    plan = (q_ids.cpu().numpy(), k_ids.cpu().numpy())
    # float32 ids compare exactly up to 2^24 documents in a window, and write the 1/0 plane in one op.
    return plan, (q_ids.to(device, torch.float32), k_ids.to(device, torch.float32))


def _same_document(ids, planes, qs, r0, r1, ks, ke):
    """float32 1/0 ``[rows, keys]`` (in the fourth plane): whether query row and key are of one document."""
    q_ids, k_ids = ids
    out = planes[3][: (r1 - r0) * (ke - ks)].view(r1 - r0, ke - ks)
    return torch.eq(q_ids[qs + r0 : qs + r1, None], k_ids[None, ks:ke], out=out)


def _into_rows(results, b: int, batch: int, parts):
    """Batch row ``b``'s tensors ``parts`` (each ``[1, ...]``) written into ``results``, made at the first row (each
    ``[batch, ...]``): one copy of the whole result and one row's at a time, not all rows and their concatenation."""
    if results is None:
        results = tuple(part.new_empty((batch, *part.shape[1:])) for part in parts)
    for result, part in zip(results, parts):
        result[b : b + 1] = part
    return results


def _workspace(blocks, batch_heads, dim, count, device):
    """Memory every block reuses: a fresh tensor per block costs page faults (a 4 MiB block of scores, but
    also its 512 KiB distances and masks), which took longer than the arithmetic on them.

    Returns ``count`` flat float32 buffers, each large enough for the scores of the largest block; a flat
    float32 buffer for one ``[B*H, rows or keys, dim]`` product (see ``_accumulate``); three ``[rows, keys]``
    float32 planes for a block's distances, visibility and -inf mask; and the local distances ``a - b`` (row
    minus key index) of the largest block.
    """
    chunks = [chunk for _, _, block_chunks in blocks for chunk in block_chunks]
    rows = max((chunk[3] - chunk[2] for chunk in chunks), default=0)
    keys = max((chunk[1] - chunk[0] for chunk in chunks), default=0)
    size = max((batch_heads * (chunk[3] - chunk[2]) * (chunk[1] - chunk[0]) for chunk in chunks), default=0)
    buffers = [torch.empty(size, dtype=torch.float32, device=device) for _ in range(count)]
    product = torch.empty(batch_heads * max(rows, keys) * dim, dtype=torch.float32, device=device)
    planes = torch.empty(4, rows * keys, dtype=torch.float32, device=device)
    local = torch.arange(rows, dtype=torch.float32, device=device)[:, None]
    return buffers, product, planes, local - torch.arange(keys, dtype=torch.float32, device=device)


def _accumulate(dest, a, b, product):
    """``dest += a @ b`` for ``[B*H, n, m]`` tensors. The batched matmul accumulates in place in one call only
    into a contiguous tensor; into a slice of a larger one PyTorch falls back to one matmul per batch item
    (and on two threads each of those is a parallel region of its own). A slice therefore gets the product
    in ``product``'s memory first, then one addition. ``a @ b`` may be a group-folded ``[B*H_kv, G*n, m]`` of a
    ``[B*H, n, m]`` ``dest`` (see ``_fold``)."""
    if dest.is_contiguous() and a.shape[0] == dest.shape[0]:
        dest.baddbmm_(a, b)
    else:
        shape = (a.shape[0], a.shape[1], b.shape[2])
        dest.add_(torch.bmm(a, b, out=product[: dest.numel()].view(shape)).view(dest.shape))


def _fold(t, group):
    """``[B*H, rows, X]`` -> ``[B*H_kv, G*rows, X]``: the rows of a group's ``G`` query heads stacked, to multiply with
    their shared key/value head in one product (grouped-query attention). A view when ``t`` is contiguous, else one
    copy; ``t`` itself without groups."""
    if group == 1:
        return t
    return t.reshape(t.shape[0] // group, group * t.shape[1], t.shape[2])


def _block_view(buffer, batch, heads, rows, keys):
    return buffer[: batch * heads * rows * keys].view(batch, heads, rows, keys)


def _write_bias(s4, planes, local, d0, neg_slopes, masked, window, hide, same=None):
    """Write a block's additive bias into ``s4`` ``[B, H, rows, keys]``: ``-slope_h * (i - j)``, and with
    ``hide`` also -inf on its hidden entries. Returns ``(written, visible)``: whether ``s4`` now holds a bias
    (otherwise the matmul is to overwrite it) and, for a masked block, the float32 1/0 ``[rows, keys]`` of
    its visible entries (None for a block without hidden entries). ``same``: the float32 1/0 ``[rows, keys]`` of
    the entries inside one document (a block that documents cut), folded into the visibility."""
    rows, keys = s4.shape[2], s4.shape[3]
    masked = masked or same is not None
    if neg_slopes is None and not masked:
        return False, None
    distance, visible, hidden = (plane[: rows * keys].view(rows, keys) for plane in planes[:3])
    # i - j as exact float32 integers, in one small op (instead of int64 positions and a conversion).
    torch.add(local[:rows, :keys], float(d0), out=distance)
    if not masked:
        torch.mul(neg_slopes, distance, out=s4)
        return True, None
    torch.ge(distance, 0, out=visible)
    if window is not None:
        visible.mul_(torch.lt(distance, window, out=hidden))
    if same is not None:
        visible.mul_(same)
    if not hide:
        if neg_slopes is not None:
            torch.mul(neg_slopes, distance, out=s4)
        return neg_slopes is not None, visible
    # (visible - 1) / visible: 0 where visible, -1/0 = -inf where hidden.
    torch.sub(visible, 1.0, out=hidden).div_(visible)
    if neg_slopes is None:
        s4.copy_(hidden)
    else:
        # One vectorized pass: hidden + (-slope_h) * (i - j), the product rounded once as before.
        torch.addcmul(hidden, neg_slopes, distance, out=s4)
    return True, visible


def _block_scores(s4, written, qb, kc):
    """``bias + qb @ kc^T`` into ``s4``'s memory, as ``[B*H, rows, keys]``: the matmul adds to the bias in
    place (beta=1) instead of a matmul followed by another pass over the block. ``qb`` may be group-folded
    (``[B*H_kv, G*rows, D]`` against ``kc`` ``[B*H_kv, keys, D]``): the same memory, the same result layout."""
    s = s4.view(qb.shape[0], qb.shape[1], s4.shape[3])
    if written:
        s.baddbmm_(qb, kc.transpose(1, 2))
    else:
        torch.bmm(qb, kc.transpose(1, 2), out=s)
    return s4.view(-1, s4.shape[2], s4.shape[3])


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> contiguous float32 ``[B*H, L, D]``: a view when it already is, otherwise one copy
    (instead of one per block inside every matmul; the model hands in strided views of its qkv output)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]).float().contiguous()


def _negated_slopes(slopes, batch, heads, device):
    """``-slopes`` as float32 ``[B, H, 1, 1]`` (None for no bias): the bias of a block is then one broadcast
    product with the ``[rows, keys]`` distances, with the block's full shape."""
    if slopes is None:
        return None
    neg = slopes.to(device=device, dtype=torch.float32).neg().view(1, heads, 1, 1)
    return neg.expand(batch, heads, 1, 1).contiguous()


def blockwise_forward(q, k, v, slopes, q_offset=0, k_offset=0, window=None, scale=None, document_ids=None):
    """Forward of the CPU fused kernel: ``(out [B,H,Lq,D] float32, lse [B,H,Lq] float32)``.

    Online softmax over key chunks (Milakov & Gimelshein 2018; FlashAttention): only one block of scores
    exists at a time. Fully hidden key chunks (causal or window) are skipped, and so are the rows of a block
    that see none of its keys; only the blocks that cross the diagonal or the window's edge are masked (and, with
    ``document_ids``, those that documents cut; chunks of other documents are skipped).
    """
    if document_ids is not None and q.shape[0] > 1:  # each batch row holds its own documents
        results = None
        for b in range(q.shape[0]):
            row = (q[b : b + 1], k[b : b + 1], v[b : b + 1], slopes, q_offset, k_offset, window, scale)
            results = _into_rows(results, b, q.shape[0], blockwise_forward(*row, document_ids[b : b + 1]))
        return results
    batch, heads, q_len, _ = q.shape
    bh = batch * heads
    group = heads // k.shape[1]  # query heads per key/value head
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q3, k3, v3 = _as_3d(q), _as_3d(k), _as_3d(v)
    # Rows of query blocks that see no key keep these values: output 0, lse -inf.
    out = torch.zeros(bh, q_len, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((bh, q_len), float("-inf"), dtype=torch.float32, device=q.device)
    neg_slopes = _negated_slopes(slopes, batch, heads, q.device)
    plan_ids, ids = _local_documents(document_ids, q_offset, q_len, k_offset, k.shape[2], q.device)
    blocks = _blocks(q_len, k.shape[2], bh, q_offset, k_offset, window, plan_ids)
    (buffer,), product, planes, local = _workspace(blocks, bh, v.shape[-1], 1, q.device)
    for qs, qe, chunks in blocks:
        qb = q3[:, qs:qe] * scale
        row_max = torch.full((bh, qe - qs), float("-inf"), dtype=torch.float32, device=q.device)
        row_sum = torch.zeros(bh, qe - qs, dtype=torch.float32, device=q.device)
        acc = torch.zeros(bh, qe - qs, v.shape[-1], dtype=torch.float32, device=q.device)
        for ks, ke, r0, r1, d0, masked, split in chunks:
            s4 = _block_view(buffer, batch, heads, r1 - r0, ke - ks)
            same = _same_document(ids, planes, qs, r0, r1, ks, ke) if split else None
            written, visible = _write_bias(s4, planes, local, d0, neg_slopes, masked, window, hide=True, same=same)
            s = _block_scores(s4, written, _fold(qb[:, r0:r1], group), k3[:, ks:ke])
            old_max = row_max[:, r0:r1]
            new_max = torch.maximum(old_max, s.amax(dim=-1))
            # A row that has seen no key yet has max -inf; a finite shift keeps its s - shift at -inf, not nan.
            shift = new_max.clamp_min(torch.finfo(torch.float32).min)
            p = s.sub_(shift[..., None]).clamp_min_(EXP_FLOOR).exp_()
            if visible is not None:
                p.mul_(visible)  # the clamp made hidden entries 1.6e-38; they contribute exactly 0
            rescale = torch.exp(old_max - shift)
            row_sum[:, r0:r1].mul_(rescale).add_(p.sum(dim=-1))
            _accumulate(acc[:, r0:r1].mul_(rescale[..., None]), _fold(p, group), v3[:, ks:ke], product)
            old_max.copy_(new_max)
        # Whether a row saw any key is read from its maximum: its sum is not a safe test.
        seen = torch.isfinite(row_max)
        out[:, qs:qe] = torch.where(seen[..., None], acc / torch.where(seen, row_sum, 1.0)[..., None], 0.0)
        lse[:, qs:qe] = torch.where(seen, row_max + torch.log(row_sum), float("-inf"))
    return out.view(batch, heads, q_len, v.shape[-1]), lse.view(batch, heads, q_len)


def blockwise_backward(
    dout, q, k, v, out, lse, slopes, q_offset=0, k_offset=0, window=None, scale=None, dlse=None, document_ids=None
):
    """Backward of the CPU fused kernel: ``(dq, dk, dv)`` in float32, recomputing each block's scores.

    ``p = exp(s - lse)``; ``ds = p * (dp - rowsum(dout * out) + dlse)``, where ``dlse`` is the gradient
    reaching the log-sum-exp output (ring attention merges blocks through it). ``lse`` may cover more keys
    than ``k`` (ring attention passes the merged one); a row with lse -inf sees no key at all.
    """
    if document_ids is not None and q.shape[0] > 1:  # each batch row holds its own documents
        results = None
        for b in range(q.shape[0]):
            row = [t[b : b + 1] for t in (dout, q, k, v, out, lse)] + [slopes, q_offset, k_offset, window, scale]
            row_dlse = None if dlse is None else dlse[b : b + 1]
            grads = blockwise_backward(*row, dlse=row_dlse, document_ids=document_ids[b : b + 1])
            results = _into_rows(results, b, q.shape[0], grads)
        return results
    batch, heads, q_len, _ = q.shape
    bh = batch * heads
    group = heads // k.shape[1]  # query heads per key/value head
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q3, k3, v3, do3, o3 = _as_3d(q), _as_3d(k), _as_3d(v), _as_3d(dout), _as_3d(out)
    # Rows of query blocks that see no key keep dq = 0.
    dq = torch.zeros(q3.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k3.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v3.shape, dtype=torch.float32, device=q.device)
    lse3 = lse.float().reshape(bh, q_len, 1)
    dlse3 = None if dlse is None else dlse.float().reshape(bh, q_len, 1)
    neg_slopes = _negated_slopes(slopes, batch, heads, q.device)
    plan_ids, ids = _local_documents(document_ids, q_offset, q_len, k_offset, k.shape[2], q.device)
    blocks = _blocks(q_len, k.shape[2], bh, q_offset, k_offset, window, plan_ids)
    (s_buffer, ds_buffer), product, planes, local = _workspace(blocks, bh, max(q.shape[-1], v.shape[-1]), 2, q.device)
    for qs, qe, chunks in blocks:
        qb = q3[:, qs:qe] * scale
        dob = do3[:, qs:qe]
        # rowsum(dout * out) - dlse, per block of rows (no [B, H, L, D] temporary).
        delta = (dob * o3[:, qs:qe]).sum(dim=-1, keepdim=True)
        if dlse3 is not None:
            delta -= dlse3[:, qs:qe]
        # A contiguous accumulator of the block's dq: see _accumulate.
        dq_b = torch.zeros(bh, qe - qs, q3.shape[-1], dtype=torch.float32, device=q.device)
        for ks, ke, r0, r1, d0, masked, split in chunks:
            kc, vc = k3[:, ks:ke], v3[:, ks:ke]
            s4 = _block_view(s_buffer, batch, heads, r1 - r0, ke - ks)
            same = _same_document(ids, planes, qs, r0, r1, ks, ke) if split else None
            written, visible = _write_bias(s4, planes, local, d0, neg_slopes, masked, window, hide=False, same=same)
            qc, doc = _fold(qb[:, r0:r1], group), _fold(dob[:, r0:r1], group)
            s = _block_scores(s4, written, qc, kc)
            # A block holds only rows that see one of its keys, so their lse is finite: a row with lse -inf
            # (it sees no key) is in no block. (In a masked block its +inf would be capped and zeroed.)
            p = s.sub_(lse3[:, qs + r0 : qs + r1]).clamp_(EXP_FLOOR, EXP_CEIL).exp_()
            if visible is not None:
                p.mul_(visible)  # hidden entries contribute exactly 0
            _accumulate(dv[:, ks:ke], _fold(p, group).transpose(1, 2), doc, product)
            ds = _block_view(ds_buffer, 1, bh, r1 - r0, ke - ks)[0]
            torch.bmm(doc, vc.transpose(1, 2), out=_fold(ds, group))
            ds.sub_(delta[:, r0:r1]).mul_(p)
            _accumulate(dq_b[:, r0:r1], _fold(ds, group), kc, product)
            _accumulate(dk[:, ks:ke], _fold(ds, group).transpose(1, 2), qc, product)
        torch.mul(dq_b, scale, out=dq[:, qs:qe])
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


class BlockwiseAlibiAttention(torch.autograd.Function):
    """The CPU fused kernel under autograd: saves q, k, v, out and the log-sum-exp (O(L)), no scores."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, q_offset, k_offset, window, scale, document_ids=None):
        out, lse = blockwise_forward(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes, document_ids)
        ctx.args = (q_offset, k_offset, window, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, slopes, document_ids = ctx.saved_tensors
        q_offset, k_offset, window, scale = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blockwise_backward(
            dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale, dlse, document_ids
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
