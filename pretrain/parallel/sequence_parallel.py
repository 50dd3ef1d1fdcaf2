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
block from outside, and ``SequenceLayout`` (``layout.py``) tells the training loop which tokens a rank holds.
The modes themselves are ``ulysses.py`` and ``ring.py``; a new mode is a module beside them and a branch here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from pretrain.parallel.layout import SequenceLayout
from pretrain.parallel.ring import RingAttention
from pretrain.parallel.ulysses import UlyssesAttention


def apply_sequence_parallel(model, group, mode: str, seq_len: int, zigzag: bool = False) -> SequenceLayout:
    """Install the sequence-parallel attention on every block of ``model``; return this rank's layout."""
    sp_size, sp_rank = dist.get_world_size(group), dist.get_rank(group)
    if mode == "ulysses":
        attend = UlyssesAttention(
            group, model.cfg.n_head, backend=model.cfg.attention, n_kv_head=model.cfg.n_kv_head, slopes=model.pos.slopes
        )
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
