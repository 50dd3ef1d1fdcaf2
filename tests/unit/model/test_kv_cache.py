"""The KV cache: every decoding step's logits equal a full forward over the whole prefix, past the training length."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model import gpt as gpt_module
from pretrain.model.gpt import GPT
from pretrain.model.kv_cache import KVCache

SEQ_LEN = 16
TOL = dict(rtol=0, atol=1e-5)


def tiny(**overrides) -> ModelConfig:
    # 6 heads: slopes of a head count that is not a power of two; a training length far below what is decoded.
    base = dict(n_layer=2, n_head=6, d_model=96, seq_len=SEQ_LEN, vocab_size=300, init_std=0.1)
    base.update(overrides)
    return ModelConfig(**base)


def model_of(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(**overrides)).eval()


@torch.no_grad()
def check_every_step(model: GPT, ids: torch.Tensor, prompt: int, window: int | None = None, **cache_kwargs) -> KVCache:
    """Prefill ``prompt`` tokens, then feed one token per step; at every step the cached logits of every row must
    equal a full forward over that row's whole prefix (with ``window``)."""
    cache = KVCache.for_model(model, ids.shape[0], window=window, **cache_kwargs)
    cached = model.forward_cached(ids[:, :prompt], cache)
    torch.testing.assert_close(cached, model(ids[:, :prompt], window=window), **TOL)
    for t in range(prompt, ids.shape[1]):
        step = model.forward_cached(ids[:, t : t + 1], cache)[:, -1]
        full = model(ids[:, : t + 1], window=window)[:, -1]
        torch.testing.assert_close(step, full, **TOL, msg=lambda m, t=t: f"position {t}: {m}")
    return cache


@pytest.mark.parametrize("pos_encoding", ["alibi", "rope", "sinusoidal", "none", "learned"])
def test_every_step_equals_a_full_forward_past_the_training_length(pos_encoding):
    extra = {"max_positions": 96} if pos_encoding == "learned" else {}
    model = model_of(pos_encoding=pos_encoding, **extra)
    ids = torch.randint(0, 300, (2, 3 * SEQ_LEN))  # decoded up to 3x the training length
    cache = check_every_step(model, ids, prompt=12)
    assert cache.position(0) == cache.position(1) == 3 * SEQ_LEN


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_every_backend_decodes_with_the_cache(backend):
    model = model_of(attention=backend)
    check_every_step(model, torch.randint(0, 300, (1, 2 * SEQ_LEN)), prompt=SEQ_LEN + 3)


def test_a_prompt_fed_in_pieces_and_a_cache_that_grows():
    model = model_of()
    ids = torch.randint(0, 300, (1, 70))
    cache = KVCache.for_model(model, 1, capacity=4)
    pieces = [model.forward_cached(ids[:, a:b], cache) for a, b in ((0, 3), (3, 30), (30, 31), (31, 70))]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids), **TOL)
    assert cache.capacity >= 70 and cache.length == [70]


@pytest.mark.parametrize("window", [1, 5, 16])
def test_a_windowed_cache_equals_a_full_forward_with_that_window(window):
    model = model_of()
    ids = torch.randint(0, 300, (2, 3 * SEQ_LEN))
    cache = check_every_step(model, ids, prompt=20, window=window, chunk=8)
    # Constant memory: the buffers never grew past window - 1 + chunk columns, whatever the length.
    assert cache.capacity == window - 1 + 8
    assert cache.start[0] > 0 and cache.position(0) == 3 * SEQ_LEN  # old keys were dropped, positions global


@pytest.mark.parametrize("pos_encoding, window", [("alibi", None), ("alibi", 6), ("rope", 6), ("sinusoidal", None)])
def test_rows_at_different_positions_decode_as_each_does_alone(pos_encoding, window):
    """Prompts of different lengths share one cache without padding; each row's logits are its logits alone."""
    model = model_of(pos_encoding=pos_encoding)
    lengths, steps = [3, 17, 9, 17], 12
    rows = [torch.randint(0, 300, (n + steps,)) for n in lengths]
    cache = KVCache.for_model(model, len(rows), window=window, chunk=8)
    got = {i: [] for i in range(len(rows))}
    with torch.no_grad():
        for n in sorted(set(lengths)):  # prefill: the rows of one length together
            members = [i for i, m in enumerate(lengths) if m == n]
            logits = model.forward_cached(torch.stack([rows[i][:n] for i in members]), cache, rows=members)
            for i, row_logits in zip(members, logits):
                got[i].append(row_logits)
        for t in range(steps):
            active = [i for i in range(len(rows)) if t < steps - i]  # rows leave as they finish
            ids = torch.stack([rows[i][lengths[i] + t : lengths[i] + t + 1] for i in active])
            for i, row_logits in zip(active, model.forward_cached(ids, cache, rows=active)):
                got[i].append(row_logits)
        for i, row in enumerate(rows):
            mine = torch.cat(got[i])
            alone = model(row[None, : len(mine)], window=window)[0]
            torch.testing.assert_close(mine, alone, **TOL)


def test_a_zero_bias_at_single_token_steps_is_caught(monkeypatch):
    """The known bug elsewhere: a bias built over the query length only is zero at every one-token step. The
    step check above must fail on it (while the prefill, many queries at once, still matches)."""
    real = gpt_module.alibi_attention

    def bias_over_the_queries_only(q, k, v, slopes, q_offset, k_offset, **kwargs):
        return real(q, k, v, None if q.shape[2] == 1 else slopes, q_offset, k_offset, **kwargs)

    model = model_of()
    ids = torch.randint(0, 300, (1, 2 * SEQ_LEN))
    check_every_step(model, ids, prompt=SEQ_LEN)  # right
    monkeypatch.setattr(gpt_module, "alibi_attention", bias_over_the_queries_only)
    with pytest.raises(AssertionError, match=f"position {SEQ_LEN}"):
        check_every_step(model, ids, prompt=SEQ_LEN)


def test_a_key_offset_left_at_zero_is_caught_with_a_window(monkeypatch):
    """Once a windowed cache drops old keys, its first key is no longer position 0: a kernel told so puts the
    keys too far from the query, and the window hides them."""
    real = gpt_module.alibi_attention

    def key_offset_zero(q, k, v, slopes, q_offset, k_offset, **kwargs):
        return real(q, k, v, slopes, q_offset, 0, **kwargs)

    model = model_of()
    ids = torch.randint(0, 300, (1, 2 * SEQ_LEN))
    check_every_step(model, ids, prompt=SEQ_LEN, window=4, chunk=4)  # right
    monkeypatch.setattr(gpt_module, "alibi_attention", key_offset_zero)
    with pytest.raises(AssertionError):
        check_every_step(model, ids, prompt=SEQ_LEN, window=4, chunk=4)


def test_bad_calls_name_the_problem():
    model = model_of()
    cache = KVCache.for_model(model, 2)
    with pytest.raises(ValueError, match="input_ids has 1 rows, but 2 cache rows are continued"):
        model.forward_cached(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="must be distinct rows of a cache of 2"):
        model.forward_cached(torch.zeros(2, 3, dtype=torch.long), cache, rows=[1, 1])
    with pytest.raises(ValueError, match="the cache has 3 layers; this model 2"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), KVCache(3, 2, 6, 16))
    learned = model_of(pos_encoding="learned")
    cache = KVCache.for_model(learned, 1)
    learned.forward_cached(torch.zeros(1, SEQ_LEN, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="beyond the learned position table of 16 rows"):
        learned.forward_cached(torch.zeros(1, 1, dtype=torch.long), cache)
