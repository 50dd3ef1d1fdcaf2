"""The ring's per-block kernels, on one process: which kernel a block runs, and the block gradients that the GPU
kernel (FlexAttention, no backward on CPU) gets through autograd, checked here with the CPU kernel's autograd
against its direct backward."""

from __future__ import annotations

import types

import pytest
import torch

from pretrain.ops.alibi import slopes
from pretrain.ops.attention.blockwise import BlockwiseAlibiAttention, blockwise_backward, blockwise_forward
from pretrain.parallel.ring import _merge, block_backward_through_autograd, block_kernel


def test_a_ring_block_runs_flex_on_cuda_and_the_blockwise_kernel_on_cpu():
    assert block_kernel(types.SimpleNamespace(is_cuda=True, shape=(1, 4, 64, 64))) == "flex"
    assert block_kernel(types.SimpleNamespace(is_cuda=True, shape=(1, 4, 64, 8))) == "blockwise"  # head_dim < 16
    assert block_kernel(torch.zeros(1, 4, 64, 64)) == "blockwise"


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
def test_block_gradients_through_autograd_equal_the_direct_backward_with_a_merged_lse(window):
    """Queries 40..71 against two key chunks 0..39 and 40..71, merged as the ring merges them."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 32, 16, generator=gen)
    k, v = (torch.randn(2, 3, 72, 16, generator=gen) for _ in range(2))
    dout = torch.randn(2, 3, 32, 16, generator=gen)
    s, scale = slopes(3), 0.25
    chunks = [(0, slice(0, 40)), (40, slice(40, 72))]
    out = torch.zeros(2, 3, 32, 16)
    lse = torch.full((2, 3, 32), float("-inf"))
    for start, cols in chunks:
        _merge(out, lse, *blockwise_forward(q, k[:, :, cols], v[:, :, cols], s, 40, start, window, scale))

    def kernel(*args):
        return BlockwiseAlibiAttention.apply(*args)

    for start, cols in chunks:
        args = (dout, q, k[:, :, cols], v[:, :, cols], out, lse, s, 40, start, window, scale)
        direct = blockwise_backward(*args)
        through_autograd = block_backward_through_autograd(kernel, *args)
        for want, got in zip(direct, through_autograd):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
