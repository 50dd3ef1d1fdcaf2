"""Activation checkpointing, applied to a model from outside (the model knows nothing of it).

Each block's forward runs under ``torch.utils.checkpoint``: its activations are not kept for the backward
pass but recomputed there, trading about a third more compute for memory that no longer grows with the
number of layers. Only the blocks' ``forward`` is wrapped, so parameter names (and checkpoints) are unchanged.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each of ``blocks`` in the backward pass while it trains; eval and inference run it plainly."""
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _block=block, _forward=forward, **kwargs):
            if not _block.training:
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
