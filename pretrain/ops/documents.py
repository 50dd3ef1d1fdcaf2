"""Documents inside a packed window: which document each position holds, and where each document starts.

With ``train.document_mask=true`` a query never attends to a key of another document of its window. Document ids
are int64 ``[batch, length]`` over *global* positions (like the kernels' offsets): position ``p`` of every row of a
sequence-parallel group holds the same id on every rank, so a shard, a ring block or Ulysses' whole sequence
reads the ids of its own positions. They come from the tokens themselves: a document ends with ``</s>``, so the
id of a position is the number of ``</s>`` before it (the ``</s>`` belongs to the document it ends).
"""

from __future__ import annotations

import torch


def document_ids_from_tokens(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """int64 ``[B, L]``: the number of ``eos_id`` tokens strictly before each position of ``tokens`` ``[B, L]``."""
    ends = (tokens == eos_id).to(torch.int64)
    return torch.cumsum(ends, dim=1) - ends


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, L]``: the first position of each position's document (ids are runs along the window)."""
    length = document_ids.shape[1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.cummax(torch.where(first, index, 0), dim=1).values


def check_document_ids(document_ids: torch.Tensor, batch: int, needed: int) -> None:
    """ValueError unless ``document_ids`` is an int64 ``[batch, >= needed]`` tensor (global positions)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dtype != torch.int64:
        what = document_ids.dtype if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(f"document_ids must be an int64 (LongTensor) [batch, length] tensor; got {what}")
    if document_ids.dim() != 2 or document_ids.shape[0] != batch or document_ids.shape[1] < needed:
        raise ValueError(
            f"document_ids must be [batch, length] = [{batch}, >= {needed}] over global positions (the last query "
            f"and key positions); got shape {tuple(document_ids.shape)}"
        )
