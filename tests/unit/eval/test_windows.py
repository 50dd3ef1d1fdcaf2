"""Window arithmetic: which predictions each evaluation mode scores, and with how much context."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.eval.perplexity import Scores, binned_positions, position_bins, score_windows
from pretrain.eval.windows import (
    WindowError,
    default_stride,
    make_windows,
    nonoverlapping_windows,
    shard,
    shared_region,
    sliding_windows,
)


def scored(windows) -> Counter:
    """How many times each stream token is scored as a target."""
    return Counter(t for w in windows for t in w.scored_targets)


@pytest.mark.parametrize("n_tokens, length", [(101, 10), (105, 10), (11, 10), (1000, 7), (4097, 128)])
def test_nonoverlapping_scores_every_token_once(n_tokens, length):
    windows = nonoverlapping_windows(n_tokens, length)
    n_windows = (n_tokens - 1) // length
    assert len(windows) == n_windows
    # Tokens 1 .. n_windows * L, each exactly once; the tail shorter than a window is left out.
    assert scored(windows) == Counter(range(1, n_windows * length + 1))
    for w in windows:
        assert w.start % length == 0 and w.length == length and w.score_from == 0
        assert w.start + length + 1 <= n_tokens  # the last target exists
        # Context of the prediction at window position p is p + 1 tokens: 1 .. L.
        assert [w.context_of(t) for t in w.scored_targets] == list(range(1, length + 1))


@pytest.mark.parametrize(
    "n_tokens, length, stride", [(101, 10, 5), (100, 10, 3), (50, 10, 9), (12, 10, 1), (999, 16, 8)]
)
def test_sliding_scores_the_last_stride_tokens_with_at_least_l_minus_s_context(n_tokens, length, stride):
    windows = sliding_windows(n_tokens, length, stride)
    n_windows = (n_tokens - 1 - length) // stride + 1
    assert len(windows) == n_windows
    first = length - stride + 1
    # Every token from L - S + 1 on is scored exactly once, in order, up to the last whole window.
    assert scored(windows) == Counter(range(first, first + n_windows * stride))
    for k, w in enumerate(windows):
        assert (w.start, w.length, w.score_from, w.n_scored) == (k * stride, length, length - stride, stride)
        assert w.start + length + 1 <= n_tokens
        contexts = [w.context_of(t) for t in w.scored_targets]
        assert contexts == list(range(length - stride + 1, length + 1))
        assert min(contexts) >= length - stride


def test_max_tokens_takes_whole_windows_spread_over_the_stream():
    windows = nonoverlapping_windows(10_000, 100, max_tokens=1000)
    assert len(windows) == 10 and len({w.start for w in windows}) == 10
    assert all(w.start % 100 == 0 and w.start + 101 <= 10_000 for w in windows)
    assert windows[0].start <= 500 and windows[-1].start >= 9_000  # spread, not the first 1000 tokens
    assert len(nonoverlapping_windows(10_000, 100, max_tokens=1050)) == 10
    assert len(nonoverlapping_windows(10_000, 100, max_tokens=50)) == 1  # never zero windows
    assert len(nonoverlapping_windows(500, 100, max_tokens=10_000)) == 4  # the stream is the limit
    windows = sliding_windows(10_000, 100, 25, max_tokens=1000)
    assert len(windows) == 40 and sum(w.n_scored for w in windows) == 1000
    assert scored(windows) == Counter(set(scored(windows)))  # still each token at most once
    assert windows[0].start <= 200 and windows[-1].start >= 9_500


def test_lengths_sharing_a_region_score_the_same_tokens():
    n_tokens, lengths = 50_000, [128, 256, 512, 1024]
    region = shared_region(lengths, n_tokens)
    assert region == 1024
    sets = [scored(nonoverlapping_windows(n_tokens, length, max_tokens=4096, region=region)) for length in lengths]
    assert all(s == sets[0] for s in sets) and len(sets[0]) == 4096 and set(sets[0].values()) == {1}
    assert max(sets[0]) > 40_000  # four regions of 1024 spread over the stream
    # Lengths that do not divide the longest one, or that do not fit, change the region.
    assert shared_region([128, 384, 512], n_tokens) is None
    assert shared_region([128, 1024, 100_000], n_tokens) == 1024
    assert shared_region([100_000], n_tokens) is None


@pytest.mark.parametrize("make", [lambda n: nonoverlapping_windows(n, 100), lambda n: sliding_windows(n, 100, 50)])
def test_a_stream_too_short_for_one_window_is_an_error_not_a_number(make):
    with pytest.raises(WindowError, match="needs 101 tokens; the stream holds 100"):
        make(100)
    assert len(make(101)) == 1


def test_bad_stride_and_mode_dispatch():
    with pytest.raises(ValueError, match="stride=10 must be in"):
        sliding_windows(1000, 10, 10)
    assert make_windows("sliding", 1000, 10, 5, None) == sliding_windows(1000, 10, 5)
    assert make_windows("nonoverlapping", 1000, 10, None, None) == nonoverlapping_windows(1000, 10)
    assert default_stride(128) == 64


def test_shards_partition_the_windows():
    windows = nonoverlapping_windows(1001, 10)
    parts = [shard(windows, r, 3) for r in range(3)]
    assert sorted((w for p in parts for w in p), key=lambda w: w.start) == windows
    assert [len(p) for p in parts] == [34, 33, 33]


def fake_losses(kind):
    """Per-prediction 'losses' that reveal what was scored: the target's stream index, or the context size."""

    def losses(inputs, targets):
        if kind == "target":
            return targets.double()  # the stream is arange(n): a token's id is its index
        return torch.arange(1, inputs.shape[1] + 1, dtype=torch.float64).expand(inputs.shape[0], -1)

    return losses


@pytest.mark.parametrize("mode, stride", [("nonoverlapping", None), ("sliding", 3), ("sliding", 7)])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_score_windows_sums_exactly_the_scored_predictions(mode, stride, batch_size):
    stream = np.arange(200, dtype=np.int64)
    windows = make_windows(mode, len(stream), 10, stride, None)
    targets = [t for w in windows for t in w.scored_targets]
    by_target = score_windows(stream, windows, fake_losses("target"), batch_size)
    assert by_target.tokens == len(targets)
    assert by_target.loss_sum == sum(targets)
    by_context = score_windows(stream, windows, fake_losses("context"), batch_size)
    assert by_context.loss_sum == sum(w.context_of(t) for w in windows for t in w.scored_targets)
    # Loss by position: position p holds the predictions made with p + 1 tokens of context.
    first = windows[0].score_from
    assert list(by_context.position_tokens[:first]) == [0] * first
    assert list(by_context.position_tokens[first:]) == [len(windows)] * (10 - first)
    mean_by_position = by_context.position_loss[first:] / by_context.position_tokens[first:]
    assert list(mean_by_position) == list(range(first + 1, 11))


def test_position_bins_cover_every_position_once():
    for length in (1, 2, 10, 128, 4096, 3000):
        bins = position_bins(length)
        covered = [p for start, end in bins for p in range(start, end)]
        assert covered == list(range(length))
    assert position_bins(16)[:6] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 8)]
    scores = Scores(4, position_loss=np.array([4.0, 2.0, 3.0, 0.0]), position_tokens=np.array([2, 1, 1, 0]))
    assert binned_positions(scores) == [
        {"start": 0, "end": 1, "loss": 2.0, "tokens": 2},
        {"start": 1, "end": 2, "loss": 2.0, "tokens": 1},
        {"start": 2, "end": 3, "loss": 3.0, "tokens": 1},
    ]
