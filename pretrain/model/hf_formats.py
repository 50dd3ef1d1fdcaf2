"""Which Hugging Face class an export writes (``export.format=auto|bloom|mpt|falcon``), in one place.

Each format says why it cannot represent a model (``refusal``: the setting in a few words, or None), and turns our
config and state dict into its ``config.json`` and tensors:

- ``bloom``: ``BloomForCausalLM``, the default block (biases, embedding LayerNorm, tanh-GELU); exact.
- ``mpt``: ``MptForCausalLM``, no biases, no embedding LayerNorm, bias-free LayerNorm, exact GELU; exact.
- ``falcon``: ``FalconForCausalLM`` with ``alibi=True``, sequential block, one or all key/value heads, trained with
  ``model.alibi_slopes=falcon``; transformers rounds its ALiBi bias to bfloat16, so not exact past a few hundred
  positions (``exact=False``: the export warns and measures it).

``auto`` takes the one format that represents the model (the slopes alone tell Falcon from the other two, and
BLOOM's and MPT's blocks differ in every bias); none is a ConfigError naming why for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.config import EXPORT_FORMATS as CONFIG_EXPORT_FORMATS
from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.bloom import bloom_config, bloom_refusal, to_bloom_state_dict
from pretrain.model.falcon import falcon_config, falcon_refusal, to_falcon_state_dict
from pretrain.model.mpt import mpt_config, mpt_refusal, to_mpt_state_dict


@dataclass(frozen=True)
class HfFormat:
    name: str
    architecture: str
    label: str  # the model family, as messages name it
    refusal: Callable[[ModelConfig], str | None]
    config: Callable[..., dict]  # (model_cfg, token_ids, dtype) -> config.json
    state_dict: Callable[[dict, ModelConfig], dict]  # our state dict -> the class's tensors
    exact: bool  # whether the class computes our logits to float32 rounding at every length


FORMATS = {
    "bloom": HfFormat(
        "bloom", "BloomForCausalLM", "BLOOM", bloom_refusal, bloom_config, lambda s, _: to_bloom_state_dict(s), True
    ),
    "mpt": HfFormat("mpt", "MptForCausalLM", "MPT", mpt_refusal, mpt_config, to_mpt_state_dict, True),
    "falcon": HfFormat(
        "falcon", "FalconForCausalLM", "Falcon", falcon_refusal, falcon_config, to_falcon_state_dict, False
    ),
}
EXPORT_FORMATS = ("auto", *FORMATS)
assert EXPORT_FORMATS == CONFIG_EXPORT_FORMATS, "config.EXPORT_FORMATS must name exactly the formats defined here"


def choose_format(model_cfg: ModelConfig, requested: str = "auto") -> HfFormat:
    """The format of ``export.format`` for this model; ConfigError (one line) when it cannot represent it."""
    if requested != "auto":
        fmt = FORMATS[requested]
        reason = fmt.refusal(model_cfg)
        if reason is not None:
            raise ConfigError(
                f"export.format={requested}: a Hugging Face {fmt.label} export cannot represent {reason}; "
                f"{_other_hint(model_cfg, requested)}"
            )
        return fmt
    fitting = [fmt for fmt in FORMATS.values() if fmt.refusal(model_cfg) is None]
    if fitting:
        return fitting[0]
    if model_cfg.mlp == "swiglu":
        raise ConfigError(
            "model.mlp=swiglu: no transformers class has SwiGLU with ALiBi (BLOOM, MPT and Falcon use GELU MLPs); "
            "the model cannot be exported"
        )
    reasons = "; ".join(f"{fmt.label}: {fmt.refusal(model_cfg)}" for fmt in FORMATS.values())
    raise ConfigError(f"no Hugging Face class represents this model ({reasons}); the model cannot be exported")


def _other_hint(model_cfg: ModelConfig, requested: str) -> str:
    others = [fmt.name for name, fmt in FORMATS.items() if name != requested and fmt.refusal(model_cfg) is None]
    return f"export.format={others[0]} (or auto) represents it" if others else "the model cannot be exported"
