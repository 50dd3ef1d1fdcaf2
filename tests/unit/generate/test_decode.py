"""The decoding loop: batched prompts of any lengths, greedy and sampled, windowed; the same tokens as transformers."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.generate.decode import generate
from pretrain.generate.sampling import Sampling
from pretrain.model.gpt import GPT

SEQ_LEN = 16


def model_of(**overrides) -> GPT:
    """A random model whose greedy completions do not fall into repeating one token (a freshly initialised one
    does: its tied embeddings make each token predict itself), with clear margins between its top choices: every
    weight but the LayerNorms' drawn with std 0.5."""
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=6, d_model=96, seq_len=SEQ_LEN, vocab_size=300)
    model = GPT(ModelConfig(**{**base, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name and not name.startswith("ln_f"):
                param.normal_(0.0, 0.5)
    return model


def prompts_of(*lengths: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 300, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: list[int], new: int, window: int | None = None) -> list[int]:
    """The reference: a full forward over the whole prefix for every new token."""
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(model(torch.tensor([ids]), window=window)[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("window", [None, 5])
def test_greedy_equals_a_full_forward_each_step_past_the_training_length(window):
    model = model_of()
    (prompt,) = prompts_of(SEQ_LEN + 4)
    (got,) = generate(model, [prompt], 2 * SEQ_LEN, window=window)
    assert got == greedy_without_cache(model, prompt, 2 * SEQ_LEN, window)
    assert len(set(got)) > 3  # not a model that repeats one token


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=7)])
def test_a_prompt_in_a_batch_gets_what_it_gets_alone(sampling, window):
    """Prompts of different lengths (one of a single token, two of the same length) decode together; each one's
    completion is its completion alone (the same prompt index, so the same random stream when sampling)."""
    model = model_of()
    prompts = prompts_of(7, 1, 23, 7, 12)
    batched = generate(model, prompts, 10, sampling, window=window, batch_size=8)
    alone = generate(model, prompts, 10, sampling, window=window, batch_size=1)
    assert batched == alone
    assert all(len(c) == 10 for c in batched)
    if sampling.greedy:
        assert batched[2] == greedy_without_cache(model, prompts[2], 10, window)


def test_a_completion_stops_at_the_end_of_sequence_token():
    model = model_of()
    prompts = prompts_of(9, 5)
    free = generate(model, prompts, 30)
    eos = free[0][6]
    stopped = generate(model, prompts, 30, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]  # the end token itself is not part of the completion
    other = free[1][: free[1].index(eos)] if eos in free[1] else free[1]
    assert stopped[1] == other  # the other row went on


def test_sampling_is_seeded():
    model = model_of()
    prompts = prompts_of(6, 6)
    hot = Sampling(temperature=1.5, seed=3)
    first, again = generate(model, prompts, 10, hot), generate(model, prompts, 10, hot)
    assert first == again
    assert first[0] != first[1]  # each prompt its own stream
    assert generate(model, prompts, 10, Sampling(temperature=1.5, seed=4)) != first


def test_bad_inputs_name_the_problem():
    model = model_of()
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(model, [[5], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens=0 is not allowed"):
        generate(model, [[5]], 0)


def bloom_of(model: GPT):
    transformers = pytest.importorskip("transformers")
    from pretrain.model.bloom import bloom_config, to_bloom_state_dict

    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(**bloom_config(model.cfg))).eval()
    missing, unexpected = bloom.load_state_dict(to_bloom_state_dict(model.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the head is tied to the word embeddings
    return bloom


def test_greedy_tokens_equal_transformers_generate_of_the_same_model_as_bloom():
    """The same model loaded as BloomForCausalLM, decoded by transformers with its own cache, far past the training
    length: the same tokens. Then a batch of two lengths, which transformers left-pads (its ALiBi counts positions
    from each row's first real token) and we do not pad at all."""
    model = model_of()
    bloom = bloom_of(model)
    prompts = prompts_of(SEQ_LEN + 5, 9)
    new = 4 * SEQ_LEN
    ours = generate(model, prompts, new)
    assert len(set(ours[0])) > 3
    with torch.no_grad():
        theirs = bloom.generate(torch.tensor([prompts[0]]), max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert ours[0] == theirs[0, len(prompts[0]) :].tolist()
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        batch = bloom.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours == batch[:, width:].tolist()
