import json

import pytest
import torch

from pretrain.alibi import slopes
from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.bloom import (
    bloom_config,
    check_bloom_compatible,
    from_bloom_state_dict,
    model_config_from_bloom,
    to_bloom_state_dict,
)
from pretrain.model.gpt import GPT

transformers = pytest.importorskip("transformers")


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=6, d_model=96, seq_len=32, vocab_size=300, layer_norm_eps=1e-6)
    base.update(overrides)
    return ModelConfig(**base)


def to_bloom(model: GPT) -> "transformers.BloomForCausalLM":
    config = transformers.BloomConfig(**bloom_config(model.cfg))
    bloom = transformers.BloomForCausalLM(config).eval()
    missing, unexpected = bloom.load_state_dict(to_bloom_state_dict(model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    bloom.tie_weights()
    return bloom


def test_transformers_bloom_slopes_are_ours_for_every_head_count_to_64():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n_head in range(1, 65):
        # build_alibi_tensor gives slope_h * j; at j = 1 that is the slope itself.
        theirs = build_alibi_tensor(torch.ones(1, 2), n_head, torch.float32)[:, 0, 1]
        ours = slopes(n_head)
        # BLOOM raises a float32 base to integer powers in float32: a few ulps (< 1e-6 relative) from our
        # correctly rounded values; the rule (which slope goes to which head) is the same.
        assert torch.allclose(theirs, ours, rtol=1e-6, atol=0.0), n_head
        check_bloom_compatible(tiny(n_head=n_head, d_model=n_head * 2))


@pytest.mark.parametrize("length", [32, 256])  # 1x and 8x the training length
def test_logits_equal_transformers_bloom_at_1x_and_8x(length):
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    bloom = to_bloom(model)
    ids = torch.randint(0, 300, (2, length))
    with torch.no_grad():
        diff = (model(ids) - bloom(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_state_dict_round_trip_and_config_round_trip():
    cfg = tiny(dropout=0.1, init_std=0.01)
    state = GPT(cfg).state_dict()
    hf = to_bloom_state_dict(state)
    assert "transformer.h.1.mlp.dense_4h_to_h.weight" in hf and "lm_head.weight" not in hf
    back = from_bloom_state_dict({**hf, "lm_head.weight": hf["transformer.word_embeddings.weight"]})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # Without the prefix too (BLOOM checkpoints on the hub have none).
    assert from_bloom_state_dict(state).keys() == state.keys()
    config = json.loads(json.dumps(bloom_config(cfg, {"eos_token_id": 7}, dtype="bfloat16")))
    assert config["eos_token_id"] == 7 and config["dtype"] == "bfloat16" and config["seq_length"] == 32
    again = model_config_from_bloom(config)
    for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "layer_norm_eps", "init_std", "dropout"):
        assert getattr(again, key) == getattr(cfg, key), key


def test_untied_head_and_other_architectures_are_refused():
    hf = to_bloom_state_dict(GPT(tiny()).state_dict())
    with pytest.raises(ConfigError, match="lm_head.weight unlike the word embeddings"):
        from_bloom_state_dict({**hf, "lm_head.weight": torch.zeros_like(hf["transformer.word_embeddings.weight"])})
    with pytest.raises(ConfigError, match="model_type='llama'"):
        model_config_from_bloom({"model_type": "llama"})
    with pytest.raises(ConfigError, match="tie_word_embeddings=false"):
        model_config_from_bloom({**bloom_config(tiny()), "tie_word_embeddings": False})


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(pos_encoding="rope"), "model.pos_encoding=rope"),
        (dict(pos_encoding="learned"), "model.pos_encoding=learned"),
        (dict(bias=False), "model.bias=false"),
        (dict(embedding_layernorm=False), "model.embedding_layernorm=false"),
        (dict(mlp_ratio=2), "model.mlp_ratio=2"),
    ],
)
def test_unrepresentable_models_are_refused_in_one_line(overrides, named):
    with pytest.raises(ConfigError, match=named) as err:
        check_bloom_compatible(tiny(**overrides))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=named):
        bloom_config(tiny(**overrides))
