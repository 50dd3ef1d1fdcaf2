"""Our GPT as Hugging Face's ``MptForCausalLM`` (MosaicML's MPT, llm-foundry): the config and the tensor names.

MPT's block is ours without any bias, without the embedding LayerNorm, with the exact GELU and an MLP of 4 x d_model:
``model.bias=false model.embedding_layernorm=false model.mlp=gelu`` (the ``model=mpt-125m`` preset), whose norms are
then bias-free (``model.norm=layernorm_nobias``, what ``bias=false`` implies). ``check_mpt_compatible`` refuses
anything else in one line naming the setting.

Attention: MPT's fused ``Wqkv`` is ``[all queries; all keys; all values]`` (``chunk(3)``) where ours is BLOOM's
``[head, (q, k, v), head_dim]``: the rows are permuted on export. It has one key/value head per query head
(transformers' MPT has no grouped-query attention). Its ALiBi (``build_mpt_alibi_tensor``) adds ``m_h * (j - (M - 1))``
over ``M = max_seq_len`` key positions, sliced to the keys present: a per-row constant away from our ``-m_h (i - j)``,
which the softmax removes. Its slopes are ``1 / 2^(8 k / P)`` for ``P`` the next power of two, the odd ``k`` first
for other head counts, which is our rule written another way: ``_mpt_slopes`` writes it out and a head count whose
slopes would differ beyond float32 rounding is refused (none is known; tested for 1..64 heads). ``max_seq_len`` must
cover the longest input (the bias tensor is built over it; a longer input fails in transformers): the export sets
``MAX_SEQ_LEN_MULTIPLE`` x the training length, at least 2,048.

Pure functions: no file is read or written here (``pretrain.export`` writes the directory).
"""

from __future__ import annotations

import math

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.bloom import DEFAULT_TOKEN_IDS, raise_if_refused, slopes_refusal

PREFIX = "transformer."
MPT_MLP_RATIO = 4
# The export's max_seq_len: this many times the training length (the evaluation goes to 32x by default).
MAX_SEQ_LEN_MULTIPLE = 64
MIN_MAX_SEQ_LEN = 2048


def _mpt_slopes(n_head: int, alibi_bias_max: int = 8) -> list[float]:
    """MPT's slope formula (``build_mpt_alibi_tensor``) written out, in float64."""
    power = 2 ** math.ceil(math.log2(n_head))
    values = [1.0 / 2 ** (k * alibi_bias_max / power) for k in range(1, power + 1)]
    if power != n_head:
        values = (values[1::2] + values[::2])[:n_head]
    return values


def mpt_refusal(model_cfg: ModelConfig) -> str | None:
    """Why ``MptForCausalLM`` cannot represent this model (the setting, in a few words), or None."""
    if model_cfg.pos_encoding != "alibi":
        return f"model.pos_encoding={model_cfg.pos_encoding} (MPT's export supports only alibi)"
    if model_cfg.alibi_slopes != "paper":
        return f"model.alibi_slopes={model_cfg.alibi_slopes} (MPT uses the paper's slopes)"
    if model_cfg.bias:
        return "model.bias=true (MPT's linear layers have no bias)"
    if model_cfg.norm != "layernorm_nobias":
        return f"model.norm={model_cfg.norm} (MPT's LayerNorms have no bias)"
    if model_cfg.embedding_layernorm:
        return "model.embedding_layernorm=true (MPT does not normalise the word embeddings)"
    if model_cfg.mlp != "gelu":
        return f"model.mlp={model_cfg.mlp} (MPT's MLP is the exact GELU: model.mlp=gelu)"
    if model_cfg.mlp_ratio != MPT_MLP_RATIO:
        return f"model.mlp_ratio={model_cfg.mlp_ratio} (MPT's MLP is always {MPT_MLP_RATIO} x d_model)"
    if model_cfg.parallel_block:
        return "model.parallel_block=true (MPT's block is sequential)"
    if model_cfg.n_kv_head != model_cfg.n_head:
        return f"model.n_kv_head={model_cfg.n_kv_head} (transformers' MPT has one key/value head per query head)"
    return slopes_refusal(model_cfg, _mpt_slopes(model_cfg.n_head), "MPT")


def check_mpt_compatible(model_cfg: ModelConfig) -> None:
    """Raise ConfigError (one line, naming the setting) when MPT cannot represent this model."""
    raise_if_refused(mpt_refusal(model_cfg), "MPT")


def mpt_config(model_cfg: ModelConfig, token_ids: dict[str, int] | None = None, dtype: str = "float32") -> dict:
    """The ``config.json`` of an ``MptForCausalLM`` equal to our model (after ``check_mpt_compatible``)."""
    check_mpt_compatible(model_cfg)
    ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
    return {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "vocab_size": model_cfg.vocab_size,
        "d_model": model_cfg.d_model,
        "n_heads": model_cfg.n_head,
        "n_layers": model_cfg.n_layer,
        "expansion_ratio": MPT_MLP_RATIO,
        "max_seq_len": max(MIN_MAX_SEQ_LEN, MAX_SEQ_LEN_MULTIPLE * model_cfg.seq_len),
        "layer_norm_epsilon": model_cfg.layer_norm_eps,
        "initializer_range": model_cfg.init_std,
        "resid_pdrop": model_cfg.dropout,
        "emb_pdrop": model_cfg.dropout,
        "learned_pos_emb": False,
        "no_bias": True,
        "norm_type": "low_precision_layernorm",
        "attn_config": {
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_impl": "torch",
            "attn_pdrop": 0,  # transformers types it int
            "clip_qkv": None,
            "qk_ln": False,
            "softmax_scale": None,
        },
        "tie_word_embeddings": True,
        "use_cache": True,
        "seq_length": model_cfg.seq_len,
        "dtype": dtype,
        **ids,
    }


# Our names (after ``h.{i}.``) -> MPT's (after ``blocks.{i}.``).
_BLOCK = {
    "input_layernorm.weight": "norm_1.weight",
    "self_attention.query_key_value.weight": "attn.Wqkv.weight",
    "self_attention.dense.weight": "attn.out_proj.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "mlp.dense_h_to_4h.weight": "ffn.up_proj.weight",
    "mlp.dense_4h_to_h.weight": "ffn.down_proj.weight",
}


def to_mpt_state_dict(our_state_dict: dict, model_cfg: ModelConfig) -> dict:
    """MPT's tensor names and ``Wqkv`` row order for our GPT's state dict (the tied head is not repeated)."""
    out = {}
    for name, tensor in our_state_dict.items():
        if name == "word_embeddings.weight":
            out[PREFIX + "wte.weight"] = tensor
        elif name == "ln_f.weight":
            out[PREFIX + "norm_f.weight"] = tensor
        elif name.startswith("h."):
            _, layer, rest = name.split(".", 2)
            if rest == "self_attention.query_key_value.weight":
                # [head, (q, k, v), head_dim] rows -> [(q, k, v), head, head_dim] rows.
                h, d = model_cfg.n_head, model_cfg.head_dim
                tensor = tensor.view(h, 3, d, -1).transpose(0, 1).reshape(3 * h * d, -1)
            out[f"{PREFIX}blocks.{layer}.{_BLOCK[rest]}"] = tensor
        else:
            raise ConfigError(f"weight {name} has no place in an MPT model")
    return out
