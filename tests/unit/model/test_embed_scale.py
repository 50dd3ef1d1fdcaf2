"""Fair absolute baselines: token embeddings count model.embed_scale times their positions (the ALiBi paper's
fairseq ratio by default), applied as positions / embed_scale; relative encodings are untouched."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.model.gpt import GPT
from pretrain.model.positions import embed_scale, sinusoidal_table
from pretrain.train.resume import check_resume
from pretrain.train.weights import model_config, saved_model_config


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, d_model=128, seq_len=64, vocab_size=512), **overrides})


def test_default_scale_is_the_papers_ratio():
    assert embed_scale(tiny(pos_encoding="sinusoidal")) == pytest.approx(50.0)  # 1 / init_std
    assert embed_scale(tiny(pos_encoding="sinusoidal", init_std=0.01)) == pytest.approx(100.0)
    assert embed_scale(tiny(pos_encoding="learned")) == pytest.approx(math.sqrt(128))
    assert embed_scale(tiny(pos_encoding="learned", embed_scale=3.0)) == 3.0
    for relative in ("alibi", "rope", "none"):
        assert embed_scale(tiny(pos_encoding=relative)) == 1.0
        assert embed_scale(tiny(pos_encoding=relative, embed_scale=7.0)) == 1.0


@pytest.mark.parametrize("pos_encoding, ratio", [("sinusoidal", math.sqrt(2)), ("learned", math.sqrt(128))])
def test_token_to_position_magnitude_at_init_is_fairseqs(pos_encoding, ratio):
    """fairseq: tokens N(0, 1/d) x sqrt(d) (RMS 1) plus a sin/cos table (RMS 1/sqrt(2)) or a learned table
    N(0, 1/d): tokens sqrt(2) resp. sqrt(d) times the positions' RMS. Ours must have the same ratio."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding=pos_encoding))
    tokens = model.word_embeddings.weight
    positions = model.pos.embed(torch.zeros(64, 128), torch.arange(64))
    rms = lambda t: t.detach().pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(tokens) / rms(positions) == pytest.approx(ratio, rel=0.05)


def test_unit_scale_is_the_plain_sum():
    cfg = tiny(pos_encoding="sinusoidal", embed_scale=1.0)
    x = torch.randn(2, 64, 128)
    out = GPT(cfg).pos.embed(x, torch.arange(64))
    torch.testing.assert_close(out, x + sinusoidal_table(64, 128))


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_with_the_embedding_layernorm_it_is_scaling_the_tokens(pos_encoding):
    """LayerNorm(t + p / a) == LayerNorm(a t + p) (the eps scaled by a^2), in value and in the tokens' gradient."""
    torch.manual_seed(0)
    a = 50.0
    model = GPT(tiny(pos_encoding=pos_encoding, embed_scale=a))
    positions = torch.arange(64)
    table = model.pos.table(positions) if pos_encoding == "learned" else model.pos.table[positions]
    ln = model.word_embeddings_layernorm
    t1 = torch.randn(64, 128) * 0.02
    t2 = t1.clone()
    t1.requires_grad_(True)
    t2.requires_grad_(True)
    ours = ln(model.pos.embed(t1, positions))
    theirs = F.layer_norm(a * t2 + table, (128,), ln.weight, ln.bias, ln.eps * a * a)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["alibi", "rope", "none"])
def test_relative_encodings_are_unchanged(pos_encoding):
    ids = torch.randint(0, 512, (2, 64))
    torch.manual_seed(0)
    plain = GPT(tiny(pos_encoding=pos_encoding))
    torch.manual_seed(0)
    scaled = GPT(tiny(pos_encoding=pos_encoding, embed_scale=123.0))
    torch.testing.assert_close(plain(ids), scaled(ids), rtol=0, atol=0)


def test_embed_scale_must_be_positive():
    with pytest.raises(ConfigError, match="model.embed_scale"):
        tiny(embed_scale=0.0)


def test_records_from_before_the_key_load_as_unscaled(tmp_path):
    """A model_config.json written before model.embed_scale existed holds a model trained with the plain sum."""
    old = {k: v for k, v in tiny(pos_encoding="sinusoidal").__dict__.items() if k != "embed_scale"}
    assert saved_model_config(old).embed_scale == 1.0
    assert saved_model_config({**old, "pos_encoding": "alibi"}).embed_scale is None
    assert saved_model_config({**old, "embed_scale": None}).embed_scale is None  # recorded: today's default
    (tmp_path / "model_config.json").write_text(json.dumps(old))
    assert model_config(tmp_path).embed_scale == 1.0


def test_resume_keeps_the_scale_the_checkpoint_was_trained_with():
    """An old absolute run (no embed_scale recorded: unscaled) is not silently resumed at today's default."""
    cfg = Config()
    now = tiny(pos_encoding="sinusoidal")
    old = {k: v for k, v in now.__dict__.items() if k != "embed_scale"}
    with pytest.raises(
        PipelineError, match=r"model.embed_scale gives 50 but .* trained with 1; pass model.embed_scale=1"
    ):
        check_resume({"model_config": old}, cfg, now, {}, "ckpt")
    assert check_resume({"model_config": old}, cfg, tiny(pos_encoding="sinusoidal", embed_scale=1.0), {}, "ckpt") == []
    recorded = dict(now.__dict__)  # embed_scale null, resolved through init_std
    assert check_resume({"model_config": recorded}, cfg, now, {}, "ckpt") == []
    with pytest.raises(PipelineError, match="trained with 50"):
        check_resume({"model_config": recorded}, cfg, tiny(pos_encoding="sinusoidal", init_std=0.01), {}, "ckpt")
    alibi_old = {**old, "pos_encoding": "alibi"}  # relative encodings: nothing to compare
    assert check_resume({"model_config": alibi_old}, cfg, tiny(pos_encoding="alibi"), {}, "ckpt") == []
