"""The training data loader: deterministic, resumable, disjoint across data-parallel ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.loader import TokenWindowLoader, epoch_offset, val_batches
from pretrain.errors import PipelineError

SEQ = 16


@pytest.fixture
def shard(tmp_path):
    """A uint32 shard whose token at position p is p, so a window's first input names where it starts."""
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint32).tofile(path)
    return path


def loader(shard, seed=7, micro=4, rank=0, size=1, seq=SEQ):
    return TokenWindowLoader(shard, "uint32", seq, micro, seed, dp_rank=rank, dp_size=size)


def starts(batch) -> list[int]:
    return batch[0][:, 0].tolist()


def take(data, n):
    return [data.next_batch() for _ in range(n)]


def test_batches_are_windows_of_the_shard(shard):
    inputs, targets = loader(shard).next_batch()
    assert inputs.shape == targets.shape == (4, SEQ)
    assert inputs.dtype == targets.dtype == torch.int64
    for row_in, row_out in zip(inputs, targets, strict=True):
        expected = torch.arange(int(row_in[0]), int(row_in[0]) + SEQ + 1)
        assert torch.equal(row_in, expected[:-1]) and torch.equal(row_out, expected[1:])


def test_same_seed_same_batches_other_seed_other_batches(shard):
    a, b, c = take(loader(shard, seed=1), 20), take(loader(shard, seed=1), 20), take(loader(shard, seed=2), 20)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert [starts(x) for x in a] != [starts(x) for x in c]


def test_an_epoch_visits_distinct_windows_then_reshuffles(shard):
    data = loader(shard)
    per_epoch = data.batches_per_epoch
    first = [s for batch in take(data, per_epoch) for s in starts(batch)]
    assert len(set(first)) == len(first) == per_epoch * 4
    assert len({s % SEQ for s in first}) == 1  # one offset per epoch
    assert data.epoch == 0
    second = [s for batch in take(data, per_epoch) for s in starts(batch)]
    assert data.epoch == 1 and len(set(second)) == len(second)
    assert first != second


@pytest.mark.parametrize("k", [0, 3, 78])  # 78 crosses the first epoch's end (batches_per_epoch == 77)
def test_restored_loader_continues_exactly(shard, k):
    uninterrupted = loader(shard)
    assert uninterrupted.batches_per_epoch == 77
    expected = take(uninterrupted, k + 10)[k:]
    stopped = loader(shard)
    take(stopped, k)
    state = stopped.state_dict()
    restored = loader(shard)
    restored.load_state_dict(state)
    got = take(restored, 10)
    assert [starts(b) for b in got] == [starts(b) for b in expected]
    assert all(torch.equal(g[1], e[1]) for g, e in zip(got, expected, strict=True))


def test_restore_refuses_another_shard_seed_or_length(shard, tmp_path):
    state = loader(shard).state_dict()
    with pytest.raises(ValueError, match="train.seed"):
        loader(shard, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="model.seq_len"):
        loader(shard, seq=32).load_state_dict(state)
    other = tmp_path / "other.bin"
    (np.arange(5000, dtype=np.uint32) * 2).tofile(other)
    with pytest.raises(ValueError, match="different train split"):
        loader(other).load_state_dict(state)


def test_two_ranks_read_disjoint_windows_that_make_the_global_batch(shard):
    rank0, rank1, single = loader(shard, rank=0, size=2), loader(shard, rank=1, size=2), loader(shard, micro=8)
    seen0, seen1 = set(), set()
    for _ in range(rank0.batches_per_epoch):
        s0, s1, both = starts(rank0.next_batch()), starts(rank1.next_batch()), starts(single.next_batch())
        assert sorted(s0 + s1) == sorted(both)  # together: the same windows as one rank with a 2x batch
        seen0.update(s0)
        seen1.update(s1)
    assert seen0 and seen1 and not seen0 & seen1
    assert rank0.state_dict() == rank1.state_dict()  # one state restores every rank


def test_resume_with_another_dp_size_neither_repeats_nor_skips(shard):
    before = loader(shard, size=1)
    taken = [s for batch in take(before, 5) for s in starts(batch)]
    state = before.state_dict()
    ranks = [loader(shard, rank=r, size=2) for r in range(2)]
    for data in ranks:
        data.load_state_dict(state)
    for _ in range(ranks[0].batches_per_epoch - 3):
        for data in ranks:
            taken += starts(data.next_batch())
    assert len(taken) == len(set(taken))
    offset = epoch_offset([before.seed, 0], SEQ)
    order = before.epoch_order(0, np.arange(len(taken)))
    assert sorted(taken) == sorted((offset + order * SEQ).tolist())


