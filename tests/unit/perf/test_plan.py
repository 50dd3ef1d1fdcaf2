"""The run plan: exact parameter counts, and what each ZeRO stage shards."""

from __future__ import annotations

import pytest

from pretrain.config import Config, ModelConfig, TrainConfig
from pretrain.model.gpt import GPT
from pretrain.perf.plan import make_plan, parameter_count


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pos_encoding": "learned", "max_positions": 300},
        {"bias": False, "embedding_layernorm": False, "n_head": 6, "d_model": 96},
        {"n_layer": 3, "mlp_ratio": 2, "vocab_size": 1000},
    ],
)
def test_parameter_count_matches_the_model(overrides):
    cfg = ModelConfig(**overrides)
    assert parameter_count(cfg) == GPT(cfg).num_parameters()


def test_zero_stages_shard_what_they_should():
    base = Config(model=ModelConfig(vocab_size=512))
    plans = {
        stage: make_plan(Config(model=base.model, train=TrainConfig(zero_stage=stage, precision="bf16")), 8)
        for stage in range(4)
    }
    n = plans[0].parameters
    assert plans[0].memory["optimizer"] == 12 * n and plans[1].memory["optimizer"] == 12 * n // 8
    assert plans[1].memory["gradients"] == 2 * n and plans[2].memory["gradients"] == 2 * n // 8
    assert plans[2].memory["parameters"] == 2 * n and plans[3].memory["parameters"] == 2 * n // 8
    assert plans[0].tokens_per_step == 16 * 8 * 128
