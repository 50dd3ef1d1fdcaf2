"""Causal ALiBi attention behind one function, ``alibi_attention``.

Backends:
- ``fused`` (default): the bias is computed inside the kernel from global positions and slopes; no
  ``L x L`` bias and no ``L x L`` probability matrix is kept for the backward pass. On CUDA this is
  FlexAttention (an ALiBi ``score_mod`` and a causal block mask, compiled). Elsewhere it is the blockwise
  online-softmax kernel below, whose backward recomputes each block from the saved log-sum-exp
  (FlexAttention has no backward on CPU).
- ``sdpa``: a materialized bias tensor passed to ``scaled_dot_product_attention`` (what Hugging Face's
  BLOOM does); the reference.
- ``eager``: plain softmax math, for tests.

Tensors are ``[batch, heads, length, head_dim]``. ``q_offset``/``k_offset`` are the global positions of
the first query and key, so a sequence shard, a ring block or a decoding step gets the right bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.alibi import alibi_bias, causal_mask, positions

BACKENDS = ("fused", "sdpa", "eager")

# Query rows per block of the CPU kernel, and the most score elements (batch x heads x rows x keys) one
# block may hold: 2^20 float32 = 4 MiB, whatever the sequence length. Small tiles stay in cache; on a
# 2-core CPU, 512 rows x 256 keys (8 heads) were fastest at L=4096 (docs/benchmarks.md).
BLOCK_Q = 512
BLOCK_ELEMENTS = 1 << 20


def alibi_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor | None,
    q_offset: int = 0,
    k_offset: int = 0,
    backend: str = "fused",
    *,
    window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Causal attention with the ALiBi bias ``-slopes[h] * (i - j)`` over global positions ``i``, ``j``.

    q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; slopes: float32 ``[H]``, or None for no bias (the
    baselines without ALiBi). Query ``q_offset + a`` sees key ``k_offset + b`` when its position is not
    later; with ``window`` W only its last W positions. Returns ``[B, H, Lq, D]``, and with
    ``return_lse`` also the float32 log-sum-exp of each row's scores ``[B, H, Lq]`` (``-inf`` for a row
    that sees no key, whose output is zero).
    """
    _check_inputs(q, k, v, slopes, q_offset, k_offset, backend, window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "fused":
        if q.is_cuda:
            out, lse = flex_alibi_attention(q, k, v, slopes, q_offset, k_offset, window, scale)
        else:
            out, lse = BlockwiseAlibiAttention.apply(q, k, v, slopes, q_offset, k_offset, window, scale)
    elif backend == "sdpa":
        if return_lse:
            raise ValueError("return_lse=True needs backend='fused' or 'eager'; sdpa does not expose it")
        out, lse = _sdpa_attention(q, k, v, slopes, q_offset, k_offset, window, scale), None
    else:
        out, lse = _eager_attention(q, k, v, slopes, q_offset, k_offset, window, scale)
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, slopes, q_offset, k_offset, backend, window) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} is not allowed; choose one of: {', '.join(BACKENDS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, length, head_dim]; got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim "
            "([batch, heads, length, head_dim])"
        )
    if slopes is not None and tuple(slopes.shape) != (q.shape[1],):
        raise ValueError(f"slopes must have shape [heads] = [{q.shape[1]}]; got {tuple(slopes.shape)}")
    if q_offset < 0 or k_offset < 0:
        raise ValueError(f"q_offset={q_offset} and k_offset={k_offset} must be >= 0 (they are global positions)")
    if window is not None and window < 1:
        raise ValueError(f"window={window} is not allowed; it must be >= 1 or None")


def _block_scores(qb, kb, slopes, q_pos, k_pos, window):
    """Scores of one block, float32 ``[B, H, rows, keys]``: ``q.k`` (q already scaled), the bias, the mask."""
    s = torch.matmul(qb, kb.transpose(-1, -2))
    distance = q_pos[:, None] - k_pos[None, :]
    if slopes is not None:
        # s += -slope_h * (i - j) in one pass, without an [H, rows, keys] bias temporary; the distance is an
        # exact integer, the product is formed in float32.
        s.addcmul_(slopes.to(torch.float32).view(-1, 1, 1), distance.to(torch.float32), value=-1.0)
    # Blocks wholly below the diagonal (and inside the window) need no mask.
    q_first, q_last, k_first, k_last = int(q_pos[0]), int(q_pos[-1]), int(k_pos[0]), int(k_pos[-1])
    if k_last > q_first or (window is not None and q_last - k_first >= window):
        s.masked_fill_(~causal_mask(q_pos, k_pos, window), float("-inf"))
    return s


