"""Sizes that cannot fit are one line before any work: generate.max_new_tokens and eval.passkey_lengths against the
memory there is (estimated from the model's config and the length), and prompts longer than
generate.max_prompt_tokens."""

from __future__ import annotations

import pytest

from pretrain.config import EvalConfig, GenerateConfig, ModelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.eval import passkey
from pretrain.generate import run as generate_run
from pretrain.perf.fit import available_memory, kv_cache_bytes, largest_fitting

TINY = ModelConfig(n_layer=2, n_head=4, d_model=128, seq_len=128, vocab_size=8192)
GB = 10**9


@pytest.fixture
def memory_of_16_gb(monkeypatch):
    for module in (generate_run, passkey):
        monkeypatch.setattr(
            module, "available_memory", lambda: (16 * GB, "this machine has 16.0 GB of memory available")
        )


def test_the_estimates_follow_the_model_and_the_length():
    assert kv_cache_bytes(TINY, rows=1, tokens=1000) == 2 * 2 * 1000 * 128 * 4
    assert largest_fitting(lambda n: 10 * n, 10**9, 1000) == 100
    budget, where = available_memory()
    assert budget > 0 and ("available" in where or "GPU" in where)


def test_a_completion_that_cannot_fit_is_refused_naming_what_fits(memory_of_16_gb):
    generate_run.check_fits(TINY, GenerateConfig(max_new_tokens=64), [1])
    with pytest.raises(PipelineError) as err:
        generate_run.check_fits(TINY, GenerateConfig(max_new_tokens=1_000_000_000), [1] * 3)
    message = str(err.value)
    assert message.startswith("generate.max_new_tokens=1,000,000,000 cannot fit: decoding 3 prompt(s) with it")
    assert "16.0 GB" in message and "lower generate.max_new_tokens to at most " in message
    assert "generate.window=W" in message and "\n" not in message
    # a windowed cache has a constant size: any number of new tokens fits
    generate_run.check_fits(TINY, GenerateConfig(max_new_tokens=1_000_000_000, window=256), [1] * 3)


def test_a_prompt_longer_than_max_prompt_tokens_is_refused_with_its_length():
    generate_run.check_prompt_lengths(["short"], [[1, 2, 3]], max_prompt_tokens=3)
    with pytest.raises(PipelineError, match=r"prompt 2 of 2 .* has 4 tokens, more than generate.max_prompt_tokens=3"):
        generate_run.check_prompt_lengths(["short", "long"], [[1], [1, 2, 3, 4]], max_prompt_tokens=3)
    assert GenerateConfig().max_prompt_tokens == 32768
    with pytest.raises(ConfigError, match="generate.max_prompt_tokens"):
        GenerateConfig(max_prompt_tokens=0)


def test_a_passkey_length_that_cannot_fit_is_refused_before_any_work(memory_of_16_gb):
    passkey.check_passkey_fits(TINY, EvalConfig())  # the defaults: the training length x 1 .. 8
    passkey.check_passkey_fits(TINY, EvalConfig(passkey_lengths=[100_000_000], passkey=False))
    with pytest.raises(ConfigError) as err:
        passkey.check_passkey_fits(TINY, EvalConfig(passkey_lengths=[1024, 100_000_000]))
    message = str(err.value)
    assert message.startswith("eval.passkey_lengths holds 100,000,000: a trial of that length runs 10 prompts")
    assert "16.0 GB" in message and "give lengths of at most " in message and "\n" not in message
