"""The DeepSpeed config, generated from the one Hydra config (so there is one source of truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError, TrainConfig


def global_batch(cfg: TrainConfig, dp_size: int) -> int:
    """Sequences per optimizer step: ``micro_batch_size x grad_accum x data-parallel ranks``."""
    return cfg.micro_batch_size * cfg.grad_accum * dp_size


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def extra_config(value: Any) -> dict:
    """``train.deepspeed``: a mapping, or a path to a JSON file, merged over the generated config."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise ConfigError(f"train.deepspeed={value!r}: no such JSON file (give a path or a mapping of DeepSpeed keys)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed={value!r} is not valid JSON: {err}") from None


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    """The DeepSpeed config dict. The optimizer and LR schedule are ours (passed to ``initialize``)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Our consolidated weights file gathers the parameters itself (see checkpoint.save_weights).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    generated = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": global_batch(cfg, dp_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(generated, extra_config(cfg.deepspeed))
