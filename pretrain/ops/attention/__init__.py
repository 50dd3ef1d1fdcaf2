"""Causal ALiBi attention behind one function, ``alibi_attention``.

Backends:
- ``fused`` (default): the bias is computed inside the kernel from global positions and slopes; no
  ``L x L`` bias and no ``L x L`` probability matrix is kept for the backward pass. On CUDA this is
  FlexAttention (an ALiBi ``score_mod`` and a causal block mask, compiled). Elsewhere, and on CUDA for a
  head dim below 16 (which torch's FlexAttention kernel rejects), it is the blockwise online-softmax kernel,
  whose backward recomputes each block from the saved log-sum-exp (FlexAttention has no backward on CPU).
- ``flex``: FlexAttention on any device, compiled (on CPU inference only, and without ``return_lse``).
- ``sdpa``: a materialized bias tensor passed to ``scaled_dot_product_attention`` (what Hugging Face's
  BLOOM does); the reference.
- ``eager``: plain softmax math, for tests.

One module per kernel: ``blockwise`` (the CPU kernel and its backward), ``flex`` (FlexAttention),
``reference`` (``sdpa`` and ``eager``); this one checks the inputs and dispatches.

Tensors are ``[batch, heads, length, head_dim]``. ``q_offset``/``k_offset`` are the global positions of
the first query and key, so a sequence shard, a ring block or a decoding step gets the right bias.

Grouped-query attention: ``k`` and ``v`` may have fewer heads than ``q`` (``H_kv`` dividing ``H``); query head ``h``
reads key/value head ``h // (H / H_kv)``, and the slopes stay one per query head. FlexAttention reads the shared
head itself (``enable_gqa``); the blockwise kernel folds each group's query heads into the rows of one matrix product
against their shared keys (no copy of the keys or values; each block copies its queries once, ``G x rows x D``);
``sdpa`` and ``eager``, the references, repeat the keys and values.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import ATTENTION_BACKENDS
from pretrain.ops.attention.blockwise import BlockwiseAlibiAttention
from pretrain.ops.attention.flex import MIN_HEAD_DIM, flex_alibi_attention
from pretrain.ops.attention.reference import eager_attention, sdpa_attention
from pretrain.ops.documents import check_document_ids

# The names model.attention accepts (the command line checks them before any kernel is imported), and flex.
BACKENDS = ATTENTION_BACKENDS + ("flex",)


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
    document_ids: torch.Tensor | None = None,
):
    """Causal attention with the ALiBi bias ``-slopes[h] * (i - j)`` over global positions ``i``, ``j``.

    q: ``[B, H, Lq, D]``; k, v: ``[B, H_kv, Lk, D]`` (``H_kv`` dividing ``H``: grouped-query attention); slopes:
    float32 ``[H]``, or None for no bias (the baselines without ALiBi). Query ``q_offset + a`` sees key
    ``k_offset + b`` when its position is not later; with ``window`` W only its last W positions. Returns
    ``[B, H, Lq, D]``, and with ``return_lse`` also the float32 log-sum-exp of each row's scores ``[B, H, Lq]``
    (``-inf`` for a row that sees no key, whose output is zero). ``document_ids``: int64 ``[B, N]`` over global
    positions (N past the last query and key position; ``pretrain.ops.documents``): a query then sees only keys of
    its own document.
    """
    _check_inputs(q, k, v, slopes, q_offset, k_offset, backend, window)
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[0], max(q_offset + q.shape[2], k_offset + k.shape[2]))
    docs = {} if document_ids is None else {"document_ids": document_ids}
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "fused":
        if uses_flex(q):
            out, lse = flex_alibi_attention(
                q, k, v, slopes, q_offset, k_offset, window, scale, return_lse=return_lse, **docs
            )
        else:
            out, lse = BlockwiseAlibiAttention.apply(q, k, v, slopes, q_offset, k_offset, window, scale, document_ids)
    elif backend == "flex":
        if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                "backend='flex' has no backward pass on CPU in this torch; use backend='fused' to train on CPU "
                "(or run under torch.no_grad())"
            )
        out, lse = flex_alibi_attention(
            q, k, v, slopes, q_offset, k_offset, window, scale, return_lse=return_lse, **docs
        )
    elif backend == "sdpa":
        if return_lse:
            raise ValueError("return_lse=True needs backend='fused' or 'eager'; sdpa does not expose it")
        out, lse = sdpa_attention(q, k, v, slopes, q_offset, k_offset, window, scale, **docs), None
    else:
        out, lse = eager_attention(q, k, v, slopes, q_offset, k_offset, window, scale, **docs)
    return (out, lse) if return_lse else out


def uses_flex(q: torch.Tensor) -> bool:
    """Whether ``fused`` runs FlexAttention for these queries: on CUDA, for head dims its kernel supports."""
    return q.is_cuda and q.shape[-1] >= MIN_HEAD_DIM


def _check_inputs(q, k, v, slopes, q_offset, k_offset, backend, window) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} is not allowed; choose one of: {', '.join(BACKENDS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, length, head_dim]; got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim, and k's heads must divide "
            "q's (grouped-query attention) ([batch, heads, length, head_dim])"
        )
    if slopes is not None and tuple(slopes.shape) != (q.shape[1],):
        raise ValueError(f"slopes must have shape [heads] = [{q.shape[1]}]; got {tuple(slopes.shape)}")
    if q_offset < 0 or k_offset < 0:
        raise ValueError(f"q_offset={q_offset} and k_offset={k_offset} must be >= 0 (they are global positions)")
    if window is not None and window < 1:
        raise ValueError(f"window={window} is not allowed; it must be >= 1 or None")
