"""Which tokens of a sequence each rank of a sequence-parallel group holds, and whether a split can be made.

Pure arithmetic on positions (no communication): the attention modes (``ulysses.py``, ``ring.py``), the train
loop and the evaluation stage all cut sequences through ``SequenceLayout``, and every split is checked by
``check_split`` before any work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pretrain.config import ParallelConfig
from pretrain.errors import ConfigError


@dataclass(frozen=True)
class SequenceLayout:
    """Which global positions of a sequence of ``seq_len`` tokens rank ``sp_rank`` of ``sp_size`` holds."""

    seq_len: int
    sp_size: int
    sp_rank: int
    zigzag: bool = False

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``(global start, length)`` of each contiguous piece this rank holds, in local order."""
        return segments_of(self.seq_len, self.sp_size, self.sp_rank, self.zigzag)

    def positions(self, device=None) -> torch.Tensor:
        """Global positions of the local tokens, int64 ``[seq_len / sp_size]``."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.segments])

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of ``tokens`` ``[B, seq_len]``: ``[B, seq_len / sp_size]``."""
        return torch.cat([tokens[:, s : s + n] for s, n in self.segments], dim=1)


def segments_of(seq_len: int, sp_size: int, sp_rank: int, zigzag: bool) -> list[tuple[int, int]]:
    if zigzag:
        chunk = seq_len // (2 * sp_size)
        return [(sp_rank * chunk, chunk), ((2 * sp_size - 1 - sp_rank) * chunk, chunk)]
    chunk = seq_len // sp_size
    return [(sp_rank * chunk, chunk)]


def kv_replication(n_kv_head: int, sp_size: int) -> int:
    """How many times Ulysses repeats each key/value head so that they split evenly over ``sp_size`` ranks: 1 when
    ``n_kv_head`` divides by it, else ``sp_size / gcd(n_kv_head, sp_size)`` (multi-query on 4 ranks: 4 copies)."""
    return sp_size // math.gcd(n_kv_head, sp_size)


def sequence_parts(sp_size: int, mode: str, zigzag: bool) -> int:
    """How many equal chunks a sequence is cut into: ``sp_size``, or ``2 * sp_size`` for the zigzag ring (Ulysses
    ignores ``zigzag``). A sequence length must be a multiple of it."""
    return 2 * sp_size if (mode == "ring" and zigzag) else sp_size


def check_split(
    pcfg: ParallelConfig,
    world_size: int,
    lengths: Sequence[int],
    heads: Mapping[str, int],
    lengths_are: str,
    unit: str,
    remedy: str,
) -> None:
    """Raise ConfigError, before any work, when ``parallel.*`` cannot split sequences of ``lengths`` tokens.

    The one rule for training and evaluation: the world cuts into groups of ``sp_size`` ranks; every length
    cuts into equal chunks (a multiple of ``sp_size``, or ``2 * sp_size`` for the zigzag ring); and Ulysses
    gives each rank whole heads, so every model's head count (``heads``: a name for messages -> ``n_head``)
    divides by ``sp_size``. ``lengths_are`` starts the message on a bad length and names where the lengths come
    from ("model.seq_len=", "eval.lengths holds "), ``unit`` is what is split ("sequence", "window") and
    ``remedy`` ends the message with what else the user can do.
    """
    if pcfg.sp_size == 1:
        return
    parts = sequence_parts(pcfg.sp_size, pcfg.sp_mode, pcfg.zigzag)
    bad = [length for length in lengths if length % parts]
    if bad:
        if parts == pcfg.sp_size:
            rule = f"a multiple of parallel.sp_size={pcfg.sp_size} ({pcfg.sp_mode}: one equal chunk per rank)"
        else:
            rule = f"a multiple of 2 * parallel.sp_size = {parts} (zigzag ring: two equal chunks per rank)"
        near = " or ".join(str(n) for n in (bad[0] // parts * parts, -(-bad[0] // parts) * parts) if n > 0)
        raise ConfigError(
            f"{lengths_are}{', '.join(map(str, bad))}: with each {unit} split over {pcfg.sp_size} ranks every {unit} "
            f"length must be {rule}; for {bad[0]} use {near} ({remedy})"
        )
    if pcfg.sp_mode == "ulysses":
        for name, n_head in heads.items():
            if n_head % pcfg.sp_size:
                raise ConfigError(
                    f"{name} has model.n_head={n_head}, not divisible by parallel.sp_size={pcfg.sp_size}; Ulysses "
                    "gives each rank n_head / sp_size whole heads (use parallel.sp_mode=ring, or another sp_size)"
                )
    if world_size % pcfg.sp_size:
        raise ConfigError(
            f"parallel.sp_size={pcfg.sp_size} does not divide the world size {world_size}; "
            "the world is split into data-parallel groups of sp_size ranks"
        )
