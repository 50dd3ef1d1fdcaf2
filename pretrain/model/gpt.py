"""The GPT: pre-LayerNorm blocks, GELU MLP, tied embeddings, ALiBi by default.

The default layout is Hugging Face's ``BloomForCausalLM`` (word-embedding LayerNorm, biases everywhere,
tanh-GELU, one fused query/key/value projection laid out ``[head, (q, k, v), head_dim]``, the LM head tied
to the embedding), so that export to ``transformers`` is a renaming of tensors. Differences from BLOOM are
behind config flags: ``embedding_layernorm=false`` and ``bias=false`` give the GPT-2/nanoGPT variant (with
``mlp=gelu``, MPT's block), ``n_kv_head`` shares key/value heads among groups of query heads (grouped-query and
multi-query attention; the fused projection then lays each group out as its queries, key and value), ``mlp=swiglu``
is SwiGLU, ``parallel_block`` puts attention and MLP side by side (Falcon's new_decoder_architecture), and
the position-encoding baselines (``sinusoidal``, ``learned``, ``rope``, ``none``) exist for the
extrapolation comparison. ``pretrain.model.hf_formats`` says which transformers class represents which.
BLOOM's attention-probability dropout is not offered: the fused kernel never forms
the probabilities, so dropout applies to the residual branches only.

The position encoding is chosen in one place, ``PositionEncoding`` (``positions.py``); the attention
backend in one call, ``CausalSelfAttention.attend``, which sequence parallelism replaces from outside the
model (``pretrain.parallel``), as activation checkpointing wraps the blocks from outside
(``pretrain.train.activation_checkpointing``). The model knows nothing of either.

Decoding runs ``forward_cached`` (each module's own ``forward_cached`` beside its ``forward``): the new tokens'
keys and values go into a ``KVCache`` (``kv_cache.py``) and attention reads the cached ones with the global
offsets of both, so the ALiBi bias of every step is the one a full forward over the whole prefix gives. It uses
the same parameters and kernels, never the installed ``attend`` (one rank decodes), and leaves ``forward``
untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.model.kv_cache import CacheStep, KVCache
from pretrain.model.positions import PositionEncoding, is_absolute
from pretrain.ops.attention import alibi_attention
from pretrain.ops.documents import document_starts
from pretrain.ops.loss import linear_cross_entropy

# Signature of the attention call: (q, k, v, slopes, q_offset, k_offset, window=None) -> out, [B, H, L, D].
AttentionFn = Callable[..., torch.Tensor]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, pos: PositionEncoding):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.n_kv_head = cfg.n_kv_head
        # One fused projection laid out [kv_head, (its group's queries, key, value), head_dim]: with n_kv_head = n_head
        # that is BLOOM's [head, (q, k, v), head_dim] (3 x d_model rows, as before), with 1 Falcon's multi-query
        # [all queries, k, v].
        qkv_rows = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.d_model, qkv_rows, bias=cfg.bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.backend = cfg.attention
        self.pos = pos
        # Replaced from outside (sequence parallelism) with a function of the same signature.
        self.attend: AttentionFn | None = None

    def split_heads(self, qkv: torch.Tensor):
        """Queries ``[B, n_head, L, D]``, keys and values ``[B, n_kv_head, L, D]`` of the fused projection's output
        ``[B, L, (n_head + 2 n_kv_head) D]``; query head ``h`` reads key/value head ``h // (n_head / n_kv_head)``."""
        batch, length, _ = qkv.shape
        if self.n_kv_head == self.n_head:
            # BLOOM's fused layout: for each head, its query, key and value rows side by side.
            qkv = qkv.view(batch, length, self.n_head, 3, self.head_dim)
            return tuple(qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        group = self.n_head // self.n_kv_head
        qkv = qkv.view(batch, length, self.n_kv_head, group + 2, self.head_dim)
        q = qkv[:, :, :, :group].reshape(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        return q, qkv[:, :, :, group].transpose(1, 2), qkv[:, :, :, group + 1].transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        offset: int,
        positions: torch.Tensor,
        window: int | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.split_heads(self.query_key_value(x))
        q, k = self.pos.rotate(q, k, positions, positions)
        # Documents (train.document_mask) go only where asked, so attention functions without them keep working.
        docs = {} if document_ids is None else {"document_ids": document_ids}
        if self.attend is not None:
            y = self.attend(q, k, v, self.pos.slopes, offset, offset, window=window, **docs)
        else:
            y = alibi_attention(q, k, v, self.pos.slopes, offset, offset, backend=self.backend, window=window, **docs)
        return self.dense(y.transpose(1, 2).reshape(batch, length, -1))

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int, step: CacheStep) -> torch.Tensor:
        """``forward`` for new tokens continuing the rows of ``cache``: their keys and values are stored in it, and
        each group of rows at the same positions attends to its cached keys with global offsets."""
        batch, length, _ = x.shape
        q, k, v = self.split_heads(self.query_key_value(x))
        y = None if len(step.groups) == 1 else q.new_empty(q.shape)
        # One query a row (a decoding step): its bias is one row per head, so the reference kernel's materialized
        # bias costs nothing and its single fused call is 3x faster than the blockwise kernel's blocks.
        backend = "sdpa" if length == 1 and self.backend == "fused" else self.backend
        for group in step.groups:
            positions = torch.arange(group.position, group.position + length, device=x.device)
            q_group, k_group = self.pos.rotate(q[group.batch], k[group.batch], positions, positions)
            keys, values = cache.update(layer, group, length, k_group, v[group.batch])
            out = alibi_attention(
                q_group,
                keys,
                values,
                self.pos.slopes,
                group.position,  # the first new token's global position
                group.key_offset,  # the first cached key's
                backend=backend,
                window=cache.window,
            )
            if y is None:
                y = out
            else:
                y[group.batch] = out
        return self.dense(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """``model.mlp``: BLOOM's tanh-GELU (default), the exact GELU (MPT), or SwiGLU ``silu(x W_gate) * (x W_up)``
    (Shazeer 2020; Jais, BTLM), whose gate and up projections are one fused ``dense_h_to_4h`` ``[gate; up]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        width = cfg.mlp_width
        self.dense_h_to_4h = nn.Linear(cfg.d_model, 2 * width if self.kind == "swiglu" else width, bias=cfg.bias)
        self.dense_4h_to_h = nn.Linear(width, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu_tanh":
            # BLOOM's bloom_gelu_forward is the tanh approximation.
            return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))
        if self.kind == "gelu":
            return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, pos: PositionEncoding):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        self.self_attention = CausalSelfAttention(cfg, pos)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # model.parallel_block: x + attention(LN_1(x)) + MLP(LN_2(x)), Falcon's new_decoder_architecture.
        self.parallel = cfg.parallel_block

    def forward(
        self,
        x: torch.Tensor,
        offset: int,
        positions: torch.Tensor,
        window: int | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attention = self.dropout(self.self_attention(self.input_layernorm(x), offset, positions, window, document_ids))
        return self._add_mlp(x, attention)

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int, step: CacheStep) -> torch.Tensor:
        """``forward`` for new tokens continuing the rows of ``cache`` (decoding)."""
        return self._add_mlp(
            x, self.dropout(self.self_attention.forward_cached(self.input_layernorm(x), cache, layer, step))
        )

    def _add_mlp(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            # Summed as Falcon does (MLP plus attention, then the residual), so its export rounds alike.
            return x + (self.dropout(self.mlp(self.post_attention_layernorm(x))) + attention)
        x = x + attention
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pos = PositionEncoding(cfg)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.word_embeddings_layernorm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
            if cfg.embedding_layernorm
            else nn.Identity()
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, self.pos) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        offset: int = 0,
        positions: torch.Tensor | None = None,
        window: int | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, L, d_model]`` of tokens at global positions ``offset .. offset + L - 1``.

        ``positions`` ``[L]`` gives them explicitly instead (a sequence-parallel rank may hold pieces that
        are not contiguous); attention then comes from the installed sequence-parallel ``attend``. With
        ``window`` W each query sees only its last W keys (the evaluation's windowed control). ``document_ids``
        int64 ``[B, N]`` over global positions (``pretrain.ops.documents``; the whole window under sequence
        parallelism): a query sees only keys of its own document, and absolute encodings count positions from each
        document's first token (ALiBi's bias and RoPE are relative: inside a document they are unchanged).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
        if positions is None:
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        embedded = positions
        if document_ids is not None and is_absolute(self.cfg.pos_encoding):
            embedded = positions - document_starts(document_ids.to(positions.device))[:, positions]
        x = self.pos.embed(self.word_embeddings(input_ids), embedded)
        x = self.embed_dropout(self.word_embeddings_layernorm(x))
        for block in self.h:
            x = block(x, offset, positions, window, document_ids)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` of hidden states ``[..., d_model]``: the output projection, tied to the word
        embeddings. Callers with long inputs pass a few thousand rows at a time."""
        return F.linear(hidden, self.word_embeddings.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        offset: int = 0,
        positions: torch.Tensor | None = None,
        window: int | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, vocab]``, or with ``targets`` ``[B, L]`` the mean cross-entropy (ignore index -100).

        The loss never builds the logits tensor (``pretrain.ops.loss``); the output projection is tied to the
        word embeddings.
        """
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.hidden_states(input_ids, offset, positions, window, document_ids)
        if targets is None:
            return self.logits(hidden)
        return linear_cross_entropy(hidden, self.word_embeddings.weight, targets)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        rows: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, n, vocab]`` of ``n`` new tokens per row, continuing rows ``rows`` of ``cache`` (all when None).

        Row ``b`` of ``input_ids`` continues cache row ``rows[b]`` from the position after its cached tokens; its
        keys and values are added to the cache. The result equals ``forward`` over each row's whole prefix (with
        ``window=cache.window``) at the new positions; rows at different positions may be fed together. A windowed
        cache is fed ``cache.chunk`` tokens at a time, so its memory stays bounded. ``last_only``: the logits of
        the last new token only, ``[B, 1, vocab]`` (a prompt's prefill).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}")
        expected = cache.batch if rows is None else len(rows)
        if input_ids.shape[0] != expected:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows, but {expected} cache rows are continued")
        if len(cache.keys) != len(self.h):
            raise ValueError(f"the cache has {len(cache.keys)} layers; this model {len(self.h)}")
        chunk = cache.chunk if cache.window is not None else input_ids.shape[1]
        pieces = input_ids.split(max(1, chunk), dim=1)
        hidden = []
        for i, piece in enumerate(pieces):
            out = self._cached_hidden_states(piece, cache, rows)
            if not last_only or i == len(pieces) - 1:
                hidden.append(out[:, -1:] if last_only else out)
        return self.logits(hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=1))

    def _cached_hidden_states(self, input_ids: torch.Tensor, cache: KVCache, rows: list[int] | None) -> torch.Tensor:
        step = cache.begin(rows, input_ids.shape[1])
        positions = step.positions(input_ids.device)  # [B, n]: rows may be at different positions
        x = self.pos.embed(self.word_embeddings(input_ids), positions)
        x = self.embed_dropout(self.word_embeddings_layernorm(x))
        for layer, block in enumerate(self.h):
            x = block.forward_cached(x, cache, layer, step)
        cache.end(step)
        return self.ln_f(x)
