"""The decoding loop: prompts in, completions out, through the model's KV cache (``GPT.forward_cached``).

A batch of prompts shares one ``KVCache`` whose rows may sit at different positions, so prompts of different
lengths are decoded together without padding: each prompt is prefilled (prompts of one length in one pass), then
every unfinished row advances one token per pass. A row stops at the end-of-sequence token or after
``max_new_tokens``; finished rows leave the passes. A prompt's completion is the one it gets alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pretrain.generate.sampling import Sampling, next_tokens
from pretrain.model.gpt import GPT
from pretrain.model.kv_cache import KVCache

# Temperature 0.
GREEDY = Sampling()

# Tokens per row and pass while a windowed cache reads a long prompt: the cache holds window - 1 + this.
PREFILL_CHUNK = 512


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    eos_id: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """The completion of each prompt (token ids; the end-of-sequence token, when reached, is not included).

    ``prompts`` are token ids (each at least one); ``batch_size`` prompts decode together. ``window`` keeps only
    the last ``window`` keys in the cache (``GPT.forward(..., window=W)`` semantics, positions global).
    ``on_batch(first, completions)`` is called after each batch, with the index of its first prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed; it must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed; it must be >= 1")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens; a completion needs at least one token to continue")
    completions: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        generators = [sampling.generator(first + i) for i in range(len(batch))]
        done = _generate_batch(model, batch, max_new_tokens, sampling, generators, eos_id, window)
        completions.extend(done)
        if on_batch is not None:
            on_batch(first, done)
    return completions


def _generate_batch(model, prompts, max_new_tokens, sampling, generators, eos_id, window) -> list[list[int]]:
    device = model.word_embeddings.weight.device
    longest = max(len(p) for p in prompts)
    if window is None:
        cache = KVCache.for_model(model, len(prompts), capacity=longest + max_new_tokens)
    else:
        cache = KVCache.for_model(model, len(prompts), window=window, chunk=min(PREFILL_CHUNK, longest))
    # Prefill: the prompts of one length in one pass; only each prompt's last logits are needed.
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    last: dict[int, torch.Tensor] = {}
    for rows in by_length.values():
        ids = torch.tensor([prompts[row] for row in rows], dtype=torch.long, device=device)
        logits = model.forward_cached(ids, cache, rows=rows, last_only=True)[:, -1]
        last.update(zip(rows, logits))
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    logits = torch.stack([last[row] for row in active])
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, [generators[row] for row in active])
        still = []
        for row, token in zip(active, chosen):
            if eos_id is not None and token == eos_id:
                continue
            out[row].append(token)
            still.append(row)
        active = still
        if not active or step == max_new_tokens - 1:
            break
        ids = torch.tensor([[out[row][-1]] for row in active], dtype=torch.long, device=device)
        logits = model.forward_cached(ids, cache, rows=active)[:, -1]
    return out
