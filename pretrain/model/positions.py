"""Every position encoding in one module: what each does, and what the rest of the pipeline needs to know of it.

``PositionEncoding`` is the model's part (``embed`` adds absolute positions to the token embeddings,
``rotate`` rotates queries and keys, ``slopes`` is the ALiBi buffer the attention kernel reads).
``ENCODINGS`` describes each encoding to the stages that must treat them differently: whether it is absolute
(a table added to the embeddings: a length past training is not expected to work), the longest input it can
read, and the parameters it adds. A new encoding is a change here (and its name in ``config.POS_ENCODINGS``,
where the command line's allowed values are checked before any work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.config import POS_ENCODINGS, ModelConfig
from pretrain.ops.alibi import slopes as alibi_slopes


@dataclass(frozen=True)
class Encoding:
    """What the stages need to know of one position encoding."""

    name: str
    absolute: bool  # positions added to the token embeddings (sinusoidal, learned)
    table: bool = False  # a learned table of model.max_positions rows: the longest input, and parameters


ENCODINGS = {
    "alibi": Encoding("alibi", absolute=False),
    "sinusoidal": Encoding("sinusoidal", absolute=True),
    "learned": Encoding("learned", absolute=True, table=True),
    "rope": Encoding("rope", absolute=False),
    "none": Encoding("none", absolute=False),
}
assert tuple(ENCODINGS) == POS_ENCODINGS, "config.POS_ENCODINGS must name exactly the encodings defined here"


def is_absolute(name: str) -> bool:
    """Whether the encoding adds absolute positions to the embeddings (its curve past training is not ALiBi's)."""
    return ENCODINGS[name].absolute


def max_length(cfg: ModelConfig) -> int | None:
    """The longest input a model can read: a learned table has its rows; other encodings have no limit."""
    return (cfg.max_positions or cfg.seq_len) if ENCODINGS[cfg.pos_encoding].table else None


def position_parameters(cfg: ModelConfig) -> int:
    """Parameters the encoding adds to the model (a learned table's rows times d_model; none for the others)."""
    return max_length(cfg) * cfg.d_model if ENCODINGS[cfg.pos_encoding].table else 0


def embed_scale(cfg: ModelConfig) -> float:
    """How many times their absolute positions token embeddings count before the embedding LayerNorm.

    ``model.embed_scale`` when set; otherwise the ratio of token to position magnitude at initialization that the
    ALiBi paper's fairseq baselines have (Press et al. 2022, after Vaswani et al. 2017): fairseq draws token
    embeddings with std ``d_model ** -0.5`` and multiplies them by ``sqrt(d_model)`` (per-dimension std 1), then adds
    a sinusoidal table (per-dimension RMS ``1/sqrt(2)``) or a learned table drawn with std ``d_model ** -0.5``. Our
    token embeddings and a learned table are drawn with ``init_std`` (0.02), so the same ratios are ``1 / init_std``
    for sinusoidal (tokens ``sqrt(2)`` times the table's RMS, as in fairseq) and ``sqrt(d_model)`` for learned.
    It is applied as positions times ``1 / embed_scale``: with the embedding LayerNorm, which does not see a common
    factor, that is tokens times ``embed_scale`` in the forward and the backward pass alike (up to the LayerNorm's
    epsilon); without it, the residual stream keeps the scale its blocks and the tied head were initialized for.
    Relative encodings add nothing to the embeddings: 1.
    """
    if not is_absolute(cfg.pos_encoding):
        return 1.0
    if cfg.embed_scale is not None:
        return float(cfg.embed_scale)
    return math.sqrt(cfg.d_model) if ENCODINGS[cfg.pos_encoding].table else 1.0 / cfg.init_std


def model_slopes(n_head: int, rule: str = "paper", head_dim: int = 1) -> torch.Tensor:
    """The slopes a model's attention reads, float32 ``[n_head]``: the paper's (``ops.alibi.slopes``), or for
    ``model.alibi_slopes=falcon`` Falcon's: transformers' Falcon rounds the paper's slopes to bfloat16, multiplies by
    the key position, and adds that to the raw scores before both are scaled by ``1/sqrt(head_dim)``, so its slope is
    ``bf16(m) / sqrt(head_dim)``. (Its product with the position is rounded to bfloat16 too: that part no slope can
    reproduce, see ``model/falcon.py``.)"""
    slopes = alibi_slopes(n_head)
    if rule == "paper":
        return slopes
    return (slopes.to(torch.bfloat16).double() / math.sqrt(head_dim)).float()


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
        # Positions enter as table * position_scale (see embed_scale); 1.0 leaves the sum as it was before the scale.
        self.position_scale = 1.0 / embed_scale(cfg)
        # model.alibi_slopes=falcon: Falcon's slopes (see model_slopes).
        self.slope_rule = (cfg.n_head, cfg.alibi_slopes, cfg.head_dim)
        slopes = model_slopes(*self.slope_rule) if self.kind == "alibi" else None
        # float32 always: a bf16 slope would round the bias (see alibi.py). Not a parameter: never trained.
        self.register_buffer("slopes", slopes, persistent=False)
        if self.kind == "learned":
            self.table = nn.Embedding(self.max_positions, cfg.d_model)
        elif self.kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(self.max_positions, cfg.d_model), persistent=False)

    def _apply(self, fn, recurse=True):
        # An engine that casts the whole module (older DeepSpeed runs module.bfloat16() on bf16 runs) must not
        # round the slopes: 0.707107 would become 0.707031, a bias off by 0.16 at distance 2048, and eval
        # (float32 slopes) would score another model than the one trained. They are rebuilt from the rule.
        super()._apply(fn, recurse)
        if self.slopes is not None and self.slopes.dtype != torch.float32:
            self.slopes = model_slopes(*self.slope_rule).to(self.slopes.device)
        return self

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.kind == "learned":
            if int(positions.max()) >= self.max_positions:
                raise ValueError(
                    f"position {int(positions.max())} is beyond the learned position table of "
                    f"{self.max_positions} rows (model.max_positions); a learned encoding cannot go longer"
                )
            return x + self._scaled(self.table(positions))
        if self.kind == "sinusoidal":
            if int(positions.max()) >= self.table.shape[0]:
                # The formula extends to any length; grow the table rather than refuse.
                self.table = sinusoidal_table(int(positions.max()) + 1, x.shape[-1]).to(x.device)
            return x + self._scaled(self.table[positions]).to(x.dtype)
        return x

    def _scaled(self, table_rows: torch.Tensor) -> torch.Tensor:
        return table_rows if self.position_scale == 1.0 else table_rows * self.position_scale

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        if self.kind != "rope":
            return q, k
        return rope_rotate(q, q_pos, self.rope_base), rope_rotate(k, k_pos, self.rope_base)