def test_uint16_shard(tmp_path):
    path = tmp_path / "small.bin"
    np.arange(3000, dtype=np.uint16).tofile(path)
    inputs, targets = TokenWindowLoader(path, "uint16", SEQ, 2, seed=0).next_batch()
    assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_shard_too_small_for_a_batch_is_explained(shard):
    with pytest.raises(PipelineError, match=r"too few for one batch.*train\.micro_batch_size"):
        loader(shard, micro=200, seq=64)


def test_val_batches_in_order_split_across_ranks(shard):
    single = list(val_batches(shard, "uint32", SEQ, 4))
    n_windows = (5000 - 1) // SEQ
    assert len(single) == n_windows // 4
    assert [s for b in single for s in starts(b)] == [k * SEQ for k in range(len(single) * 4)]
    ranks = [list(val_batches(shard, "uint32", SEQ, 4, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == n_windows // 4 // 2
    assert not {s for b in ranks[0] for s in starts(b)} & {s for b in ranks[1] for s in starts(b)}
    assert len(list(val_batches(shard, "uint32", SEQ, 4, max_batches=3))) == 3
    inputs, targets = single[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_an_epoch_visits_every_window_once_across_shards(tmp_path):
    sizes = [700, 129, 64, 1000]  # one shard too short for any window
    shards = sharded(tmp_path, sizes)
    data = TokenWindowLoader(shards, "uint32", SEQ, 2, seed=3)
    assert data.n_windows == sum(max(0, (size - SEQ) // SEQ) for size in sizes)
    seen = []
    for _ in range(data.batches_per_epoch):
        inputs, targets = data.next_batch()
        for row_in, row_out in zip(inputs, targets, strict=True):
            window = torch.cat([row_in, row_out[-1:]]).numpy()
            assert np.array_equal(np.diff(window), np.ones(SEQ)), "a window crossed a shard boundary"
            seen.append(int(window[0]))
    assert len(seen) == len(set(seen)) == data.batches_per_epoch * 2
    assert data.epoch == 0


def test_the_shuffle_is_a_computed_bijection():
    from pretrain.data.shuffle import permute

    for n in (1, 2, 3, 7, 64, 1000, 4099):
        order = permute(np.arange(n), n, (5, 1))
        assert sorted(order.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, (5, 1)), permute(np.arange(1000), 1000, (5, 2))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    assert np.array_equal(permute(np.arange(500, 510), 1000, (5, 1)), a[500:510])  # any position, in O(1)
    with pytest.raises(ValueError, match="outside"):
        permute(np.array([1000]), 1000, (5, 1))


def sharded(tmp_path, sizes=(900, 300, 1200, 77, 1500)):
    """A split of several uint32 shards whose tokens count on across shards (a window names where it starts)."""
    from pretrain.data.shards import ShardSet

    listed, start = [], 0
    for i, size in enumerate(sizes):
        path = tmp_path / f"train-{i:05d}.bin"
        np.arange(start, start + size, dtype=np.uint32).tofile(path)
        listed.append((path, size))
        start += size
    return ShardSet(listed, "uint32", random_access=True)


def test_a_sharded_split_resumes_exactly_on_one_or_two_ranks(tmp_path):
    split = sharded(tmp_path)
    uninterrupted = TokenWindowLoader(split, "uint32", SEQ, 4, seed=11)
    want = [starts(batch) for batch in take(uninterrupted, 3 * uninterrupted.batches_per_epoch // 2)]
    first = TokenWindowLoader(split, "uint32", SEQ, 4, seed=11)
    got = [starts(batch) for batch in take(first, 5)]
    state = first.state_dict()
    # the same global batch on two ranks of 2 windows each: together they read what one rank of 4 would
    ranks = [TokenWindowLoader(split, "uint32", SEQ, 2, seed=11, dp_rank=r, dp_size=2) for r in range(2)]
    for data in ranks:
        data.load_state_dict(state)
    for _ in range(len(want) - 5):
        halves = [starts(data.next_batch()) for data in ranks]
        got.append([halves[i % 2][i // 2] for i in range(4)])  # rank r took windows r, r + 2 of the batch
    assert got == want  # across an epoch boundary too
    again = TokenWindowLoader(split, "uint32", SEQ, 4, seed=11)
    again.load_state_dict(state)
    assert [starts(batch) for batch in take(again, 3)] == want[5:8]


def test_the_loader_holds_nothing_per_window(tmp_path):
    split = sharded(tmp_path)
    data = TokenWindowLoader(split, "uint32", SEQ, 4, seed=1)
    arrays = [value for value in vars(data).values() if isinstance(value, np.ndarray)]
    arrays += [value for value in vars(data.windows).values() if isinstance(value, np.ndarray)]
    assert all(array.size <= len(split.paths) + 1 for array in arrays)  # O(shards), never O(windows)
