"""Grouped-query attention: every kernel with shared key/value heads against the same attention with the keys and
values repeated per query head (float64 inputs, forward and gradients), and the model's pieces that follow from it."""

from __future__ import annotations

import warnings

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.gpt import GPT
from pretrain.model.kv_cache import KVCache
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import alibi_attention
from pretrain.ops.attention.flex import flex_alibi_attention

# (heads, kv heads, q_len, k_len, q_offset, k_offset, window): groups of 3 (6 heads: slopes not a power of two's),
# multi-query across more than one block of the CPU kernel, a ring-like block off the origin, a window.
SHAPES = [
    (6, 2, 37, 37, 0, 0, None),
    (8, 1, 520, 520, 0, 0, None),
    (12, 4, 120, 700, 580, 0, 300),
    (6, 3, 50, 80, 4096, 4066, 7),
]


def inputs(heads, kv_heads, q_len, k_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, 16, generator=gen, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, kv_heads, k_len, 16, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, kv_heads, k_len, 16, generator=gen, dtype=torch.float64).requires_grad_()
    return q, k, v


def out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)  # every output counts differently
    return (out, *torch.autograd.grad((out * weights).sum(), (q, k, v)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", ["fused", "sdpa", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shared_heads_equal_repeated_heads(backend, shape):
    heads, kv_heads, q_len, k_len, q_offset, k_offset, window = shape
    if backend != "fused" and k_len > 512:
        pytest.skip("the references have no blocks: a long shape only costs time there")
    group = heads // kv_heads
    q, k, v = inputs(heads, kv_heads, q_len, k_len)
    s = slopes(heads)

    def grouped(q, k, v):
        return alibi_attention(q, k, v, s, q_offset, k_offset, backend=backend, window=window)

    def repeated(q, k, v):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return alibi_attention(q, k, v, s, q_offset, k_offset, backend=backend, window=window)

    got, want = out_and_grads(grouped, q, k, v), out_and_grads(repeated, q, k, v)
    # The same arithmetic, but dk and dv summed over a group inside one product instead of by autograd.
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel(a, b) < 1e-6, (name, rel(a, b))


def test_flex_reads_the_shared_heads():
    """FlexAttention with enable_gqa (its masks and score_mod, run uncompiled here) equals the repeated heads."""
    q, k, v = (t.detach().float() for t in inputs(6, 2, 40, 40))
    s = slopes(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it materializes the scores
        got, _ = flex_alibi_attention(q, k, v, s, 3, 3, None, 0.25, compiled=False, return_lse=False)
    want = alibi_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), s, 3, 3, "eager", scale=0.25)
    assert rel(got, want) < 1e-5


def test_the_kernel_never_repeats_keys(monkeypatch):
    """The CPU kernel multiplies each block's folded queries with the shared keys: no tensor of H key heads."""
    seen = []
    real = torch.bmm

    def spy(a, b, **kwargs):
        seen.append((a.shape[0], b.shape[0]))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    q, k, v = inputs(8, 2, 64, 64)
    alibi_attention(q.detach(), k.detach(), v.detach(), slopes(8))
    assert seen and all(pair == (2 * 2, 2 * 2) for pair in seen)  # batch 2 x 2 key/value heads


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", [2])  # multi-query decodes in the export tests' greedy comparison
def test_the_cache_holds_the_shared_heads_and_decodes_exactly(n_kv_head):
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=2, n_head=6, d_model=96, seq_len=16, vocab_size=300, init_std=0.1, n_kv_head=n_kv_head)
    )
    ids = torch.randint(0, 300, (2, 24))
    cache = KVCache.for_model(model.eval(), 2)
    assert cache.keys[0].shape[1] == n_kv_head
    torch.testing.assert_close(model.forward_cached(ids[:, :20], cache), model(ids[:, :20]), rtol=0, atol=1e-5)
    for t in range(20, 24):  # past the training length (16)
        step = model.forward_cached(ids[:, t : t + 1], cache)[:, -1]
        torch.testing.assert_close(step, model(ids[:, : t + 1])[:, -1], rtol=0, atol=1e-5)


def test_query_heads_read_their_groups_key_value_head():
    """The fused projection's layout [kv_head, (group queries, key, value), head_dim]: query head h of a model reads
    key/value head h // group (checked against the layout written out by hand)."""
    cfg = ModelConfig(n_layer=1, n_head=6, d_model=48, n_kv_head=2, vocab_size=50)
    attention = GPT(cfg).h[0].self_attention
    x = torch.randn(1, 5, (6 + 2 * 2) * 8)
    q, k, v = attention.split_heads(x)
    rows = x.view(1, 5, 2, 5, 8)  # 2 groups of (3 queries, key, value)
    assert torch.equal(q[0, 4], rows[0, :, 1, 1]) and torch.equal(k[0, 1], rows[0, :, 1, 3])
    assert torch.equal(v[0, 0], rows[0, :, 0, 4])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_head=6, n_kv_head=4), "model.n_kv_head=4 does not divide model.n_head=6"),
        (dict(n_kv_head=0), "model.n_kv_head=0 does not divide"),
        (dict(mlp="relu"), "model.mlp='relu' is not allowed; choose one of: gelu_tanh, gelu, swiglu"),
        (dict(mlp_hidden=100), "model.mlp_hidden=100 is for model.mlp=swiglu"),
        (dict(norm="rmsnorm"), "model.norm='rmsnorm' is not allowed"),
        (dict(alibi_slopes="mpt"), "model.alibi_slopes='mpt' is not allowed"),
    ],
)
def test_bad_model_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{"n_head": 4, "d_model": 48, **overrides})


def test_defaults_follow_the_older_keys():
    assert ModelConfig(n_head=6, d_model=48).n_kv_head == 6
    assert ModelConfig(bias=False).norm == "layernorm_nobias" and ModelConfig().norm == "layernorm"
    assert ModelConfig(d_model=768, mlp="swiglu").mlp_width == 2048  # 2/3 x 4 x 768, a multiple of 256
    assert ModelConfig(d_model=4096, mlp="swiglu").mlp_width == 11008  # LLaMA-7B's
