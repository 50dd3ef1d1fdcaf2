"""Choosing the next token: greedy, temperature, top-k, top-p, seeded per prompt."""

from __future__ import annotations

import pytest
import torch

from pretrain.generate.sampling import Sampling, filter_logits, next_tokens


def test_greedy_is_the_argmax_and_draws_nothing():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    greedy = Sampling(temperature=0.0, top_k=1, top_p=0.1)
    assert greedy.greedy and greedy.generator(0) is None
    assert next_tokens(logits, greedy, [None, None]) == [1, 0]


def test_top_k_and_top_p_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 2]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]  # the most likely token alone holds 0.5
    assert kept(filter_logits(logits, top_p=0.51)) == [0, 2]
    assert kept(filter_logits(logits, top_p=0.95)) == [0, 2, 3]
    assert kept(filter_logits(logits, top_p=0.01)) == [0]  # never empty
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [0, 2]
    assert kept(filter_logits(logits, top_k=10)) == [0, 1, 2, 3]


def test_samples_follow_the_distribution_and_the_seed():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(2000, 4)
    sampling = Sampling(temperature=1.0, seed=11)
    gens = [sampling.generator(0) for _ in range(2000)]  # one stream, drawn 2000 times from fresh copies
    assert len(set(next_tokens(logits[:50], sampling, gens[:50]))) == 1  # the same seed, the same draw
    gen = sampling.generator(0)
    draws = torch.tensor([next_tokens(logits[:1], sampling, [gen])[0] for _ in range(2000)])
    freq = torch.bincount(draws, minlength=4).float() / 2000
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)
    assert Sampling(temperature=1.0, seed=11).generator(1).initial_seed() != gen.initial_seed()


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(500, 3)
    cold, hot = Sampling(temperature=0.05, seed=1), Sampling(temperature=5.0, seed=1)
    gen_cold, gen_hot = cold.generator(0), hot.generator(0)
    assert set(next_tokens(logits, cold, [gen_cold] * 500)) == {0}
    assert set(next_tokens(logits, hot, [gen_hot] * 500)) == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature=-1"), ({"top_k": 0}, "top_k=0"), ({"top_p": 0.0}, r"top_p=0.0")],
)
def test_bad_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
