"""FlexAttention with an ALiBi ``score_mod``: the fused kernel on CUDA (compiled), forward only on CPU.

Three things keep it fast for every length a run asks for (training, every eval length, the windowed control,
passkey prompts, ring blocks):

- **One compiled kernel for many calls.** The offsets and the window reach ``score_mod``/``mask_mod`` as
  tensors captured by the closures, not as Python numbers baked into the graph, and lengths are dynamic: a
  new length, offset or window reuses the compiled kernel. What still compiles anew (grad mode, dtype, the
  first dynamic shape) is a handful of kernels a run. ``KERNEL_BOUND`` states how many a process may compile
  (torch's own limit, 8 per function, is less than the GPU bench needs), and the recompile limit of this one
  function is set to it. Should that limit be hit anyway, the call raises ``FlexRecompileError`` naming the
  cause: torch would otherwise run the *uncompiled* flex_attention, which builds the whole ``[B, H, L, L]``
  score matrix (48 GiB at L=32768 with 12 heads).
- **Block masks from block indices.** The mask is built from the position ranges of its 128 x 128 blocks,
  O((L/128)^2) small integers, never an ``L x L`` tensor.
- **No host-device sync per call.** Offset and window tensors are made once per value and device, and
  block masks are cached.

With document ids (``document_mask_for``) the block mask is built per batch row from each block's smallest and
largest id (still O(B (L/128)^2), never ``L x L``): a block whose queries and keys share no document is skipped,
one inside a single document is ``full``, and ``mask_mod`` compares the ids of the others. The ids reach
``mask_mod`` as a captured tensor, so new ids reuse the compiled kernel (one more kernel per grad mode and dtype).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch._dynamo

# FlexAttention's block: masks are described per BLOCK x BLOCK tile of scores.
BLOCK = 128
# torch's inductor FlexAttention kernel on CUDA rejects head dims below 16 (NotImplementedError);
# ``alibi_attention`` sends those to the blockwise kernel instead.
MIN_HEAD_DIM = 16
# The window of "no window": farther than any two positions can be.
NO_WINDOW = 1 << 62
# Block masks kept: a run needs one per (length, offset, window) it attends with; ring blocks and eval lengths
# make tens, not thousands.
MASK_CACHE_SIZE = 256
# Kernels torch may compile for flex_attention in one process: one per head count, head dim, dtype and grad mode,
# each first static and then dynamic in the length. Counted (``python -m pretrain.bench gpu --rehearse``, and
# tests/e2e/test_bench_gpu_rehearse.py, tests/e2e/test_flex_compile.py): a default ``stage=all`` compiles at most 6,
# the GPU bench at most ``BENCH_KERNELS`` (its five sections: 10 shapes x dtypes in ``flex``, one shape in
# ``attention``, the ring's blocks with and without grad, the tiny model's eval; the ``train_step`` section
# compiles in its own processes). The limit is that bound with room for a user's few extra shapes; past it the
# call is an error, never torch's dense fallback.
BENCH_KERNELS = 24
KERNEL_BOUND = 32
RECOMPILE_LIMIT = KERNEL_BOUND


class FlexRecompileError(RuntimeError):
    """FlexAttention would recompile past torch's limit and fall back to its dense, uncompiled path."""


@functools.lru_cache(maxsize=4096)
def _scalar(value: int, device: str) -> torch.Tensor:
    """An int64 0-d tensor on ``device``, made once per value: ``torch.tensor(v, device=cuda)`` syncs the host."""
    return torch.tensor(value, dtype=torch.int64, device=device)


