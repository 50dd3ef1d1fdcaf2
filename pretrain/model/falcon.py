"""Our GPT as Hugging Face's ``FalconForCausalLM`` with ``alibi=True``: the config and the tensor names.

Falcon's configuration in transformers has three block layouts; the one that matches ours is the sequential one
(``new_decoder_architecture=false``, ``parallel_attn=false``): ``x + attn(input_layernorm(x))``, then
``+ mlp(post_attention_layernorm(x))``, no embedding LayerNorm, LayerNorms with a bias (a bias-free norm is exported
with zero biases), linear biases as ``bias`` says, the MLP's width and activation configurable. In that layout the
fused ``query_key_value`` is either BLOOM's ``[head, (q, k, v), head_dim]`` (one key/value head per query head) or,
with ``multi_query=true``, ``[all queries, k, v]``: exactly our layout for ``n_kv_head = n_head`` and for
``n_kv_head = 1``. Falcon's grouped-query attention (``num_kv_heads`` between) exists only in its
``new_decoder_architecture`` block, which is a *parallel* block (attention and MLP read the same input, each through
its own LayerNorm ``ln_attn``/``ln_mlp``), with the fused QKV ``[kv_head, (its group's queries, k, v), head_dim]``:
exactly ours with ``model.parallel_block=true`` for any ``n_kv_head``. A sequential block with 1 < n_kv_head < n_head
has no layout and is refused.

ALiBi in Falcon: ``build_alibi_tensor`` uses BLOOM's slopes, but the bias ``m_h * j`` is added to the attention mask
and divided by ``sqrt(head_dim)`` with the scores (as Falcon-RW's own modelling code has it): Falcon's slope is
``bf16(m_h) / sqrt(head_dim)``. Only a model trained with ``model.alibi_slopes=falcon`` has those slopes. And
transformers rounds the bias itself to bfloat16 (``slopes[..., None].bfloat16() * arange_tensor``): 8 significant
bits. With every slope a power of two (``n_head`` up to 8) the bias is exact up to position 256 and rounded past it;
with more heads some slopes are not, and the bias is rounded from the first positions on. So the class's logits
differ from ours (``ROUNDING_NOTE``; measured in docs/export.md): the class's arithmetic, not the weights.

Pure functions: no file is read or written here (``pretrain.export`` writes the directory).
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig
from pretrain.model.bloom import DEFAULT_TOKEN_IDS, _bloom_slopes, raise_if_refused, slopes_refusal

PREFIX = "transformer."
ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
ROUNDING_NOTE = (
    "transformers' Falcon rounds its ALiBi bias to bfloat16 (build_alibi_tensor), so its logits differ from this "
    "model's past a few hundred positions even in float32"
)


def falcon_refusal(model_cfg: ModelConfig) -> str | None:
    """Why ``FalconForCausalLM`` (alibi, sequential block) cannot represent this model, or None."""
    if model_cfg.pos_encoding != "alibi":
        return f"model.pos_encoding={model_cfg.pos_encoding} (the Falcon export supports only alibi)"
    if model_cfg.alibi_slopes != "falcon":
        return (
            f"model.alibi_slopes={model_cfg.alibi_slopes} (Falcon divides the ALiBi bias by sqrt(head_dim): a model "
            "for a Falcon export is trained with model.alibi_slopes=falcon)"
        )
    if model_cfg.embedding_layernorm:
        return "model.embedding_layernorm=true (Falcon does not normalise the word embeddings)"
    if model_cfg.mlp not in ACTIVATIONS:
        return f"model.mlp={model_cfg.mlp} (Falcon's MLP is a GELU)"
    if not model_cfg.parallel_block and model_cfg.n_kv_head not in (1, model_cfg.n_head):
        return (
            f"model.n_kv_head={model_cfg.n_kv_head} (Falcon has grouped-query attention only in its parallel "
            "new_decoder_architecture block, model.parallel_block=true; its sequential block has 1 or n_head "
            "key/value heads)"
        )
    return slopes_refusal(model_cfg, _bloom_slopes(model_cfg.n_head), "Falcon")


def check_falcon_compatible(model_cfg: ModelConfig) -> None:
    """Raise ConfigError (one line, naming the setting) when Falcon cannot represent this model."""
    raise_if_refused(falcon_refusal(model_cfg), "Falcon")


def falcon_config(model_cfg: ModelConfig, token_ids: dict[str, int] | None = None, dtype: str = "float32") -> dict:
    """The ``config.json`` of a ``FalconForCausalLM`` equal to our model up to its bf16 bias (after the check)."""
    check_falcon_compatible(model_cfg)
    ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
    parallel = model_cfg.parallel_block
    multi_query = model_cfg.n_kv_head == 1 and model_cfg.n_head > 1 and not parallel
    return {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "num_hidden_layers": model_cfg.n_layer,
        "num_attention_heads": model_cfg.n_head,
        "num_kv_heads": model_cfg.n_kv_head if parallel else (1 if multi_query else model_cfg.n_head),
        "multi_query": multi_query,
        "new_decoder_architecture": parallel,
        "parallel_attn": parallel,
        "num_ln_in_parallel_attn": 2 if parallel else None,
        "alibi": True,
        "bias": model_cfg.bias,
        "activation": ACTIVATIONS[model_cfg.mlp],
        "ffn_hidden_size": model_cfg.mlp_width,
        "layer_norm_epsilon": model_cfg.layer_norm_eps,
        "initializer_range": model_cfg.init_std,
        "hidden_dropout": model_cfg.dropout,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "seq_length": model_cfg.seq_len,
        "dtype": dtype,
        **ids,
    }


def to_falcon_state_dict(our_state_dict: dict, model_cfg: ModelConfig) -> dict:
    """Falcon's tensor names for our GPT's state dict: BLOOM's (the parallel block's LayerNorms are ``ln_attn`` and
    ``ln_mlp``), and zero biases for bias-free LayerNorms."""
    out = {PREFIX + _parallel_name(name, model_cfg): tensor for name, tensor in our_state_dict.items()}
    if not model_cfg.norm_bias:
        for name, tensor in our_state_dict.items():
            if name.endswith("layernorm.weight") or name == "ln_f.weight":
                out[PREFIX + _parallel_name(name.removesuffix("weight") + "bias", model_cfg)] = torch.zeros_like(tensor)
    return out


def _parallel_name(name: str, model_cfg: ModelConfig) -> str:
    if not model_cfg.parallel_block:
        return name
    return name.replace("input_layernorm", "ln_attn").replace("post_attention_layernorm", "ln_mlp")
