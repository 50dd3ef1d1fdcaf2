"""The architecture options (n_kv_head, mlp, norm) and their presets: parameters as print_plan counts them, the
default block untouched, and resume / init_from refusing a change of them in one line."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.__main__ import CONF_DIR
from pretrain.config import Config, ModelConfig, register_configs
from pretrain.errors import PipelineError
from pretrain.model.gpt import GPT
from pretrain.perf.plan import kv_cache_bytes_per_token, parameter_count
from pretrain.train.resume import check_resume


def preset(name: str) -> ModelConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=[f"model={name}"])).model


@pytest.mark.parametrize("name", ["mpt-125m", "gqa-350m"])
def test_presets_are_counted_as_built(name):
    cfg = preset(name)
    with torch.device("meta"):
        assert parameter_count(cfg) == GPT(cfg).num_parameters()


def test_presets_say_what_they_are():
    mpt, gqa = preset("mpt-125m"), preset("gqa-350m")
    assert (mpt.bias, mpt.embedding_layernorm, mpt.norm, mpt.mlp) == (False, False, "layernorm_nobias", "gelu")
    assert (gqa.n_head, gqa.n_kv_head) == (16, 4)
    assert kv_cache_bytes_per_token(gqa) * 4 == kv_cache_bytes_per_token(preset("350m"))


@pytest.mark.parametrize(
    "overrides",
    [dict(mlp="swiglu"), dict(mlp="swiglu", mlp_hidden=80, bias=False), dict(n_kv_head=1, norm="layernorm_nobias")],
)
def test_parameter_count_of_the_options(overrides):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=100, **overrides)
    assert parameter_count(cfg) == GPT(cfg).num_parameters()


def test_the_default_block_keeps_its_tensors():
    """BLOOM's names and shapes, created in the same order: the default run draws the same numbers as before."""
    names = [(n, tuple(p.shape)) for n, p in GPT(ModelConfig(n_layer=1)).named_parameters()]
    assert names[1:5] == [
        ("word_embeddings_layernorm.weight", (128,)),
        ("word_embeddings_layernorm.bias", (128,)),
        ("h.0.input_layernorm.weight", (128,)),
        ("h.0.input_layernorm.bias", (128,)),
    ]
    assert ("h.0.self_attention.query_key_value.weight", (384, 128)) in names
    assert ("h.0.mlp.dense_h_to_4h.weight", (512, 128)) in names


@pytest.mark.parametrize(
    "saved, now, named",
    [
        (dict(n_kv_head=4), dict(n_kv_head=2), "model.n_kv_head is 2 but checkpoint .* n_kv_head=4"),
        (dict(mlp="gelu"), dict(mlp="gelu_tanh"), "model.mlp is 'gelu_tanh' but .* mlp='gelu'"),
        (dict(norm="layernorm"), dict(norm="layernorm_nobias"), "model.norm is 'layernorm_nobias'"),
    ],
)
def test_resume_refuses_another_architecture(saved, now, named):
    record = {"model_config": asdict(ModelConfig(**saved))}
    with pytest.raises(PipelineError, match=named):
        check_resume(record, Config(), ModelConfig(**now), {}, "ckpt")


def test_a_record_older_than_the_options_is_the_default_block():
    old = {k: v for k, v in asdict(ModelConfig()).items() if k not in ("n_kv_head", "mlp", "mlp_hidden", "norm")}
    assert check_resume({"model_config": old}, Config(), ModelConfig(), {}, "ckpt") == []
    with pytest.raises(PipelineError, match="model.n_kv_head is 1 but checkpoint ckpt holds a model with n_kv_head=4"):
        check_resume({"model_config": old}, Config(), ModelConfig(n_kv_head=1), {}, "ckpt")


def test_init_from_refuses_weights_of_another_mlp(tmp_path):
    from pretrain.parallel.distributed import DistContext
    from pretrain.train.weights import load_init_weights, save_weights

    saved = ModelConfig(n_layer=1, n_head=4, d_model=32, vocab_size=50, mlp="gelu")
    save_weights(GPT(saved), saved, tmp_path / "run" / "checkpoints", DistContext(), zero_stage=0)
    (tmp_path / "spm.model").write_bytes(b"tokenizer")
    now = GPT(ModelConfig(n_layer=1, n_head=4, d_model=32, vocab_size=50))  # same shapes, tanh-GELU
    with pytest.raises(PipelineError, match="holds a model with model.mlp=gelu, this run's has model.mlp=gelu_tanh"):
        load_init_weights(now, str(tmp_path / "run"), tmp_path / "spm.model")


def test_falcon_slopes_are_falcons():
    """bf16(m) / sqrt(head_dim): what transformers' Falcon multiplies the key positions by (before its bf16 product)."""
    from pretrain.model.bloom import _bloom_slopes

    model = GPT(ModelConfig(n_layer=1, n_head=12, d_model=192, alibi_slopes="falcon", embedding_layernorm=False))
    theirs = torch.tensor(_bloom_slopes(12)).to(torch.bfloat16).double() / 4.0
    assert torch.allclose(model.pos.slopes.double(), theirs, rtol=1e-7, atol=0)
    assert model.pos.slopes.dtype == torch.float32


def test_the_plan_says_when_ulysses_repeats_key_value_heads():
    from pretrain.config import ParallelConfig
    from pretrain.perf.plan import format_plan, make_plan

    model = ModelConfig(n_layer=2, n_head=8, d_model=64, n_kv_head=2)
    text = format_plan(make_plan(Config(model=model, parallel=ParallelConfig(sp_size=4)), 4, device="cpu"))
    assert "attention: 8 query heads, 2 key/value heads; KV cache 128 bytes per token in 16 bits" in text
    assert "ulysses: 2 key/value heads do not split over 4 ranks; each is repeated 2 times" in text
    plain = format_plan(make_plan(Config(model=model, parallel=ParallelConfig(sp_size=2)), 2, device="cpu"))
    assert "repeated" not in plain