def _mask_mod(q_offset: torch.Tensor, k_offset: torch.Tensor, window: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        distance = (q_idx + q_offset) - (kv_idx + k_offset)
        return (distance >= 0) & (distance < window)

    return mask_mod


def block_classes(q_len: int, k_len: int, q_offset: int, k_offset: int, window: int | None, device=None):
    """Which 128 x 128 blocks of scores any query sees (``partial``: some entries hidden; ``full``: none), as
    bool ``[ceil(q_len/128), ceil(k_len/128)]`` each, from the smallest and largest distance of each block."""
    w = NO_WINDOW if window is None else window
    q_first = q_offset + torch.arange(0, q_len, BLOCK, device=device)
    q_last = torch.clamp(q_first + BLOCK - 1, max=q_offset + q_len - 1)
    k_first = k_offset + torch.arange(0, k_len, BLOCK, device=device)
    k_last = torch.clamp(k_first + BLOCK - 1, max=k_offset + k_len - 1)
    nearest = q_first[:, None] - k_last[None, :]  # the smallest query - key distance in the block
    farthest = q_last[:, None] - k_first[None, :]
    any_visible = (farthest >= 0) & (nearest < w)
    full = (nearest >= 0) & (farthest < w)
    # A block cut by the end of the sequence counts as partial, as torch's create_block_mask has it: the
    # kernel then checks each entry there.
    if q_len % BLOCK:
        full[-1, :] = False
    if k_len % BLOCK:
        full[:, -1] = False
    return any_visible & ~full, full


def _as_kv_blocks(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_num_blocks [1, 1, nq], kv_indices [1, 1, nq, nk])`` int32: each query block's visible key blocks
    first, in order."""
    counts = visible.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def _document_mask_mod(q_offset, k_offset, window, document_ids):
    def mask_mod(b, h, q_idx, kv_idx):
        distance = (q_idx + q_offset) - (kv_idx + k_offset)
        same = document_ids[b, q_idx + q_offset] == document_ids[b, kv_idx + k_offset]
        return (distance >= 0) & (distance < window) & same

    return mask_mod


def _block_ranges(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest id of each 128-position block of ``ids`` ``[B, L]``: ``[B, ceil(L / 128)]`` each."""
    pad = -ids.shape[1] % BLOCK
    if pad:  # the last block repeats its last id: it changes neither its minimum nor its maximum
        ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1)
    blocks = ids.view(ids.shape[0], -1, BLOCK)
    return blocks.amin(dim=-1), blocks.amax(dim=-1)


def document_block_classes(q_len, k_len, q_offset, k_offset, window, document_ids):
    """``block_classes`` per batch row with documents: bool ``[B, nq, nk]`` each. A block is visible only if its
    queries' and keys' id ranges overlap, and full only if all of them are of one document."""
    device = document_ids.device
    partial, full = block_classes(q_len, k_len, q_offset, k_offset, window, device)
    q_min, q_max = _block_ranges(document_ids[:, q_offset : q_offset + q_len])
    k_min, k_max = _block_ranges(document_ids[:, k_offset : k_offset + k_len])
    overlap = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])
    one = (q_min == q_max)[:, :, None] & (k_min == k_max)[:, None, :] & (q_min[:, :, None] == k_min[:, None, :])
    visible = (partial | full)[None] & overlap
    full_docs = full[None] & one
    return visible & ~full_docs, full_docs


