"""ALiBi attention under its public name: ``from pretrain.attention import alibi_attention`` (defined in
``pretrain.ops.attention``)."""

from pretrain.ops.attention import BACKENDS, alibi_attention

__all__ = ["BACKENDS", "alibi_attention"]
