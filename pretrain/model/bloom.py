"""Our GPT as Hugging Face's ``BloomForCausalLM``, and back: the config and the tensor names.

The default GPT layout is BLOOM's (``gpt.py``), so the weights map by name: ours are BLOOM's
``transformer.*`` tensors, and BLOOM's ``lm_head.weight`` is our word embedding (tied). What BLOOM cannot
represent is refused by ``check_bloom_compatible`` with one line naming the setting:

- ``model.pos_encoding`` other than ``alibi`` (BLOOM has no position table or rotation);
- ``model.bias=false`` (every BLOOM Linear and LayerNorm has a bias);
- ``model.embedding_layernorm=false`` (BLOOM always normalises the word embeddings);
- ``model.mlp_ratio`` other than 4 (BLOOM's MLP is always 4 x hidden_size);
- ``model.mlp`` other than ``gelu_tanh``, ``model.norm=layernorm_nobias``, ``model.n_kv_head`` other than ``n_head``,
  ``model.alibi_slopes=falcon`` (``pretrain.model.hf_formats`` then looks for MPT or Falcon).

Head counts: BLOOM's slope rule (``_get_alibi_slopes``) is ours for every head count (the paper's rule:
the nearest lower power of two, then every other slope of the next one); it raises a float32 base to integer powers in
float32, so its slopes differ from ours by a few float32 ulps, under 1e-6 relative (tested against
``transformers`` for 1..64 heads; the logits still agree within 1e-4 at 8x the training length).
``_bloom_slopes`` below writes BLOOM's formula out, so a head count whose slopes would differ beyond rounding
is refused too; none is known. ``layer_norm_eps``, ``init_std`` and ``dropout`` have BLOOM config keys.

Pure functions: no file is read or written here (``pretrain.export`` writes the directory).
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.ops.alibi import slopes as alibi_slopes

# The trained tokenizer's special ids (``pretrain.data.tokenizer``); an export passes the ids in use.
DEFAULT_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
BLOOM_MLP_RATIO = 4
# Relative difference of slopes that counts as rounding (float32 pow against our float64 rule).
SLOPE_RTOL = 1e-6


def _bloom_slopes(n_head: int) -> list[float]:
    """BLOOM's slope formula (``transformers``' ``_get_alibi_slopes``) written out, in float64."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    values = [base**p for p in range(1, closest + 1)]
    if closest != n_head:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, n_head - closest)
        values += [extra**p for p in range(1, 1 + 2 * remaining, 2)]
    return values


def slopes_refusal(model_cfg: ModelConfig, theirs: list[float], family: str) -> str | None:
    """Why a class whose ALiBi slopes are ``theirs`` cannot represent our slopes for ``model.n_head``, or None."""
    ours = alibi_slopes(model_cfg.n_head).double()
    given = torch.tensor(theirs, dtype=torch.float64)
    if ours.shape != given.shape or not torch.allclose(ours, given, rtol=SLOPE_RTOL, atol=0.0):
        return f"model.n_head={model_cfg.n_head} ({family} computes other ALiBi slopes for this head count)"
    return None


def raise_if_refused(reason: str | None, family: str) -> None:
    """The one-line ConfigError of an export class that cannot represent the model (``reason`` from its refusal)."""
    if reason is not None:
        raise ConfigError(f"a Hugging Face {family} export cannot represent {reason}; the model cannot be exported")


def bloom_refusal(model_cfg: ModelConfig) -> str | None:
    """Why ``BloomForCausalLM`` cannot represent this model (the setting, in a few words), or None."""
    if model_cfg.pos_encoding != "alibi":
        return f"model.pos_encoding={model_cfg.pos_encoding} (BLOOM supports only alibi)"
    if not model_cfg.bias:
        return "model.bias=false (every BLOOM linear layer and LayerNorm has a bias)"
    if not model_cfg.embedding_layernorm:
        return "model.embedding_layernorm=false (BLOOM always normalises the word embeddings)"
    if model_cfg.mlp_ratio != BLOOM_MLP_RATIO:
        return f"model.mlp_ratio={model_cfg.mlp_ratio} (BLOOM's MLP is always {BLOOM_MLP_RATIO} x d_model)"
    if model_cfg.mlp != "gelu_tanh":
        return f"model.mlp={model_cfg.mlp} (BLOOM's MLP is the tanh-approximated GELU)"
    if model_cfg.norm != "layernorm":
        return f"model.norm={model_cfg.norm} (every BLOOM LayerNorm has a bias)"
    if model_cfg.n_kv_head != model_cfg.n_head:
        return f"model.n_kv_head={model_cfg.n_kv_head} (BLOOM has one key/value head per query head)"
    if model_cfg.alibi_slopes != "paper":
        return f"model.alibi_slopes={model_cfg.alibi_slopes} (BLOOM uses the paper's slopes)"
    if model_cfg.parallel_block:
        return "model.parallel_block=true (BLOOM's block is sequential)"
    return slopes_refusal(model_cfg, _bloom_slopes(model_cfg.n_head), "BLOOM")


