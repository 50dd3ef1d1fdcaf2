"""Activation checkpointing applied to the model's blocks from outside: the same gradients, the block recomputed."""

import torch

from pretrain.config import ModelConfig
from pretrain.model.gpt import GPT
from pretrain.train.activation_checkpointing import apply_activation_checkpointing


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=512)
    base.update(overrides)
    return ModelConfig(**base)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny())
    ids = torch.randint(0, 512, (2, 64))
    model(ids, ids).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model.h)
    calls = []
    model.h[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model(ids, ids).backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
    assert len(calls) == 2, "the block's forward must run again in the backward pass (recomputed, not kept)"
    assert set(model.state_dict()) == set(GPT(tiny()).state_dict()), "parameter names must not change"
    calls.clear()
    with torch.no_grad():
        model.eval()(ids)
    assert len(calls) == 1
