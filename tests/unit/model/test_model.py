import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.gpt import GPT

POS_ENCODINGS = ["alibi", "sinusoidal", "learned", "rope", "none"]


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=512)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_forward_backward_and_untrained_loss_is_ln_vocab(pos_encoding):
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos_encoding))
    ids, targets = torch.randint(0, 512, (4, 64)), torch.randint(0, 512, (4, 64))
    loss = model(ids, targets)
    assert abs(loss.item() - math.log(512)) < 0.1
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model(ids).shape == (4, 64, 512)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_attention_backends_agree_inside_the_model(pos_encoding):
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos_encoding, n_head=6, d_model=96))
    ids = torch.randint(0, 512, (2, 45))
    losses, grads = {}, {}
    for backend in ("fused", "sdpa", "eager"):
        for block in model.h:
            block.self_attention.backend = backend
        model.zero_grad()
        losses[backend] = model(ids, ids.roll(-1, 1))
        losses[backend].backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for backend in ("sdpa", "eager"):
        torch.testing.assert_close(losses[backend], losses["fused"], rtol=1e-5, atol=1e-6)
        assert (grads[backend] - grads["fused"]).norm() / grads["fused"].norm() < 1e-5


def test_alibi_model_is_translation_invariant():
    # ALiBi only sees distances: the same tokens at positions 4096.. give the same logits as at 0..
    model = GPT(tiny()).eval()
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, offset=4096), model(ids), rtol=1e-5, atol=1e-5)


def test_alibi_model_runs_beyond_its_training_length():
    model = GPT(tiny(seq_len=32)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 200)))).all()


def test_learned_table_refuses_longer_sequences():
    model = GPT(tiny(pos_encoding="learned", seq_len=32))
    with pytest.raises(ValueError, match="beyond the learned position table of 32 rows"):
        model(torch.randint(0, 512, (1, 33)))


def test_tied_head_and_no_bias_variant():
    model = GPT(tiny(bias=False, embedding_layernorm=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    ids = torch.randint(0, 512, (1, 8))
    model(ids, ids).backward()
    assert model.word_embeddings.weight.grad is not None


def test_same_logits_as_huggingface_bloom():
    """The default layout is BLOOM's: its weights load by name and give the same logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(tiny(n_head=6, d_model=96, vocab_size=500)).eval()
    bloom = transformers.BloomForCausalLM(
        transformers.BloomConfig(
            vocab_size=500,
            hidden_size=96,
            n_layer=2,
            n_head=6,
            layer_norm_epsilon=1e-5,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    ).eval()
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.word_embeddings.weight
    bloom.load_state_dict(state, strict=True)
    ids = torch.randint(0, 500, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), bloom(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_problem():
    model = GPT(tiny())
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="targets .* must match input_ids"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


def test_attention_window_limits_context():
    # With a window of W, the logits of a token depend only on the last W tokens.
    model = GPT(tiny()).eval()
    ids = torch.randint(0, 512, (1, 60))
    changed = ids.clone()
    changed[0, :20] = (changed[0, :20] + 1) % 512
    with torch.no_grad():
        a, b = model(ids, window=8), model(changed, window=8)
        # Position 59 sees 52..59 in the last layer, and through 2 layers at most 59 - 2 * 7 = 45..59.
        torch.testing.assert_close(a[0, 40:], b[0, 40:])
        assert not torch.allclose(model(ids)[0, 40:], model(changed)[0, 40:])
