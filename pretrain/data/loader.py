"""The training data loader: shuffled windows of ``seq_len + 1`` tokens from a split's shards, resumable.

Each epoch cuts every shard of the train split into windows starting at ``offset + k * seq_len`` (the offset,
drawn per epoch, moves window boundaries between epochs; a window never crosses a shard's end), numbers them
across shards, and visits them in the order of a keyed bijection of those numbers (``pretrain.data.shuffle``):
both come from ``(seed, epoch)`` alone, and nothing per window is stored, so memory per rank is O(shards) and the
first batch is ready at once whatever the corpus's size. Shards are memory-mapped without readahead. A global
batch is the next ``micro_batch_size * dp_size`` windows of that order, and data-parallel rank r of n takes every
n-th of them, so ranks read disjoint windows. A window
``w`` gives ``inputs = w[:-1]`` and ``targets = w[1:]``; windows run across document boundaries (EOS
separates documents), as in GPT-2.

The position is the number of windows the whole job has consumed in the current epoch: the same on every
rank, so the state of rank 0 restores every rank. A loader restored from ``state_dict()`` yields exactly
the batches an uninterrupted one would; restoring with another ``dp_size`` or ``micro_batch_size`` also
works and neither repeats nor skips a window of the epoch.

A mixture (``data=mix``) is read by ``MixtureLoader``: each window drawn from one source with its weight's
probability, from ``(seed, window number)`` alone, so it resumes exactly too, on any number of ranks. ``train_loader``
picks the loader for a prepared corpus, ``ValidationSplits`` its validation batches (one set per source of a mixture).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data.shards import ShardSet
from pretrain.data.shuffle import permute
from pretrain.errors import PipelineError

STATE_VERSION = 2
# Keeps the loader's bijections apart from other users of the same seed.
WINDOW_STREAM = 0x77696E


def shard_checksum(tokens: np.ndarray) -> str:
    """A cheap identity of a shard: its length and first and last 4096 tokens."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(len(tokens)).encode())
    digest.update(np.ascontiguousarray(tokens[:4096]).tobytes())
    digest.update(np.ascontiguousarray(tokens[-4096:]).tobytes())
    return digest.hexdigest()


def as_shards(tokens: ShardSet | str | Path, dtype: str) -> ShardSet:
    """A split given as its ShardSet, or one shard file (as ``np.memmap`` reads it)."""
    if isinstance(tokens, ShardSet):
        return tokens
    size = Path(tokens).stat().st_size // np.dtype(dtype).itemsize
    return ShardSet([(Path(tokens), size)], dtype, random_access=True)


def cheap_identity(shards: ShardSet) -> str:
    """An identity of a split read from a few tokens of each shard (the manifest's SHA-256s are the strong one)."""
    digest = hashlib.blake2b(digest_size=8)
    for index in range(len(shards.paths)):
        digest.update(shard_checksum(shards.shard(index)).encode())
    return digest.hexdigest()