def check_bloom_compatible(model_cfg: ModelConfig) -> None:
    """Raise ConfigError (one line, naming the setting) when BLOOM cannot represent this model."""
    raise_if_refused(bloom_refusal(model_cfg), "BLOOM")


def bloom_config(model_cfg: ModelConfig, token_ids: dict[str, int] | None = None, dtype: str = "float32") -> dict:
    """The ``config.json`` of a ``BloomForCausalLM`` equal to our model (after ``check_bloom_compatible``).

    ``token_ids``: ``pad_token_id``, ``bos_token_id``, ``eos_token_id`` (default: our trained tokenizer's);
    ``dtype``: the weights' dtype as transformers names it (``float32``, ``bfloat16``, ``float16``).
    ``seq_length`` records the training length (transformers ignores it; ``model_config_from_bloom`` reads it).
    """
    check_bloom_compatible(model_cfg)
    ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head,
        "layer_norm_epsilon": model_cfg.layer_norm_eps,
        "initializer_range": model_cfg.init_std,
        "hidden_dropout": model_cfg.dropout,
        "attention_dropout": 0.0,
        "apply_residual_connection_post_layernorm": False,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "seq_length": model_cfg.seq_len,
        "dtype": dtype,
        **ids,
    }


def model_config_from_bloom(config_dict: dict) -> ModelConfig:
    """Our ``ModelConfig`` of a BLOOM ``config.json`` (an exported ``hf/`` directory, or any BLOOM model).

    Raises ConfigError for a config that is not BLOOM or uses what our GPT does not implement.
    """
    model_type = config_dict.get("model_type")
    if model_type != "bloom":
        raise ConfigError(f"config.json has model_type={model_type!r}; only BLOOM (model_type 'bloom') loads")
    if config_dict.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError("config.json sets apply_residual_connection_post_layernorm=true, which our GPT lacks")
    if not config_dict.get("tie_word_embeddings", True):
        raise ConfigError("config.json sets tie_word_embeddings=false; our GPT ties the output to the embeddings")
    hidden = config_dict.get("hidden_size", config_dict.get("n_embed"))
    values = {
        "n_layer": config_dict.get("n_layer", config_dict.get("num_hidden_layers")),
        "n_head": config_dict.get("n_head", config_dict.get("num_attention_heads")),
        "d_model": hidden,
        "vocab_size": config_dict.get("vocab_size"),
        "layer_norm_eps": config_dict.get("layer_norm_epsilon"),
        "init_std": config_dict.get("initializer_range"),
        "dropout": config_dict.get("hidden_dropout"),
        "seq_len": config_dict.get("seq_length"),
    }
    missing = [k for k in ("n_layer", "n_head", "d_model", "vocab_size") if values[k] is None]
    if missing:
        raise ConfigError(f"config.json lacks the BLOOM keys for {', '.join(missing)}")
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if v is not None and k in known})


def to_bloom_state_dict(our_state_dict: dict) -> dict:
    """BLOOM's tensor names for our GPT's state dict (``transformer.`` prefix; the tied head is not repeated)."""
    return {PREFIX + name: tensor for name, tensor in our_state_dict.items()}


def from_bloom_state_dict(hf_state_dict: dict) -> dict:
    """Our GPT's state dict from BLOOM's (with or without the ``transformer.`` prefix).

    An ``lm_head.weight`` must equal the word embedding (ours is tied); otherwise ConfigError.
    """
    state = {}
    head = None
    for name, tensor in hf_state_dict.items():
        if name == LM_HEAD:
            head = tensor
        else:
            state[name.removeprefix(PREFIX)] = tensor
    embedding = state.get("word_embeddings.weight")
    if head is not None and (embedding is None or not torch.equal(head, embedding)):
        raise ConfigError("the BLOOM weights have an lm_head.weight unlike the word embeddings; our GPT ties them")
    return state
