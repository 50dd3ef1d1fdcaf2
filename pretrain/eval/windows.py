"""Window arithmetic of the evaluation stage: which tokens each window feeds, and which predictions it scores.

A window of length L starting at stream index ``s`` feeds the model ``tokens[s : s + L]`` and predicts
``tokens[s + 1 : s + L + 1]``. The prediction at window position ``p`` (0-based) is of stream token
``s + p + 1`` and sees ``p + 1`` tokens of context (itself and everything before it in the window).

- ``nonoverlapping`` (the ALiBi paper's protocol): windows side by side, ``s = 0, L, 2L, ...``, every
  position scored, so every stream token ``1 .. n_windows * L`` is predicted exactly once, with 1 to L
  tokens of context.
- ``sliding``: windows moved by a stride S < L, ``s = 0, S, 2S, ...``; only the last S positions of each
  window are scored, so every prediction sees at least ``L - S + 1`` tokens of context. Stream tokens
  ``L - S + 1 .. L - S + n_windows * S`` are each predicted exactly once; the first ``L - S`` tokens are
  context only.

Under a cap on the predictions scored (``eval.max_tokens``) a subset of these windows is taken, spread
evenly over the stream (a validation split's first documents are no fair sample of it); each scored token
is still scored once.

Where the windows come from (``eval.windows``):

- ``stream``: the concatenated validation split, documents joined by ``</s>`` as in training. A window
  longer than a document mixes unrelated documents; ``boundary_crossings`` counts the windows (and the
  scored predictions) whose context reaches into another document.
- ``documents``: only windows inside one validation document (``document_windows``). Document ``d``
  spans ``offsets[d] .. offsets[d + 1] - 1``, its last token the ``</s>``; a window of L needs L + 1 tokens
  of one document (its inputs and targets), so its inputs never hold a ``</s>`` and no prediction sees
  another document. The same two modes run inside each document that holds at least L + 1 tokens (from
  its first token; a tail shorter than a window is left out), and the cap spreads whole windows evenly
  over all of those documents' windows.

Pure functions on integers: no model, no tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pretrain.config import Config
from pretrain.errors import ConfigError


class WindowError(ValueError):
    """The token stream is too short for even one window of the asked length."""


@dataclass(frozen=True)
class Window:
    """Inputs ``tokens[start : start + length]``; the predictions at positions ``score_from .. length - 1`` count."""

    start: int
    length: int
    score_from: int

    @property
    def scored_targets(self) -> range:
        """Stream indices of the tokens this window scores (the targets of its scored positions)."""
        return range(self.start + self.score_from + 1, self.start + self.length + 1)

    @property
    def n_scored(self) -> int:
        return self.length - self.score_from

    def context_of(self, target: int) -> int:
        """Tokens of context the model sees when it predicts stream token ``target`` in this window."""
        assert target in self.scored_targets, (target, self)
        return target - self.start


def spread(n_available: int, n_taken: int) -> list[int]:
    """``n_taken`` of the indices ``0 .. n_available - 1``, evenly spaced: the middle of each of ``n_taken``
    equal parts (all of them when fewer are available)."""
    if n_taken >= n_available:
        return list(range(n_available))
    return [(2 * i + 1) * n_available // (2 * n_taken) for i in range(n_taken)]


def nonoverlapping_windows(
    n_tokens: int, length: int, max_tokens: int | None = None, region: int | None = None
) -> list[Window]:
    """Windows ``[k L, (k + 1) L)`` over a stream of ``n_tokens``, each scoring all L predictions.

    A window needs L + 1 tokens (its last target); a shorter tail is left out. ``max_tokens`` caps the
    predictions scored: the stream is cut into regions of ``region`` tokens (a multiple of L; default L),
    ``max(1, max_tokens // region)`` regions evenly spread over the stream are taken (so at least one), and
    every window inside them. Lengths that share a region size score exactly the same tokens.
    """
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    if n_tokens < length + 1:
        raise WindowError(f"a window of {length} tokens needs {length + 1} tokens; the stream holds {n_tokens:,}")
    if region is not None and region % length:
        raise ValueError(f"region={region} must be a multiple of length={length}")
    if max_tokens is None:
        return [Window(k * length, length, 0) for k in range((n_tokens - 1) // length)]
    if region is None or n_tokens < region + 1:
        region = length
    taken = spread((n_tokens - 1) // region, max(1, max_tokens // region))
    return [Window(r * region + k * length, length, 0) for r in taken for k in range(region // length)]


def sliding_windows(n_tokens: int, length: int, stride: int, max_tokens: int | None = None) -> list[Window]:
    """Windows ``[k S, k S + L)`` over a stream of ``n_tokens``, each scoring its last S predictions (S < L).

    ``max_tokens`` caps the predictions scored: ``max(1, max_tokens // S)`` windows evenly spread over the
    stream (each still scores its own S tokens, once).
    """
    if not 1 <= stride < length:
        raise ValueError(f"stride={stride} must be in [1, length={length})")
    if n_tokens < length + 1:
        raise WindowError(f"a window of {length} tokens needs {length + 1} tokens; the stream holds {n_tokens:,}")
    n_windows = (n_tokens - 1 - length) // stride + 1
    taken = range(n_windows) if max_tokens is None else spread(n_windows, max(1, max_tokens // stride))
    return [Window(k * stride, length, length - stride) for k in taken]


def shared_region(lengths: list[int], n_tokens: int) -> int | None:
    """The region size that makes every length score the same tokens under a cap: the longest length that fits
    in the stream, when every fitting length divides it (None otherwise)."""
    fitting = [length for length in lengths if length + 1 <= n_tokens]
    if not fitting:
        return None
    top = max(fitting)
    return top if all(top % length == 0 for length in fitting) else None


def make_windows(
    mode: str,
    n_tokens: int,
    length: int,
    stride: int | None,
    max_tokens: int | None,
    region: int | None = None,
    documents: np.ndarray | None = None,
) -> list[Window]:
    """The windows of ``eval.mode`` (``nonoverlapping`` or ``sliding``) at one length: over the stream, or with
    ``documents`` (the validation documents' offsets, ``eval.windows=documents``) only inside one document
    (``region`` then plays no part)."""
    if documents is not None:
        return document_windows(documents, length, mode, stride, max_tokens)
    if mode == "nonoverlapping":
        return nonoverlapping_windows(n_tokens, length, max_tokens, region)
    assert mode == "sliding", mode
    return sliding_windows(n_tokens, length, stride, max_tokens)


def document_offsets(documents: Iterable) -> np.ndarray:
    """``[n_documents + 1]`` int64 offsets of consecutive documents in the stream (document ``d`` is tokens
    ``offsets[d] .. offsets[d + 1] - 1``), from the documents themselves (``PreparedCorpus.val_documents()``)."""
    sizes = np.fromiter((len(doc) for doc in documents), dtype=np.int64)
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])


def _document_sizes(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise ValueError("document offsets must start at 0 and never decrease")
    return np.diff(offsets)


def qualifying_documents(offsets: np.ndarray, length: int) -> tuple[int, int]:
    """``(documents, tokens)``: the documents long enough for a window of ``length`` (``length + 1`` tokens, the
    ``</s>`` included), and the tokens they hold."""
    sizes = _document_sizes(offsets)
    fit = sizes >= length + 1
    return int(fit.sum()), int(sizes[fit].sum())


def document_windows(
    offsets: np.ndarray, length: int, mode: str, stride: int | None = None, max_tokens: int | None = None
) -> list[Window]:
    """Windows that lie inside one document each (``eval.windows=documents``), in stream order.

    Inside every document of at least ``length + 1`` tokens the windows of ``mode`` run from the document's first
    token: side by side scoring all L predictions (``nonoverlapping``), or moved by ``stride`` scoring the last
    ``stride`` (``sliding``: every scored prediction sees at least L - S + 1 tokens of its own document).
    ``max_tokens`` takes ``max(1, max_tokens // scored per window)`` of all those windows, evenly spread (so
    a document gets windows in proportion to its length). Raises WindowError when no document is long enough.
    """
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    if mode == "nonoverlapping":
        step, score_from = length, 0
    else:
        assert mode == "sliding", mode
        if stride is None or not 1 <= stride < length:
            raise ValueError(f"stride={stride} must be in [1, length={length})")
        step, score_from = stride, length - stride
    sizes = _document_sizes(offsets)
    starts = np.asarray(offsets, dtype=np.int64)[:-1]
    fit = np.flatnonzero(sizes >= length + 1)
    if not len(fit):
        longest = int(sizes.max()) if len(sizes) else 0
        raise WindowError(
            f"a window of {length} tokens needs a document of {length + 1} tokens (its </s> included); the "
            f"longest of the {len(sizes):,} validation documents holds {longest:,}"
        )
    # Windows per qualifying document: starts 0, step, 2 step, ... while start + length + 1 <= size.
    per_document = (sizes[fit] - length - 1) // step + 1
    first = np.concatenate([[0], np.cumsum(per_document)])
    n_windows = int(first[-1])
    taken = range(n_windows) if max_tokens is None else spread(n_windows, max(1, max_tokens // (length - score_from)))
    taken = np.asarray(taken, dtype=np.int64)
    which = np.searchsorted(first, taken, side="right") - 1
    window_starts = starts[fit[which]] + (taken - first[which]) * step
    return [Window(int(s), length, score_from) for s in window_starts]


def boundary_crossings(windows: list[Window], offsets: np.ndarray) -> tuple[int, int]:
    """``(windows, predictions)``: how many of ``windows`` hold tokens of two documents (a document starts after
    their first token, at or before their last target), and how many of their scored predictions have context
    reaching into an earlier document (its ``</s>`` among the inputs the prediction sees)."""
    if not windows:
        return 0, 0
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = np.fromiter((w.start for w in windows), dtype=np.int64, count=len(windows))
    length = np.fromiter((w.length for w in windows), dtype=np.int64, count=len(windows))
    first_target = starts + 1 + np.fromiter((w.score_from for w in windows), dtype=np.int64, count=len(windows))
    last_target = starts + length
    # The first document start after each window's first token (past the last offset: none).
    bounds = np.append(offsets, np.iinfo(np.int64).max)
    boundary = bounds[np.searchsorted(offsets, starts, side="right")]
    crossing = boundary <= last_target
    # Scored targets at or after that document start see the previous document in their context.
    tokens = np.where(crossing, last_target - np.maximum(boundary, first_target) + 1, 0)
    return int(crossing.sum()), int(np.clip(tokens, 0, None).sum())


def default_stride(length: int) -> int:
    """``eval.stride=null`` in sliding mode: half the window, so every prediction sees at least L/2 tokens."""
    return max(1, length // 2)


def shard(windows: list[Window], rank: int, world_size: int) -> list[Window]:
    """This rank's windows: window i goes to rank ``i % world_size``."""
    return windows[rank::world_size]


# eval.lengths=null: these multiples of the training length; eval.passkey_lengths=null: these.
LENGTH_MULTIPLES = (1, 2, 4, 8, 16, 32)


def eval_lengths(cfg: Config) -> list[int]:
    """``eval.lengths``, or the training length times 1, 2, 4, 8, 16, 32; the sliding stride checked against each."""
    lengths = sorted(set(cfg.eval.lengths or [cfg.model.seq_len * m for m in LENGTH_MULTIPLES]))
    if cfg.eval.mode == "sliding" and cfg.eval.stride is not None:
        short = [length for length in lengths if cfg.eval.stride >= length]
        if short:
            raise ConfigError(
                f"eval.stride={cfg.eval.stride} is not allowed: it must be smaller than every eval length, and "
                f"the lengths include {short[0]} (eval.lengths=null: model.seq_len={cfg.model.seq_len} times "
                f"{', '.join(map(str, LENGTH_MULTIPLES))})"
            )
    return lengths
