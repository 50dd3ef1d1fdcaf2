"""The fused output projection + cross-entropy equals the plain one, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pretrain.ops.loss as loss_module
from pretrain.ops.loss import chunk_tokens, linear_cross_entropy, token_cross_entropy


def plain_loss(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def loss_and_grads(fn, hidden, weight, targets):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, targets)
    (loss * 0.5).backward()  # a non-unit upstream gradient, as gradient accumulation gives
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_bytes", [1 << 24, 4 * 7 * 300])  # one chunk; many, the last one short
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_matches_plain_cross_entropy(monkeypatch, chunk_bytes, dtype, tol):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 16, dtype=dtype)
    weight = torch.randn(300, 16, dtype=dtype) * 0.3
    targets = torch.randint(0, 300, (2, 50))
    targets[0, :7] = -100  # ignored positions count in neither the mean nor the gradients
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    ref = loss_and_grads(plain_loss, hidden, weight, targets)
    for a, b in zip(ours, ref):
        assert torch.allclose(a.to(b.dtype), b, rtol=tol, atol=tol * 1e-2), (a - b).abs().max()


def test_ignored_targets_get_no_gradient():
    torch.manual_seed(0)
    hidden, weight = torch.randn(1, 10, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (1, 10))
    targets[0, 3] = -100
    _, grad_hidden, _ = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert grad_hidden[0, 3].abs().max() == 0 and grad_hidden[0, 4].abs().max() > 0


def test_bf16_close_to_plain():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32).bfloat16()
    weight = (torch.randn(500, 32) * 0.2).bfloat16()
    targets = torch.randint(0, 500, (64,))
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    ref = loss_and_grads(plain_loss, hidden, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    for a, b in zip(ours, ref):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_no_grad_and_all_ignored():
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8)
    with torch.no_grad():
        targets = torch.randint(0, 20, (5,))
        assert torch.isclose(linear_cross_entropy(hidden, weight, targets), plain_loss(hidden, weight, targets))
        assert torch.isnan(linear_cross_entropy(hidden, weight, torch.full((5,), -100)))
    with pytest.raises(ValueError, match="4 targets for 5 hidden states"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("chunk_bytes", [1 << 24, 4 * 7 * 300])
def test_token_losses_match_plain_per_token_cross_entropy(monkeypatch, chunk_bytes):
    """Eval's per-prediction losses come from the training loss's chunks: one chunk of logits at a time."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 50, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 300, (2, 50))
    targets[1, 3] = -100
    ours = token_cross_entropy(hidden, weight, targets)
    logits = F.linear(hidden, weight).float()
    ref = F.cross_entropy(logits.view(-1, 300), targets.view(-1), reduction="none").view(2, 50)
    assert ours.shape == (2, 50) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5) and ours[1, 3] == 0


def test_chunk_is_sized_in_bytes_for_the_device():
    assert chunk_tokens(8192, torch.device("cpu")) == 512  # 16 MiB of float32 logits
    assert chunk_tokens(50257, torch.device("cpu")) == (1 << 24) // (4 * 50257)
    assert chunk_tokens(8192, torch.device("cuda")) == 4096  # 128 MiB
    assert chunk_tokens(1 << 30, torch.device("cpu")) == 1
