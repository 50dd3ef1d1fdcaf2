"""The DeepSpeed config, generated from the one Hydra config (so there is one source of truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError


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


def sequence_loss_scale(zero_stage: int, sp_size: int) -> float:
    """What a rank's mean loss is multiplied by before backward when sequences are split over ``sp_size`` ranks.

    Each rank holds an equal share of a sequence's tokens, so the sequence's mean loss is the sum of the
    ranks' means divided by ``sp_size``; the gradient must add up over the sequence-parallel ranks and
    average over the data-parallel ones. DeepSpeed 0.19's ZeRO-0/1/2 reductions divide by the data-parallel
    size only (they sum over sequence ranks), so each rank scales its loss by ``1 / sp_size``. ZeRO-3's
    reduce-scatter path averages over all ``dp x sp`` ranks, which already brings the ``1 / sp_size``.
    The two-rank equivalence tests (loss and gradient norm against one rank) hold this in place.
    """
    return 1.0 if zero_stage == 3 else 1.0 / sp_size


# DeepSpeed's default ``reduce_bucket_size`` (elements) and the bucket its ZeRO-0 all-reduce flattens into.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def deepspeed_config(cfg: TrainConfig, dp_size: int, sp_size: int = 1, n_params: int | None = None) -> dict:
    """The DeepSpeed config dict. The optimizer and LR schedule are ours (passed to ``initialize``).

    With ``n_params``, ZeRO's gradient reduce bucket is capped at the model's size: DeepSpeed allocates the
    whole bucket up front, 5e8 elements (1 GB in bf16) even for a model a tenth of that.
    """
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1 and n_params is not None:
        zero["reduce_bucket_size"] = min(DEEPSPEED_BUCKET_ELEMENTS, n_params)
    if cfg.zero_stage == 3:
        # Our consolidated weights file gathers the parameters itself (see checkpoint.save_weights).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if sp_size > 1:
            zero["reduce_scatter"] = True  # the reduction sequence_loss_scale assumes
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
    merged = _merge(generated, extra_config(cfg.deepspeed))
    if sp_size > 1 and cfg.zero_stage == 3 and not merged["zero_optimization"].get("reduce_scatter", True):
        raise ConfigError(
            "train.deepspeed sets zero_optimization.reduce_scatter=false, which ZeRO-3 with sequence "
            "parallelism (parallel.sp_size > 1) does not support here; leave it at true"
        )
    return merged
