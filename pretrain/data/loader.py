"""The training data loader: shuffled windows of ``seq_len + 1`` tokens from a packed shard, resumable.

Each epoch cuts the train shard into ``n_windows`` windows starting at ``offset + k * seq_len`` (the offset,
drawn per epoch, moves window boundaries between epochs) and visits them in a permuted order; both come
from ``(seed, epoch)`` alone. A global batch is the next ``micro_batch_size * dp_size`` windows of that
order, and data-parallel rank r of n takes every n-th of them, so ranks read disjoint windows. A window
``w`` gives ``inputs = w[:-1]`` and ``targets = w[1:]``; windows run across document boundaries (EOS
separates documents), as in GPT-2.

The position is the number of windows the whole job has consumed in the current epoch: the same on every
rank, so the state of rank 0 restores every rank. A loader restored from ``state_dict()`` yields exactly
the batches an uninterrupted one would; restoring with another ``dp_size`` or ``micro_batch_size`` also
works and neither repeats nor skips a window of the epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data.shards import open_shard
from pretrain.errors import PipelineError

STATE_VERSION = 1


def shard_checksum(tokens: np.ndarray) -> str:
    """A cheap identity of a shard: its length and first and last 4096 tokens."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(len(tokens)).encode())
    digest.update(np.ascontiguousarray(tokens[:4096]).tobytes())
    digest.update(np.ascontiguousarray(tokens[-4096:]).tobytes())
    return digest.hexdigest()


class TokenWindowLoader:
    """Endless, deterministic, resumable batches ``(inputs, targets)``, each int64 ``[micro_batch_size, seq_len]``."""

    def __init__(
        self,
        shard_path: str | Path,
        dtype: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        assert 0 <= dp_rank < dp_size, f"dp_rank={dp_rank} is outside dp_size={dp_size}"
        self.tokens = open_shard(shard_path, dtype)
        self.shard_path = Path(shard_path)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        # Room for any offset in [0, seq_len): offset + n_windows * seq_len + 1 <= n_tokens.
        self.n_windows = max(0, (len(self.tokens) - seq_len) // seq_len)
        self.windows_per_step = micro_batch_size * dp_size
        if self.n_windows < self.windows_per_step:
            raise PipelineError(
                f"the train shard {self.shard_path} holds {len(self.tokens):,} tokens: too few for one batch of "
                f"{micro_batch_size} (train.micro_batch_size) x {dp_size} (data-parallel ranks) windows of "
                f"{seq_len + 1} tokens (model.seq_len + 1); use a larger corpus or smaller sizes"
            )
        self.checksum = shard_checksum(self.tokens)
        self.epoch = 0
        self.consumed = 0  # windows of this epoch taken by all ranks together
        self._plan_epoch: int | None = None
        self._plan: tuple[int, np.ndarray] = (0, np.zeros(0, dtype=np.int64))

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch; the windows left over at an epoch's end are skipped."""
        return self.n_windows // self.windows_per_step

    def epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, order): where windows start this epoch, and the order ``[n_windows]`` they are visited in."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            self._plan = (offset, rng.permutation(self.n_windows))
            self._plan_epoch = epoch
        return self._plan

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(inputs, targets)``, int64 ``[micro_batch_size, seq_len]``."""
        if self.consumed + self.windows_per_step > self.n_windows:
            self.epoch, self.consumed = self.epoch + 1, 0
        offset, order = self.epoch_plan(self.epoch)
        step = order[self.consumed : self.consumed + self.windows_per_step]
        starts = offset + step[self.dp_rank :: self.dp_size] * self.seq_len
        self.consumed += self.windows_per_step
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position, identical on every rank (saving rank 0's is enough), plus what a restore must match."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
            "checksum": self.checksum,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state of another shard, seed or seq_len raises a ValueError naming it."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key, what in (
            ("n_tokens", "a different train shard (another corpus or tokenizer)"),
            ("checksum", "a different train shard (another corpus or tokenizer)"),
            ("seq_len", "another model.seq_len"),
            ("seed", "another train.seed"),
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data loader: the checkpoint was made with {what} "
                    f"({key}={state[key]!r}, now {mine[key]!r})"
                )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])


def val_batches(
    shard_path: str | Path,
    dtype: str,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation shard in order: consecutive windows ``[k * seq_len, (k + 1) * seq_len + 1)`` in batches of
    ``micro_batch_size``; batch b goes to rank ``b % dp_size``. Every rank gets the same number of batches
    (at most ``max_batches``). Yields int64 ``(inputs, targets)``, each ``[micro_batch_size, seq_len]``."""
    tokens = open_shard(shard_path, dtype)
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    per_rank = n_windows // micro_batch_size // dp_size
    if per_rank == 0:
        raise PipelineError(
            f"the validation shard {shard_path} holds {len(tokens):,} tokens: too few for one batch of "
            f"{micro_batch_size} x {dp_size} windows of {seq_len + 1} tokens; raise data.val_fraction or lower "
            "the batch size"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for i in range(per_rank):
        first = (i * dp_size + dp_rank) * micro_batch_size
        starts = (first + np.arange(micro_batch_size)) * seq_len
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
