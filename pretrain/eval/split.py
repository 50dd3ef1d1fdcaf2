"""How the ranks share the evaluation: windows dealt round-robin over the data-parallel groups, and with
``parallel.sp_size > 1`` each window's tokens split over the ranks of a sequence-parallel group (Ulysses or ring
attention, global positions, as in training)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pretrain.config import ParallelConfig
from pretrain.eval.windows import LENGTH_MULTIPLES, Window, shard
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext, ParallelGroups, build_parallel_groups
from pretrain.parallel.layout import SequenceLayout, check_split
from pretrain.parallel.sequence_parallel import sequence_parallel_attention


@dataclass(frozen=True)
class EvalSplit:
    """Windows dealt round-robin over the data-parallel groups; with ``sp_size > 1`` each window's tokens split
    over the ranks of a sequence-parallel group (``parallel.sp_mode``, ``parallel.zigzag``)."""

    groups: ParallelGroups
    mode: str = "ulysses"
    zigzag: bool = False

    @property
    def sequence_parallel(self) -> bool:
        return self.groups.sp_size > 1

    def windows(self, windows: list[Window]) -> list[Window]:
        """This rank's windows: every rank of a sequence-parallel group gets the same ones."""
        return shard(windows, self.groups.dp_rank, self.groups.dp_size)

    def batch_size(self, batch_tokens: int, length: int) -> int:
        """Windows per forward pass: each rank holds ``length / sp_size`` tokens of each, at most ``batch_tokens``
        in all (and at least one window)."""
        return max(1, batch_tokens * self.groups.sp_size // length)

    @contextmanager
    def layout(self, model: GPT, length: int) -> Iterator[SequenceLayout | None]:
        """The sequence-parallel attention installed for windows of ``length`` (None without sequence parallelism)."""
        if not self.sequence_parallel:
            yield None
            return
        with sequence_parallel_attention(model, self.groups.sp_group, self.mode, length, self.zigzag) as layout:
            yield layout

    def describe(self) -> dict:
        return {
            "sp_size": self.groups.sp_size,
            "sp_mode": self.mode if self.sequence_parallel else None,
            "zigzag": self.sequence_parallel and self.mode == "ring" and self.zigzag,
            "data_parallel_groups": self.groups.dp_size,
        }


def check_eval_split(
    lengths: list[int], explicit: bool, seq_len: int, heads: dict[str, int], pcfg: ParallelConfig, world_size: int
) -> None:
    """Raise ConfigError, before any work, when ``parallel.*`` cannot split the eval windows.

    Every length must cut into equal chunks (a multiple of ``sp_size``, or ``2 * sp_size`` for the zigzag ring);
    a length that cannot is an error, not a skip: the user asked for it, and a curve silently missing a point
    reads as a result. ``heads`` maps each evaluated model's name to its head count (Ulysses splits heads). The
    rule is training's (``parallel.layout.check_split``).
    """
    multiples = ", ".join(map(str, LENGTH_MULTIPLES))
    defaults = f"the default eval lengths (model.seq_len={seq_len} x {multiples}) hold "
    where = "eval.lengths holds " if explicit else defaults
    remedy = "or parallel=none to score whole windows on each rank"
    check_split(pcfg, world_size, lengths, heads, where, "window", remedy)


def make_split(pcfg: ParallelConfig, ctx: DistContext) -> EvalSplit:
    """The process groups of ``parallel.*`` (the train stage's, when it ran in this process)."""
    return EvalSplit(build_parallel_groups(ctx, pcfg.sp_size), pcfg.sp_mode, pcfg.zigzag)
