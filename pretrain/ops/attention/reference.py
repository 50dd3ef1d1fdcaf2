"""The reference backends: a materialized ``L x L`` bias, ``sdpa`` (what Hugging Face's BLOOM does) and
``eager`` (plain softmax math). They are what the fused kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.ops.alibi import alibi_bias, causal_mask, positions


def _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window, document_ids=None):
    q_pos = positions(q_offset, q.shape[2], q.device)
    k_pos = positions(k_offset, k.shape[2], q.device)
    mask = causal_mask(q_pos, k_pos, window)
    if document_ids is not None:  # [B, 1, Lq, Lk]: and of one document
        ids = document_ids.to(q.device)
        mask = mask & (ids[:, q_pos, None] == ids[:, None, k_pos]).unsqueeze(1)
    if slopes is None:
        bias = torch.zeros(1, q.shape[2], k.shape[2], device=q.device)
    else:
        bias = alibi_bias(slopes.to(q.device), q_pos, k_pos)
    return bias, mask


def repeat_kv(q, k, v):
    """Keys and values with one head per query head (grouped-query attention, ``k``/``v`` ``[B, H_kv, L, D]``): each
    shared head repeated for its group. The references materialize the copies; the fused kernels do not."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def eager_attention(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids=None):
    k, v = repeat_kv(q, k, v)
    bias, mask = _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window, document_ids)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def sdpa_attention(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids=None):
    k, v = repeat_kv(q, k, v)
    bias, mask = _dense_bias_and_mask(q, k, slopes, q_offset, k_offset, window, document_ids)
    # The materialized L x L additive mask, as Hugging Face's BLOOM builds it, but kept in float32: in bf16
    # the bias -m * (i - j) is exact only up to 256 (at m = 0.5 keys 2040..2043 would share one value), the
    # rounding BLOOM and GPT-NeoX have. SDPA wants the mask in the inputs' dtype, so 16-bit inputs are
    # attended in float32 and the output cast back.
    if mask.dim() == 4:  # one mask per batch row (documents)
        attn_bias = torch.where(mask, bias, float("-inf"))
    else:
        attn_bias = bias.masked_fill_(~mask, float("-inf")).unsqueeze(0)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_bias, scale=scale)
    # A row that sees no key is all -inf: SDPA gives nan there, the other backends zero.
    return torch.nan_to_num(out, nan=0.0).to(q.dtype)
