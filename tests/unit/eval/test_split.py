"""Windows split over a sequence-parallel group: the shards' scores add up to the whole windows', and eval lengths
a group cannot split are refused by name."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from pretrain.config import ParallelConfig
from pretrain.errors import ConfigError
from pretrain.eval.perplexity import score_windows
from pretrain.eval.split import check_eval_split
from pretrain.eval.windows import nonoverlapping_windows, sliding_windows
from pretrain.parallel.layout import SequenceLayout


def fake_losses(inputs, targets, positions=None):
    """A 'loss' that depends on the target token and its position in the window, like a real one."""
    if positions is None:
        positions = torch.arange(inputs.shape[1])
    return (targets * 1e-3 + positions[None, :] * 1e-5).float()


@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("mode", ["nonoverlapping", "sliding"])
def test_the_shards_of_each_window_add_up_to_the_whole_window(mode, zigzag):
    """Each rank of a group sums only its shard's predictions, at their positions in the window: the group's sums
    are the whole windows' (sliding windows score only their last positions, which zigzag scatters)."""
    tokens = np.arange(1000) % 97
    length, sp_size = 24, 3
    if mode == "sliding":
        windows = sliding_windows(len(tokens), length, 10)
    else:
        windows = nonoverlapping_windows(len(tokens), length)
    whole = score_windows(tokens, windows, fake_losses, batch_size=4)
    shards = [
        score_windows(tokens, windows, fake_losses, 4, layout=SequenceLayout(length, sp_size, rank, zigzag))
        for rank in range(sp_size)
    ]
    assert sum(s.tokens for s in shards) == whole.tokens
    assert sum(s.loss_sum for s in shards) == pytest.approx(whole.loss_sum, rel=1e-12)
    assert np.array_equal(sum(s.position_tokens for s in shards), whole.position_tokens)
    assert np.allclose(sum(s.position_loss for s in shards), whole.position_loss, rtol=1e-12)
    if mode == "sliding":  # the first length - stride positions are context only, on every rank
        assert not whole.position_tokens[: length - 10].any() and whole.position_tokens[length - 10 :].all()


@pytest.mark.parametrize(
    "lengths, explicit, parallel, heads, message",
    [
        ([64, 66], True, dict(sp_size=2, sp_mode="ulysses"), 4, None),
        ([64, 66], True, dict(sp_size=4, sp_mode="ulysses"), 4,
         r"eval.lengths holds 66: with each window split over 4 ranks every window length must be a multiple of "
         r"parallel.sp_size=4 \(ulysses: one equal chunk per rank\); for 66 use 64 or 68"),
        ([64, 66, 130], True, dict(sp_size=2, sp_mode="ring", zigzag=True), 4,
         r"eval.lengths holds 66, 130: .* a multiple of 2 \* parallel.sp_size = 4 \(zigzag ring: two equal chunks "
         r"per rank\); for 66 use 64 or 68"),
        ([66], True, dict(sp_size=2, sp_mode="ring", zigzag=False), 4, None),
        ([33, 66], False, dict(sp_size=2, sp_mode="ring"), 4,
         r"the default eval lengths \(model.seq_len=33 x 1, 2, 4, 8, 16, 32\) hold 33"),
        ([3], True, dict(sp_size=4, sp_mode="ring"), 4, r"for 3 use 4 \("),
        ([64], True, dict(sp_size=4, sp_mode="ulysses"), 6, r"alibi \(run_dir\) has model.n_head=6, not divisible"),
        ([64], True, dict(sp_size=4, sp_mode="ring"), 6, None),
        ([64], True, dict(sp_size=4, sp_mode="ring", world=6), 4, "sp_size=4 does not divide the world size 6"),
    ],
)  # fmt: skip
def test_eval_lengths_a_group_cannot_split_are_refused_by_name(lengths, explicit, parallel, heads, message):
    world = parallel.pop("world", 8)
    check = partial(check_eval_split, lengths, explicit, 33, {"alibi (run_dir)": heads}, ParallelConfig(**parallel))
    if message is None:
        check(world)
    else:
        with pytest.raises(ConfigError, match=message):
            check(world)