def document_block_mask(q_len, k_len, q_offset, k_offset, window, document_ids):
    """FlexAttention block mask of causal (windowed) attention inside documents (not cached: the ids change)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = document_block_classes(q_len, k_len, q_offset, k_offset, window, document_ids)
    counts = partial.sum(dim=-1, dtype=torch.int32)[:, None]
    order = torch.argsort((~partial).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
    full_counts = full.sum(dim=-1, dtype=torch.int32)[:, None]
    full_order = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
    dev = str(document_ids.device)
    mask_mod = _document_mask_mod(
        _scalar(q_offset, dev), _scalar(k_offset, dev), _scalar(window or NO_WINDOW, dev), document_ids
    )
    return BlockMask.from_kv_blocks(
        counts, order, full_counts, full_order, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )


_block_masks: OrderedDict = OrderedDict()


def alibi_block_mask(q_len, k_len, q_offset, k_offset, window, device):
    """FlexAttention block mask of causal (and windowed) attention over global positions, cached.

    Built from block indices: memory O((L/128)^2), never O(L^2). Blocks that hide no entry are ``full`` (the
    kernel skips ``mask_mod`` there); the others read offsets and window from tensors.
    """
    from torch.nn.attention.flex_attention import BlockMask

    key = (q_len, k_len, q_offset, k_offset, window, str(device))
    if key in _block_masks:
        _block_masks.move_to_end(key)
        return _block_masks[key]
    partial, full = block_classes(q_len, k_len, q_offset, k_offset, window, device)
    kv_num, kv_idx = _as_kv_blocks(partial)
    full_num, full_idx = _as_kv_blocks(full)
    dev = str(device)
    mask_mod = _mask_mod(_scalar(q_offset, dev), _scalar(k_offset, dev), _scalar(window or NO_WINDOW, dev))
    mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )
    _block_masks[key] = mask
    if len(_block_masks) > MASK_CACHE_SIZE:
        _block_masks.popitem(last=False)
    return mask


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


_compiled_flex: dict[bool, object] = {}
# Whether lengths compile as dynamic shapes (a new length reuses the kernel). ``bench gpu --rehearse`` turns it off
# on CPU: torch 2.13's CPU FlexAttention template fails to build a second dynamic-shape kernel with another head
# count or head dim in one process (g++: "'cur_qSplitSize5' was not declared in this scope"); static kernels,
# one per shape, build, and their count bounds the dynamic one from above.
dynamic_shapes = True


def compiled_flex_attention(dynamic: bool | None = None):
    """``flex_attention`` compiled once per process, with dynamic shapes unless ``dynamic_shapes`` is off."""
    dynamic = dynamic_shapes if dynamic is None else dynamic
    if dynamic not in _compiled_flex:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[dynamic]


def flex_alibi_attention(
    q, k, v, slopes, q_offset=0, k_offset=0, window=None, scale=None, compiled=True, return_lse=True, document_ids=None
):
    """``(out [B, H, Lq, D], lse [B, H, Lq] float32 or None)`` through FlexAttention; compiled unless
    ``compiled=False`` (eager flex_attention builds the dense score matrix: for tests of the masks only).

    ``return_lse=False`` skips the log-sum-exp: torch's compiled CPU kernel cannot return it. ``document_ids``:
    int64 ``[B, N]`` over global positions; a query sees only keys of its own document.
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    device = q.device
    dev = str(device)
    if document_ids is None:
        block_mask = alibi_block_mask(q.shape[2], k.shape[2], q_offset, k_offset, window, device)
    else:
        ids = document_ids.to(device)
        block_mask = document_block_mask(q.shape[2], k.shape[2], q_offset, k_offset, window, ids)
    slopes_dev = None if slopes is None else slopes.to(device=device, dtype=torch.float32)
    score_mod = alibi_score_mod(slopes_dev, _scalar(q_offset, dev), _scalar(k_offset, dev))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale)
    if k.shape[1] != q.shape[1]:
        # Grouped-query attention: the kernel reads each shared key/value head for its group of query heads, no copies.
        kwargs["enable_gqa"] = True
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if not compiled:
        result = flex_attention(q, k, v, **kwargs)
        return (result[0], result[1].lse.float()) if return_lse else (result, None)
    # Inside a compiled model (train.compile) this is a graph break: the model's graph calls this compiled
    # kernel, whose block mask and recompile guard stay host code. Tracing flex_attention into the model's
    # graph instead failed to lower on CPU (torch 2.13).
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=RECOMPILE_LIMIT):
            # torch 2.13's CPU template fails to build the dynamic-shape kernel of a document mask_mod (g++:
            # "'cur_kvSplitSize7' was not declared"); on CPU (inference only) those compile static, one per shape.
            static = document_ids is not None and not q.is_cuda
            result = compiled_flex_attention(False if static else None)(q, k, v, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise FlexRecompileError(
            f"FlexAttention was compiled {RECOMPILE_LIMIT} times in this process (flex.KERNEL_BOUND; now for "
            f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, grad {'on' if torch.is_grad_enabled() else 'off'}); "
            "refusing torch's fallback to uncompiled flex_attention, which builds the whole [B, H, Lq, Lk] score "
            "matrix. Raise pretrain.ops.attention.flex.RECOMPILE_LIMIT if these shapes are all needed."
        ) from err
    return (result[0], result[1].lse.float()) if return_lse else (result, None)
