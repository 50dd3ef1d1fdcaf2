"""The generated DeepSpeed config: batch sizes, ZeRO options, and user overrides merged over it."""

from __future__ import annotations

import pytest

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError
from pretrain.parallel.deepspeed_config import DEEPSPEED_BUCKET_ELEMENTS, deepspeed_config


def test_batch_sizes_and_precision():
    cfg = deepspeed_config(TrainConfig(micro_batch_size=4, grad_accum=3, precision="bf16", zero_stage=1), 8)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 96
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_reduce_bucket_is_capped_at_the_model_size():
    small = deepspeed_config(TrainConfig(zero_stage=2), 2, n_params=1_000)["zero_optimization"]
    assert small["reduce_bucket_size"] == 1_000
    large = deepspeed_config(TrainConfig(zero_stage=2), 2, n_params=10**10)["zero_optimization"]
    assert large["reduce_bucket_size"] == DEEPSPEED_BUCKET_ELEMENTS
    zero0 = deepspeed_config(TrainConfig(zero_stage=0), 2, n_params=1_000)["zero_optimization"]
    assert "reduce_bucket_size" not in zero0


def test_user_overrides_win():
    tcfg = TrainConfig(zero_stage=2, deepspeed={"zero_optimization": {"reduce_bucket_size": 77, "overlap_comm": True}})
    zero = deepspeed_config(tcfg, 2, n_params=1_000)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 77, "overlap_comm": True}


def test_zero3_with_sequence_parallel_needs_reduce_scatter():
    assert deepspeed_config(TrainConfig(zero_stage=3), 1, sp_size=2)["zero_optimization"]["reduce_scatter"]
    tcfg = TrainConfig(zero_stage=3, deepspeed={"zero_optimization": {"reduce_scatter": False}})
    with pytest.raises(ConfigError, match="reduce_scatter=false"):
        deepspeed_config(tcfg, 1, sp_size=2)
