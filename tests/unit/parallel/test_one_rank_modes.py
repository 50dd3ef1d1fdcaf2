"""The sequence-parallel modes' per-call costs, without a process group: Ulysses copies its slopes to a device once
(not a blocking copy every layer call), and a ring of one rank sends nothing to itself."""

from __future__ import annotations

import torch

import pretrain.parallel.ring as ring
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import alibi_attention
from pretrain.parallel.ulysses import UlyssesAttention


def test_ulysses_copies_its_slopes_to_a_device_once():
    attention = UlyssesAttention.__new__(UlyssesAttention)  # the slopes cache alone: no DeepSpeed group needed
    attention.rank_slopes, attention._slopes_on = slopes(8)[4:], {}
    first = attention.slopes_on(torch.device("cpu"))
    assert attention.slopes_on(torch.device("cpu")) is first and torch.equal(first, slopes(8)[4:])


def test_a_ring_of_one_rank_sends_nothing_and_gives_the_unsplit_attention(monkeypatch):
    monkeypatch.setattr(ring.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(ring.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ring.dist, "get_global_rank", lambda group, rank: 0)

    def no_exchange(*args):
        raise AssertionError("a ring of one rank sent to itself")

    monkeypatch.setattr(ring, "_exchange", no_exchange)
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 4, 256, 16, generator=gen) for _ in range(4))
    results = []
    for attend in (ring.RingAttention(None, 256, zigzag=True), lambda q, k, v, s: alibi_attention(q, k, v, s)):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = attend(qs, ks, vs, slopes(4))
        out.backward(grad)
        results.append((out, qs.grad, ks.grad, vs.grad))
    for ours, theirs in zip(*results):
        assert (ours - theirs).abs().max().item() < 1e-5
