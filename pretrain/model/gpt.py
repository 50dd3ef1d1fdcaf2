"""The GPT: pre-LayerNorm blocks, GELU MLP, tied embeddings, ALiBi by default.

The default layout is Hugging Face's ``BloomForCausalLM`` (word-embedding LayerNorm, biases everywhere,
tanh-GELU, one fused query/key/value projection laid out ``[head, (q, k, v), head_dim]``, the LM head tied
to the embedding), so that export to ``transformers`` is a renaming of tensors. Differences from BLOOM are
behind config flags: ``embedding_layernorm=false`` and ``bias=false`` give the GPT-2/nanoGPT variant, and
the position-encoding baselines (``sinusoidal``, ``learned``, ``rope``, ``none``) exist for the
extrapolation comparison. BLOOM's attention-probability dropout is not offered: the fused kernel never forms
the probabilities, so dropout applies to the residual branches only.

The position encoding is chosen in one place, ``PositionEncoding``; the attention backend in one call,
``CausalSelfAttention.attend``, which sequence parallelism replaces from outside the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.ops.alibi import slopes as alibi_slopes
from pretrain.ops.attention import alibi_attention
from pretrain.ops.loss import linear_cross_entropy


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) position table, float32 ``[n_positions, dim]`` (sin on even, cos on odd dims)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table.float()


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021) of ``x`` ``[B, H, L, D]`` at ``positions`` ``[L]``, half-split layout."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, device=x.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class PositionEncoding(nn.Module):
    """Everything a position encoding does, in one place.

    ``embed`` adds absolute positions to the token embeddings (sinusoidal, learned), ``rotate`` rotates
    queries and keys (rope), and ``slopes`` is the ALiBi slope buffer the attention kernel reads (alibi).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.pos_encoding
        self.rope_base = cfg.rope_base
        self.max_positions = cfg.max_positions or cfg.seq_len
        slopes = alibi_slopes(cfg.n_head) if self.kind == "alibi" else None
        # float32 always: a bf16 slope would round the bias (see alibi.py). Not a parameter: never trained.
        self.register_buffer("slopes", slopes, persistent=False)
        if self.kind == "learned":
            self.table = nn.Embedding(self.max_positions, cfg.d_model)
        elif self.kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(self.max_positions, cfg.d_model), persistent=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.kind == "learned":
            if int(positions.max()) >= self.max_positions:
                raise ValueError(
                    f"position {int(positions.max())} is beyond the learned position table of "
                    f"{self.max_positions} rows (model.max_positions); a learned encoding cannot go longer"
                )
            return x + self.table(positions)
        if self.kind == "sinusoidal":
            if int(positions.max()) >= self.table.shape[0]:
                # The formula extends to any length; grow the table rather than refuse.
                self.table = sinusoidal_table(int(positions.max()) + 1, x.shape[-1]).to(x.device)
            return x + self.table[positions].to(x.dtype)
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        if self.kind != "rope":
            return q, k
        return rope_rotate(q, q_pos, self.rope_base), rope_rotate(k, k_pos, self.rope_base)


# Signature of the attention call: (q, k, v, slopes, q_offset, k_offset, window=None) -> out, [B, H, L, D].
AttentionFn = Callable[..., torch.Tensor]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, pos: PositionEncoding):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.backend = cfg.attention
        self.pos = pos
        # Each query sees at most its last `window` keys when set (GPT.set_attention_window).
        self.window: int | None = None
        # Replaced from outside (sequence parallelism) with a function of the same signature.
        self.attend: AttentionFn | None = None

    def forward(self, x: torch.Tensor, offset: int, positions: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # BLOOM's fused layout: for each head, its query, key and value rows side by side.
        qkv = self.query_key_value(x).view(batch, length, self.n_head, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        q, k = self.pos.rotate(q, k, positions, positions)
        if self.attend is not None:
            y = self.attend(q, k, v, self.pos.slopes, offset, offset, window=self.window)
        else:
            y = alibi_attention(q, k, v, self.pos.slopes, offset, offset, backend=self.backend, window=self.window)
        return self.dense(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.dense_4h_to_h = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BLOOM's bloom_gelu_forward is the tanh approximation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, pos: PositionEncoding):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.self_attention = CausalSelfAttention(cfg, pos)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, offset: int, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), offset, positions))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pos = PositionEncoding(cfg)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.word_embeddings_layernorm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
            if cfg.embedding_layernorm
            else nn.Identity()
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, self.pos) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer), so the
        # residual's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("self_attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                nn.init.normal_(param, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def set_attention_window(self, window: int | None) -> None:
        """Limit every query to its last ``window`` keys (None: the full causal context)."""
        for block in self.h:
            block.self_attention.window = window

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self, input_ids: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states ``[B, L, d_model]`` of tokens at global positions ``offset .. offset + L - 1``.

        ``positions`` ``[L]`` gives them explicitly instead (a sequence-parallel rank may hold pieces that
        are not contiguous); attention then comes from the installed sequence-parallel ``attend``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        x = self.pos.embed(self.word_embeddings(input_ids), positions)
        x = self.embed_dropout(self.word_embeddings_layernorm(x))
        for block in self.h:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, offset, positions, use_reentrant=False)
            else:
                x = block(x, offset, positions)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        offset: int = 0,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, vocab]``, or with ``targets`` ``[B, L]`` the mean cross-entropy (ignore index -100).

        The loss never builds the logits tensor (``pretrain.ops.loss``); the output projection is tied to the
        word embeddings.
        """
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.hidden_states(input_ids, offset, positions)
        if targets is None:
            return F.linear(hidden, self.word_embeddings.weight)
        return linear_cross_entropy(hidden, self.word_embeddings.weight, targets)
