"""FlexAttention with an ALiBi ``score_mod``: the fused kernel on CUDA (compiled), forward only on CPU."""

from __future__ import annotations

import torch

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