def _visible_keys(q_first: int, q_last: int, k_offset: int, k_len: int, window: int | None) -> tuple[int, int]:
    """Index range ``[lo, hi)`` of the keys that any of the queries ``q_first..q_last`` may see."""
    hi = min(k_len, q_last - k_offset + 1)
    lo = 0 if window is None else max(0, q_first - window + 1 - k_offset)
    return lo, hi


def _key_chunk(batch_heads: int, rows: int) -> int:
    return max(128, BLOCK_ELEMENTS // max(1, batch_heads * rows))


def blockwise_forward(q, k, v, slopes, q_offset=0, k_offset=0, window=None, scale=None):
    """Forward of the CPU fused kernel: ``(out [B,H,Lq,D] float32, lse [B,H,Lq] float32)``.

    Online softmax over key chunks (Milakov & Gimelshein 2018; FlashAttention): only one block of scores
    exists at a time. Fully hidden key chunks (causal or window) are skipped.
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(batch, heads, q_len, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
    q_pos_all = positions(q_offset, q_len, q.device)
    k_pos_all = positions(k_offset, k_len, q.device)
    for qs in range(0, q_len, BLOCK_Q):
        qe = min(qs + BLOCK_Q, q_len)
        lo, hi = _visible_keys(q_offset + qs, q_offset + qe - 1, k_offset, k_len, window)
        if hi <= lo:
            continue
        qb = q[:, :, qs:qe].float() * scale
        q_pos = q_pos_all[qs:qe]
        row_max = torch.full((batch, heads, qe - qs), float("-inf"), device=q.device)
        row_sum = torch.zeros(batch, heads, qe - qs, device=q.device)
        acc = torch.zeros(batch, heads, qe - qs, v.shape[-1], device=q.device)
        step = _key_chunk(batch * heads, qe - qs)
        for ks in range(lo, hi, step):
            ke = min(ks + step, hi)
            s = _block_scores(qb, k[:, :, ks:ke].float(), slopes, q_pos, k_pos_all[ks:ke], window)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            # A row that has seen no key yet has max -inf; shift it by 0 so exp() gives 0, not nan.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            p = s.sub_(shift[..., None]).exp_()
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + torch.matmul(p, v[:, :, ks:ke].float())
            row_max = new_max
        seen = row_sum > 0
        out[:, :, qs:qe] = torch.where(seen[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, qs:qe] = torch.where(seen, row_max + torch.log(row_sum.clamp_min(1e-30)), float("-inf"))
    return out, lse


def blockwise_backward(dout, q, k, v, out, lse, slopes, q_offset=0, k_offset=0, window=None, scale=None, dlse=None):
    """Backward of the CPU fused kernel: ``(dq, dk, dv)`` in float32, recomputing each block's scores.

    ``p = exp(s - lse)``; ``ds = p * (dp - rowsum(dout * out) + dlse)``, where ``dlse`` is the gradient
    reaching the log-sum-exp output (ring attention merges blocks through it).
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    delta = (dout.float() * out.float()).sum(dim=-1)
    if dlse is not None:
        delta = delta - dlse.float()
    # Rows that see no key have lse -inf; +inf makes their p exactly 0.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    q_pos_all = positions(q_offset, q_len, q.device)
    k_pos_all = positions(k_offset, k_len, q.device)
    for qs in range(0, q_len, BLOCK_Q):
        qe = min(qs + BLOCK_Q, q_len)
        lo, hi = _visible_keys(q_offset + qs, q_offset + qe - 1, k_offset, k_len, window)
        if hi <= lo:
            continue
        qb = q[:, :, qs:qe].float() * scale
        dob = dout[:, :, qs:qe].float()
        q_pos = q_pos_all[qs:qe]
        step = _key_chunk(batch * heads, qe - qs)
        for ks in range(lo, hi, step):
            ke = min(ks + step, hi)
            kc, vc = k[:, :, ks:ke].float(), v[:, :, ks:ke].float()
            s = _block_scores(qb, kc, slopes, q_pos, k_pos_all[ks:ke], window)
            p = s.sub_(lse_safe[:, :, qs:qe, None]).exp_()
            dv[:, :, ks:ke] += torch.matmul(p.transpose(-1, -2), dob)
            ds = torch.matmul(dob, vc.transpose(-1, -2)).sub_(delta[:, :, qs:qe, None]).mul_(p)
            dq[:, :, qs:qe] += torch.matmul(ds, kc)
            dk[:, :, ks:ke] += torch.matmul(ds.transpose(-1, -2), qb)
    dq *= scale
    return dq, dk, dv


class BlockwiseAlibiAttention(torch.autograd.Function):
    """The CPU fused kernel under autograd: saves q, k, v, out and the log-sum-exp (O(L)), no scores."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, q_offset, k_offset, window, scale):
        out, lse = blockwise_forward(q, k, v, slopes, q_offset, k_offset, window, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.args = (q_offset, k_offset, window, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        q_offset, k_offset, window, scale = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blockwise_backward(dout, q, k, v, out, lse, slopes, q_offset, k_offset, window, scale, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window):
    q_pos = positions(q_offset, q.shape[2], q.device)
    k_pos = positions(k_offset, k.shape[2], q.device)
    mask = causal_mask(q_pos, k_pos, window)
    if slopes is None:
        bias = torch.zeros(1, q.shape[2], k.shape[2], device=q.device)
    else:
        bias = alibi_bias(slopes.to(q.device), q_pos, k_pos)
    return bias, mask


def _eager_attention(q, k, v, slopes, q_offset, k_offset, window, scale):
    bias, mask = _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def _sdpa_attention(q, k, v, slopes, q_offset, k_offset, window, scale):
    bias, mask = _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window)
    # The materialized L x L additive mask, in the activation dtype, as Hugging Face's BLOOM builds it.
    attn_bias = bias.masked_fill_(~mask, float("-inf")).to(q.dtype).unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    # A row that sees no key is all -inf: SDPA gives nan there, the other backends zero.
    return torch.nan_to_num(out, nan=0.0)


# --- CUDA: FlexAttention ---------------------------------------------------------------------------------

_compiled_flex = None
_block_masks: dict = {}


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def alibi_block_mask(q_len, k_len, q_offset, k_offset, window, device):
    """FlexAttention block mask of causal (and windowed) attention over global positions, cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (q_len, k_len, q_offset, k_offset, window, str(device))
    if key not in _block_masks:

        def mask_mod(b, h, q_idx, kv_idx):
            distance = (q_idx + q_offset) - (kv_idx + k_offset)
            allowed = distance >= 0
            if window is not None:
                allowed = allowed & (distance < window)
            return allowed

        _block_masks[key] = create_block_mask(mask_mod, None, None, q_len, k_len, device=device)
    return _block_masks[key]


def alibi_score_mod(slopes: torch.Tensor | None, q_offset: torch.Tensor, k_offset: torch.Tensor):
    """FlexAttention ``score_mod`` adding ``-slopes[h] * (i - j)`` in float32 over global positions.

    The offsets are tensors, not Python ints, so a new offset (another ring block) reuses the compiled
    kernel. FlexAttention hands ``score_mod`` local indices (also under PyTorch's context parallel helper):
    the offsets are added here.
    """

    def score_mod(score, b, h, q_idx, kv_idx):
        distance = (q_idx + q_offset) - (kv_idx + k_offset)
        return score - slopes[h] * distance.to(torch.float32)

    def no_bias(score, b, h, q_idx, kv_idx):
        return score

    return no_bias if slopes is None else score_mod


def flex_alibi_attention(q, k, v, slopes, q_offset=0, k_offset=0, window=None, scale=None, compiled=True):
    """``(out, lse)`` through FlexAttention; runs the compiled kernel on CUDA (forward only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    device = q.device
    block_mask = alibi_block_mask(q.shape[2], k.shape[2], q_offset, k_offset, window, device)
    slopes_dev = None if slopes is None else slopes.to(device=device, dtype=torch.float32)
    score_mod = alibi_score_mod(
        slopes_dev,
        torch.tensor(q_offset, device=device, dtype=torch.int64),
        torch.tensor(k_offset, device=device, dtype=torch.int64),
    )
    attend = _flex() if compiled else flex_attention
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=True)
    else:
        out, aux = attend(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True)
        )
        lse = aux.lse
    return out, lse.float()
