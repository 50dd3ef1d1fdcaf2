"""The key/value cache for decoding: every earlier token's keys and values, per layer, at their global positions.

A decoding step feeds only the new tokens; their queries attend to the cached keys through the same kernels as
training (``pretrain.ops.attention``), with ``q_offset`` the position of the first new token and ``k_offset`` that
of the first cached key. The ALiBi bias ``-m_h * (i - j)`` is therefore formed from global positions at every
step, also past the training length: a bias built over the new tokens alone would be zero at every one-token
step (a bug other implementations had).

Rows of a batch need not be at the same position: each row keeps its own ``start`` (the global position of its
first cached column) and ``length`` (columns in use), so prompts of different lengths are decoded together
without padding. A forward pass groups its rows by position (``begin``): rows of one group share their offsets
and are attended in one kernel call; every other layer runs on the whole batch at once. No padding token ever
enters attention, so a prompt decodes exactly as it does alone.

With ``window`` W the cache keeps only what the next queries can see: before new tokens are written, keys older
than the last W - 1 are dropped (moved out by one copy when the buffer is full, so the cost per token stays
constant), and the kernel's ``window`` hides whatever older keys are still in the buffer. Memory is then
``W - 1 + chunk`` columns, for any length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns a cache without a window starts with; it doubles when full.
INITIAL_CAPACITY = 256


@dataclass(frozen=True)
class CacheGroup:
    """Rows of one forward pass at the same positions, and where their new tokens go in the cache.

    ``batch`` indexes the rows of the pass's input, ``rows`` the same rows of the cache (a slice when they are
    consecutive, which reads the cache without a copy). The group's new tokens have global positions
    ``position ..`` and are written at column ``column``; column 0 holds global position ``position - column``.
    """

    batch: slice | torch.Tensor
    rows: slice | torch.Tensor
    position: int
    column: int

    @property
    def key_offset(self) -> int:
        """The global position of the first cached key (the kernels' ``k_offset``)."""
        return self.position - self.column


@dataclass(frozen=True)
class CacheStep:
    """One forward pass through the cache: ``n`` new tokens for each of the cache rows ``rows``."""

    rows: list[int]
    n: int
    groups: list[CacheGroup]

    def positions(self, device=None) -> torch.Tensor:
        """Global positions of the new tokens, int64 ``[batch, n]`` (rows in the order of the pass's input)."""
        out = torch.empty(len(self.rows), self.n, dtype=torch.int64)
        for group in self.groups:
            out[_cpu_index(group.batch)] = torch.arange(group.position, group.position + self.n)
        return out.to(device)


def _cpu_index(index: slice | torch.Tensor) -> slice | torch.Tensor:
    return index if isinstance(index, slice) else index.cpu()


def _index(ids: list[int], device) -> slice | torch.Tensor:
    """A slice for consecutive ids (a view, no copy), else an index tensor."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, dtype=torch.int64, device=device)


class KVCache:
    """Keys and values ``[batch, heads, capacity, head_dim]`` for each of ``n_layer`` layers.

    ``window``: keep only the keys the next queries can see with an attention window of that many positions
    (``GPT.forward(..., window=W)``); memory stays at ``window - 1 + chunk`` columns, where ``chunk`` is the most
    tokens one pass adds for a row. Without a window the buffers start at ``capacity`` columns and double as
    needed.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        *,
        window: int | None = None,
        chunk: int = 1,
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if window is not None and window < 1:
            raise ValueError(f"window={window} is not allowed; it must be >= 1 or None")
        if chunk < 1:
            raise ValueError(f"chunk={chunk} is not allowed; it must be >= 1")
        self.window = window
        self.chunk = chunk
        if capacity is None:
            capacity = window - 1 + chunk if window is not None else max(INITIAL_CAPACITY, chunk)
        shape = (batch, n_head, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.start = [0] * batch  # global position of each row's column 0
        self.length = [0] * batch  # columns in use in each row

    @classmethod
    def for_model(cls, model, batch: int, **kwargs) -> KVCache:
        """A cache shaped for ``model`` (a ``GPT``), on its device and in its dtype unless given."""
        weight = model.word_embeddings.weight
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        cfg = model.cfg
        # Grouped-query attention: the cache holds the n_kv_head shared heads, n_head / n_kv_head times less.
        return cls(cfg.n_layer, batch, cfg.n_kv_head, cfg.head_dim, **kwargs)

    @property
    def batch(self) -> int:
        return len(self.start)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def position(self, row: int) -> int:
        """The global position the next token of ``row`` takes."""
        return self.start[row] + self.length[row]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin(self, rows: list[int] | None, n: int) -> CacheStep:
        """Make room for ``n`` new tokens in each of ``rows`` (all rows when None), and group them by position.

        A windowed cache first drops each row's keys older than the last ``window - 1`` when the new tokens
        would not fit; a cache without a window grows. Call ``end`` after the pass.
        """
        rows = list(range(self.batch)) if rows is None else list(rows)
        if not rows:
            raise ValueError("a cached forward pass needs at least one row")
        if len(set(rows)) != len(rows) or not all(0 <= r < self.batch for r in rows):
            raise ValueError(f"rows {rows} must be distinct rows of a cache of {self.batch}")
        if n < 1:
            raise ValueError(f"a cached forward pass adds at least one token per row; got {n}")
        for row in rows:
            if self.length[row] + n > self.capacity:
                self._make_room(row, n)
        by_state: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(rows):
            by_state.setdefault((self.start[row], self.length[row]), []).append(i)
        device = self.keys[0].device
        groups = []
        for (start, length), batch in by_state.items():
            cache_rows = [rows[i] for i in batch]
            groups.append(CacheGroup(_index(batch, device), _index(cache_rows, device), start + length, length))
        return CacheStep(rows, n, groups)

    def end(self, step: CacheStep) -> None:
        """Record the ``step``'s new tokens as cached (every layer has written them)."""
        for row in step.rows:
            self.length[row] += step.n

    def update(self, layer: int, group: CacheGroup, n: int, k: torch.Tensor, v: torch.Tensor):
        """Write the group's new keys and values ``[g, heads, n, head_dim]`` of ``layer``; return all its cached
        keys and values ``[g, heads, column + n, head_dim]``, the first at global position ``group.key_offset``."""
        end = group.column + n
        keys, values = self.keys[layer], self.values[layer]
        keys[group.rows, :, group.column : end] = k.to(keys.dtype)
        values[group.rows, :, group.column : end] = v.to(values.dtype)
        return keys[group.rows, :, :end], values[group.rows, :, :end]

    def _make_room(self, row: int, n: int) -> None:
        if self.window is not None:
            # The new queries see at most the last window - 1 earlier positions: drop the rest.
            keep = min(self.length[row], self.window - 1)
            drop = self.length[row] - keep
            if drop:
                for buffers in (self.keys, self.values):
                    for buf in buffers:
                        buf[row, :, :keep] = buf[row, :, drop : drop + keep].clone()
                self.start[row] += drop
                self.length[row] = keep
            if keep + n <= self.capacity:
                return
        needed = self.length[row] + n
        capacity = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                grown = buf.new_zeros(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
                grown[:, :, : buf.shape[2]] = buf
                buffers[i] = grown
