"""The ALiBi math under its public name: ``from pretrain.alibi import slopes`` (defined in ``pretrain.ops.alibi``)."""

from pretrain.ops.alibi import alibi_bias, causal_mask, head_slopes, positions, slopes

__all__ = ["alibi_bias", "causal_mask", "head_slopes", "positions", "slopes"]
