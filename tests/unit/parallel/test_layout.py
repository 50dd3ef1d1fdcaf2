"""The sequence layout over a sequence-parallel group: each position held once, zigzag balance, bad splits named."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ParallelConfig
from pretrain.errors import ConfigError
from pretrain.parallel.layout import SequenceLayout, check_split


@pytest.mark.parametrize("zigzag", [False, True])
def test_layouts_cover_the_sequence_once(zigzag):
    seq_len, sp_size = 24, 3
    layouts = [SequenceLayout(seq_len, sp_size, r, zigzag) for r in range(sp_size)]
    held = torch.cat([layout.positions() for layout in layouts])
    assert sorted(held.tolist()) == list(range(seq_len))
    tokens = torch.arange(100, 100 + seq_len)[None]
    for layout in layouts:
        assert torch.equal(layout.shard(tokens)[0], 100 + layout.positions())


def test_zigzag_balances_causal_work():
    # Rank r holds chunks r and 2P-1-r: the number of (query, key) pairs it must score is the same on every rank.
    seq_len, sp_size = 32, 4
    work = []
    for rank in range(sp_size):
        positions = SequenceLayout(seq_len, sp_size, rank, zigzag=True).positions()
        work.append(int((positions + 1).sum()))
    assert len(set(work)) == 1
    assert SequenceLayout(seq_len, sp_size, 1, zigzag=True).segments == [(4, 4), (24, 4)]


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(seq_len=45, n_head=4, world_size=2, sp_size=2, mode="ring", zigzag=False), "model.seq_len=45"),
        (dict(seq_len=42, n_head=4, world_size=2, sp_size=2, mode="ring", zigzag=True), "2 \\* parallel.sp_size = 4"),
        (dict(seq_len=44, n_head=6, world_size=4, sp_size=4, mode="ulysses", zigzag=False), "model.n_head=6"),
        (dict(seq_len=44, n_head=4, world_size=3, sp_size=2, mode="ring", zigzag=False), "world size 3"),
    ],
)
def test_bad_splits_are_named(args, message):
    pcfg = ParallelConfig(sp_size=args["sp_size"], sp_mode=args["mode"], zigzag=args["zigzag"])
    heads = {"the model": args["n_head"]}
    with pytest.raises(ConfigError, match=message):
        check_split(pcfg, args["world_size"], [args["seq_len"]], heads, "model.seq_len=", "sequence", "or not")
