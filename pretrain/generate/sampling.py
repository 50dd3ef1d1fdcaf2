"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k and top-p (nucleus).

Each prompt draws from its own random generator, seeded from ``generate.seed`` and the prompt's index among all
prompts, so a prompt's sample does not depend on which other prompts share its batch, nor on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 is greedy (top-k and top-p then change nothing)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is not allowed; it must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is not allowed; it must be >= 1 or None")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is not allowed; it must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, index: int) -> torch.Generator | None:
        """The random generator of prompt ``index`` (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        gen = torch.Generator()
        # Distinct, well-spread seeds for neighbouring prompts.
        gen.manual_seed((self.seed * 1_000_003 + index) % (2**63))
        return gen


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` ``[B, V]`` with every token outside the top ``top_k`` and outside the nucleus set to ``-inf``.

    The nucleus is the smallest set of the most likely tokens whose probability reaches ``top_p``: a token stays
    when the tokens ranked above it hold less than ``top_p``, so the most likely token always stays.
    """
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        above = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = above >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row of ``logits`` ``[B, V]``; row ``b`` draws from ``generators[b]``."""
    if sampling.greedy:
        return logits.argmax(dim=-1).tolist()
    filtered = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1).cpu()
    return [int(torch.multinomial(row, 1, generator=gen)) for row, gen in zip(probs, generators)]
