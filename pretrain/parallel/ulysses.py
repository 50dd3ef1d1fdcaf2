"""DeepSpeed-Ulysses with correct ALiBi: an all-to-all turns a sequence shard into a head shard.

Each rank then runs the fused kernel over the whole sequence for global heads ``sp_rank * H/P .. (sp_rank + 1)
* H/P - 1``, **with the slopes of exactly those heads** (``alibi.head_slopes``): giving a rank the slopes of
heads 0..H/P - 1 is the bug BLOOM's Megatron-DeepSpeed and flashinfer once had.

Grouped-query attention: keys and values cross their own all-to-all with their ``H_kv`` heads, split the same way,
so a rank holding query heads ``sp_rank * H/P ..`` holds exactly their key/value heads ``sp_rank * H_kv/P ..``. When
``H_kv`` does not divide by ``P`` (e.g. multi-query), each key/value head is first repeated
``layout.kv_replication(H_kv, P)`` times (``P / gcd(H_kv, P)``): the copies travel, each rank receives the one head its
query heads read, and the gradients of the copies add up in the backward pass. ``print_plan`` says when this happens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pretrain.ops.alibi import head_slopes
from pretrain.ops.attention import alibi_attention
from pretrain.parallel.layout import kv_replication


class UlyssesAttention:
    """Attention over a sequence shard through DeepSpeed-Ulysses' all-to-all, with this rank's head slopes."""

    def __init__(
        self,
        group,
        n_head: int,
        backend: str = "fused",
        n_kv_head: Optional[int] = None,
        slopes: Optional[torch.Tensor] = None,
    ):
        from deepspeed.sequence.layer import DistributedAttention

        self.group = group
        self.sp_size = dist.get_world_size(group)
        self.sp_rank = dist.get_rank(group)
        self.n_head = n_head
        self.backend = backend
        # Tensors cross the all-to-all as [batch, seq, heads, dim]: scatter heads (2), gather sequence (1).
        self.dist_attn = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)
        heads_here = n_head // self.sp_size
        # Each key/value head repeated so that they split evenly over the ranks (1: no copies).
        self.kv_repeat = kv_replication(n_head if n_kv_head is None else n_kv_head, self.sp_size)
        # After the all-to-all this rank attends global heads sp_rank * H/P ...: their slopes, from the one rule
        # (or, given the model's own ``slopes`` for all heads, e.g. model.alibi_slopes=falcon, a slice of them).
        first = self.sp_rank * heads_here
        if slopes is not None:
            self.rank_slopes = slopes.detach()[first : first + heads_here].to("cpu", torch.float32)
        else:
            self.rank_slopes = head_slopes(n_head, first, heads_here)
        # This rank's slopes on each device they were asked for: copied once, not by a blocking copy every call.
        self._slopes_on: dict[torch.device, torch.Tensor] = {}
        self._slopes: Optional[torch.Tensor] = None
        self._window: Optional[int] = None
        self._document_ids: Optional[torch.Tensor] = None

    def _local(self, q, k, v, *args, **kwargs):
        # [B, L, H/P, D] for the whole sequence and this rank's heads.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        docs = {} if self._document_ids is None else {"document_ids": self._document_ids}
        out = alibi_attention(q, k, v, self._slopes, 0, 0, backend=self.backend, window=self._window, **docs)
        return out.transpose(1, 2)

    def slopes_on(self, device: torch.device) -> torch.Tensor:
        """This rank's float32 slopes on ``device``, copied there on the first call only."""
        if device not in self._slopes_on:
            self._slopes_on[device] = self.rank_slopes.to(device)
        return self._slopes_on[device]

    def __call__(self, q, k, v, slopes, q_offset=0, k_offset=0, window=None, document_ids=None):
        # ``slopes`` is the model's buffer for all heads (None: the model has no ALiBi). ``document_ids`` [B, L] cover
        # global positions: every rank holds the whole sequence's ids, what its heads attend over after the all-to-all.
        self._slopes = None if slopes is None else self.slopes_on(slopes.device)
        self._window = window
        self._document_ids = document_ids
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, L/P, H, D]; k, v [B, L/P, H_kv, D]
        if self.kv_repeat > 1:
            k, v = (t.repeat_interleave(self.kv_repeat, dim=2) for t in (k, v))
        out = self.dist_attn(q, k, v, 0)
        return out.transpose(1, 2)