class _Windows:
    """The windows of a split: per shard ``max(0, (size - seq_len) // seq_len)`` of them (room for any offset in
    ``[0, seq_len)``), numbered across shards in order."""

    def __init__(self, shards: ShardSet, seq_len: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        per_shard = np.maximum(0, (shards.sizes - seq_len) // seq_len)
        self.first = np.zeros(len(per_shard) + 1, dtype=np.int64)
        np.cumsum(per_shard, out=self.first[1:])
        self.count = int(self.first[-1])

    def read(self, numbers: np.ndarray, offset: int) -> list[np.ndarray]:
        """Windows ``numbers`` (``seq_len + 1`` tokens each) for an epoch whose windows start at ``offset``."""
        shard = np.searchsorted(self.first, numbers, side="right") - 1
        starts = offset + (numbers - self.first[shard]) * self.seq_len
        return [
            self.shards.shard(int(i))[int(s) : int(s) + self.seq_len + 1] for i, s in zip(shard, starts, strict=True)
        ]


def epoch_offset(key: list[int], seq_len: int) -> int:
    return int(np.random.default_rng(key).integers(seq_len))


class TokenWindowLoader:
    """Endless, deterministic, resumable batches ``(inputs, targets)``, each int64 ``[micro_batch_size, seq_len]``.

    ``tokens`` is the train split (a ShardSet, or one shard's path); ``identity`` names it in the state, so that a
    restore onto other data is refused (the training loop passes the manifest's digest of the split)."""

    def __init__(
        self,
        tokens: ShardSet | str | Path,
        dtype: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        identity: str | None = None,
    ) -> None:
        assert 0 <= dp_rank < dp_size, f"dp_rank={dp_rank} is outside dp_size={dp_size}"
        self.shards = as_shards(tokens, dtype)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.windows = _Windows(self.shards, seq_len)
        self.n_windows = self.windows.count
        self.n_tokens = len(self.shards)
        self.windows_per_step = micro_batch_size * dp_size
        if self.n_windows < self.windows_per_step:
            where = self.shards.paths[0].parent if self.shards.paths else "the train split"
            raise PipelineError(
                f"the train split ({where}) holds {self.n_tokens:,} tokens in {len(self.shards.paths)} shard(s): too "
                f"few for one batch of {micro_batch_size} (train.micro_batch_size) x {dp_size} (data-parallel ranks) "
                f"windows of {seq_len + 1} tokens (model.seq_len + 1); use a larger corpus or smaller sizes"
            )
        self.checksum = identity if identity is not None else cheap_identity(self.shards)
        self.epoch = 0
        self.consumed = 0  # windows of this epoch taken by all ranks together

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch; the windows left over at an epoch's end are skipped."""
        return self.n_windows // self.windows_per_step

    def epoch_order(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The window numbers visited at ``positions`` of epoch ``epoch`` (a bijection of ``0 .. n_windows - 1``)."""
        return permute(positions, self.n_windows, (self.seed, WINDOW_STREAM, epoch))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(inputs, targets)``, int64 ``[micro_batch_size, seq_len]``."""
        if self.consumed + self.windows_per_step > self.n_windows:
            self.epoch, self.consumed = self.epoch + 1, 0
        positions = np.arange(self.consumed, self.consumed + self.windows_per_step)[self.dp_rank :: self.dp_size]
        numbers = self.epoch_order(self.epoch, positions)
        offset = epoch_offset([self.seed, self.epoch], self.seq_len)
        self.consumed += self.windows_per_step
        return inputs_and_targets(self.windows.read(numbers, offset))

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
            "n_tokens": self.n_tokens,
            "checksum": self.checksum,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state of another split, seed or seq_len raises a ValueError naming it."""
        check_version(state)
        check_same_stream(
            state,
            self.state_dict(),
            (
                ("n_tokens", "a different train split (another corpus or tokenizer)"),
                ("checksum", "a different train split (another corpus or tokenizer)"),
                ("seq_len", "another model.seq_len"),
                ("seed", "another train.seed"),
            ),
        )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])


def check_version(state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"cannot resume the data loader: its state is of version {state.get('version')!r}, this version reads "
            f"{STATE_VERSION} (the loader of sharded corpora visits windows in another order); start a new run from "
            "the weights with train.init_from"
        )


def inputs_and_targets(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``seq_len + 1`` tokens as int64 ``(inputs, targets)`` ``[n, seq_len]``: targets are inputs moved by
    one token."""
    batch = torch.from_numpy(np.stack(windows).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def check_same_stream(saved: dict[str, Any], mine: dict[str, Any], keys) -> None:
    """ValueError naming the first of ``keys`` (``(key, what it means)``) on which a saved loader state differs."""
    for key, what in keys:
        if saved[key] != mine[key]:
            raise ValueError(
                f"cannot resume the data loader: the checkpoint was made with {what} "
                f"({key}={saved[key]!r}, now {mine[key]!r})"
            )


def val_batches(
    shard_path: ShardSet | str | Path,
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
    tokens = as_shards(shard_path, dtype)
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    per_rank = n_windows // micro_batch_size // dp_size
    if per_rank == 0:
        raise PipelineError(
            f"the validation split ({_where(tokens)}) holds {len(tokens):,} tokens: too few for one batch of "
            f"{micro_batch_size} x {dp_size} windows of {seq_len + 1} tokens; raise data.val_fraction or lower "
            "the batch size"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for i in range(per_rank):
        first = (i * dp_size + dp_rank) * micro_batch_size
        starts = (first + np.arange(micro_batch_size)) * seq_len
        windows = np.stack([tokens[int(s) : int(s) + seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _where(shards: ShardSet) -> str:
    return str(shards.paths[0].parent) if shards.paths else "no shards"


# ---------------------------------------------------------------- weighted mixtures (data=mix)

# The source of each window is drawn in blocks of this many windows, each block from (seed, block) alone.
MIX_BLOCK = 4096
# Keeps the mixture's random streams apart from TokenWindowLoader's (seed, epoch) ones.
MIX_STREAM = 0x6D6978


class _SourceWindows:
    """The endless window stream of one source: window ``j`` is in epoch ``j // n_windows``, whose windows start at a
    per-epoch offset and are visited in the order of a per-epoch bijection, both from ``(seed, source, epoch)``."""

    def __init__(self, shards: ShardSet, seq_len: int, seed: int, index: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        self.key = [seed, MIX_STREAM, index]
        self.windows = _Windows(shards, seq_len)
        self.n_windows = self.windows.count

    def window(self, j: int) -> np.ndarray:
        epoch, position = divmod(j, self.n_windows)
        number = permute(position, self.n_windows, (*self.key, epoch))
        return self.windows.read(number, epoch_offset([*self.key, epoch], self.seq_len))[0]


class MixtureLoader:
    """Batches like TokenWindowLoader's, each window drawn from one source of a mixture with its weight's probability.

    The job's windows are numbered 0, 1, 2, ... across global batches; window k comes from source ``s_k``, drawn from
    ``(seed, k // MIX_BLOCK)`` alone, and is the next unread window of that source's own shuffled stream
    (``_SourceWindows``). A global batch is the next ``micro_batch_size * dp_size`` windows and rank r of n takes every
    n-th of them, so the stream depends on neither the number of ranks nor the batch shape: the state (windows drawn
    in all, and from each source) restores it exactly, with another ``dp_size`` too.
    """

    def __init__(
        self,
        sources: list[tuple[str, ShardSet | str | Path, float]],
        dtype: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        identities: list[str] | None = None,
    ) -> None:
        assert 0 <= dp_rank < dp_size, f"dp_rank={dp_rank} is outside dp_size={dp_size}"
        self.labels = [label for label, _, _ in sources]
        weights = np.asarray([weight for _, _, weight in sources], dtype=np.float64)
        if len(sources) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise PipelineError(f"a mixture needs sources with weights >= 0, not all 0 (got {weights.tolist()})")
        self.weights = weights.tolist()
        self.probabilities = weights / weights.sum()
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.windows_per_step = micro_batch_size * dp_size
        self.streams = []
        for index, (label, path, weight) in enumerate(sources):
            stream = _SourceWindows(as_shards(path, dtype), seq_len, seed, index)
            if weight > 0 and stream.n_windows == 0:
                raise PipelineError(
                    f"the train split of source {label!r} ({_where(stream.shards)}) holds {len(stream.shards):,} "
                    "tokens: too few for "
                    f"one window of {seq_len + 1} tokens (model.seq_len + 1); give it more documents or weight 0"
                )
            self.streams.append(stream)
        if identities is None:
            identities = [cheap_identity(stream.shards) for stream in self.streams]
        digest = hashlib.blake2b(digest_size=8)
        for label, identity, weight in zip(self.labels, identities, self.weights, strict=True):
            digest.update(f"{label}:{weight!r}:{identity};".encode())
        self.checksum = digest.hexdigest()
        self.n_tokens = sum(len(stream.shards) for stream in self.streams)
        self.position = 0  # windows the whole job has drawn
        self.drawn = np.zeros(len(sources), dtype=np.int64)  # of those, from each source
        self._block: tuple[int, np.ndarray] | None = None

    def _block_sources(self, block: int) -> np.ndarray:
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, MIX_STREAM, len(self.streams), block])
            self._block = (block, rng.choice(len(self.streams), size=MIX_BLOCK, p=self.probabilities))
        return self._block[1]

    def sources_of(self, first: int, count: int) -> np.ndarray:
        """The source index of the job's windows ``first .. first + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            block, at = divmod(first + done, MIX_BLOCK)
            take = min(count - done, MIX_BLOCK - at)
            out[done : done + take] = self._block_sources(block)[at : at + take]
            done += take
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(inputs, targets)``, int64 ``[micro_batch_size, seq_len]``."""
        chosen = self.sources_of(self.position, self.windows_per_step)
        within = np.empty_like(chosen)
        for source in range(len(self.streams)):
            mask = chosen == source
            within[mask] = self.drawn[source] + np.arange(int(mask.sum()))
        mine = slice(self.dp_rank, None, self.dp_size)
        windows = [self.streams[s].window(int(j)) for s, j in zip(chosen[mine], within[mine], strict=True)]
        self.drawn += np.bincount(chosen, minlength=len(self.streams))
        self.position += self.windows_per_step
        return inputs_and_targets(windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position, identical on every rank, plus what a restore must match (the sources, weights, shards)."""
        return {
            "version": STATE_VERSION,
            "kind": "mixture",
            "sources": list(self.labels),
            "weights": list(self.weights),
            "seed": self.seed,
            "position": self.position,
            "drawn": self.drawn.tolist(),
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
            "checksum": self.checksum,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a state of another mixture, seed or seq_len raises a ValueError naming it."""
        check_version(state)
        if state.get("kind") != "mixture":
            raise ValueError("cannot resume the data loader: the checkpoint was trained on one corpus, not a mixture")
        check_same_stream(
            state,
            self.state_dict(),
            (
                ("sources", "other sources (data.sources)"),
                ("weights", "other weights (data.sources)"),
                ("n_tokens", "different train shards (another corpus or tokenizer)"),
                ("checksum", "different train shards (another corpus or tokenizer)"),
                ("seq_len", "another model.seq_len"),
                ("seed", "another train.seed"),
            ),
        )
        self.position = int(state["position"])
        self.drawn = np.asarray(state["drawn"], dtype=np.int64)


def train_loader(
    corpus, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1
) -> TokenWindowLoader | MixtureLoader:
    """The training loader of a prepared corpus: a MixtureLoader over a mixture's sources, else a TokenWindowLoader."""
    if corpus.sources:
        sources = [(source.label, source.train, source.weight) for source in corpus.sources]
        identities = [source.identity for source in corpus.sources]
        return MixtureLoader(sources, corpus.dtype, seq_len, micro_batch_size, seed, dp_rank, dp_size, identities)
    return TokenWindowLoader(
        corpus.train, corpus.dtype, seq_len, micro_batch_size, seed, dp_rank, dp_size, corpus.split_digest("train")
    )


class ValidationSplits:
    """The validation batches of a corpus (``val_batches``): its one split, or one per source of a mixture.

    Made when training starts, so that a split too small for one batch fails then, not mid-run. ``losses`` scores
    them: the corpus's validation loss and, for a mixture, ``{"loss/<label>": ...}`` per source; the mixture's loss is
    the mean of its sources' losses weighted as training draws them (a source of weight 0 is reported, not counted).
    """

    def __init__(
        self,
        corpus,
        seq_len: int,
        micro_batch_size: int,
        max_batches: int | None = None,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if corpus.sources:
            self.splits = [(source.label, source.weight, source.val) for source in corpus.sources]
        else:
            self.splits = [(None, 1.0, corpus.val)]
        self.arguments = (corpus.dtype, seq_len, micro_batch_size, max_batches, dp_rank, dp_size)
        for _, _, path in self.splits:
            next(self.batches(path))

    def batches(self, path: ShardSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return val_batches(path, *self.arguments)

    def losses(self, score) -> tuple[float, dict[str, float]]:
        """``score(batches) -> mean loss`` applied to each split: (the validation loss, per-source losses)."""
        if len(self.splits) == 1 and self.splits[0][0] is None:
            return score(self.batches(self.splits[0][2])), {}
        by_source = {label: score(self.batches(path)) for label, _, path in self.splits}
        total = sum(weight for _, weight, _ in self.splits)
        mixed = sum(weight * by_source[label] for label, weight, _ in self.splits) / total
        return mixed, {f"loss/{label}": loss for label, loss in by_source.items()}
