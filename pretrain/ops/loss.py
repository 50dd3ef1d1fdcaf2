"""The language-model loss without the logits tensor: the tied output projection fused with cross-entropy.

``logits = hidden @ weight.T`` is ``vocab / d_model`` times larger than the hidden states (64x for the
tiny model, 10x for 125m), and autograd keeps it in float32 together with its log-softmax and their
gradients: four ``vocab`` floats a token, the largest activation of a small model. Here the tokens go
through in chunks of at most ``CHUNK_BYTES`` of float32 logits; each chunk's gradient (``softmax - onehot``) is
taken right away in the forward pass and turned into the gradients of the hidden states and of the weight,
so only one chunk's logits ever exist. The backward pass then only scales those gradients. The arithmetic
is the same as ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``: logits in the input dtype,
softmax in float32, matrix products in the input dtype, the weight's gradient summed in float32.

Evaluation scores every prediction with the same chunks (``token_cross_entropy``: per-token losses, no
gradients), so that scoring long windows during training adds one chunk of logits, not ``[rows, vocab]``
logits and their log-softmax.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100

# Bytes of float32 logits per chunk, the only chunk-sized buffer: 16 MiB (512 tokens of a 8192-token
# vocabulary, 83 of a 50k one). Larger chunks were no faster on a 2-core CPU; on a GPU (128 MiB) they
# amortize launches.
CHUNK_BYTES = 1 << 24
CHUNK_BYTES_CUDA = 1 << 27


def chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: as many rows of float32 logits as fit in the device's chunk bytes (at least one)."""
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES
    return max(1, budget // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, with_grads):
        count = (targets != IGNORE_INDEX).sum()
        # A batch of only ignored targets has no mean: nan, as F.cross_entropy gives.
        inv_count = 1.0 / count.clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grads else None
        # One chunk-sized buffer for all chunks (a fresh 16 MiB block would cost its page faults every time):
        # the logits become exp(logits - max) and then the softmax in place.
        buffer = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            logits = buffer[: h.shape[0]]
            if h.dtype == torch.float32:
                torch.mm(h, weight.t(), out=logits)
            else:
                logits.copy_(h @ weight.t())
            picked = logits.gather(1, safe_t).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            lse = (row_max + sums.log()).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if with_grads:
                # d(mean loss)/d(logits) = (softmax - onehot) / count on valid rows, 0 on ignored ones.
                probs = exps.mul_((valid * inv_count).unsqueeze(1) / sums)
                probs.scatter_add_(1, safe_t, (-(valid * inv_count)).unsqueeze(1).to(probs.dtype))
                g = probs.to(hidden.dtype)
                torch.mm(g, weight, out=grad_hidden[start : start + chunk])
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += (g.t() @ h).float()
        loss = torch.where(count > 0, total * inv_count, torch.full_like(total, float("nan")))
        if with_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (ignore index -100), chunked.

    hidden: ``[..., d]``; weight: ``[vocab, d]``; targets: int64 of ``hidden``'s leading shape.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} hidden states")
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk_tokens(weight.shape[0], hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, with_grads)


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every prediction of ``hidden @ weight.T``, float32 of ``targets``' shape, in the chunks of
    ``linear_cross_entropy`` (one chunk of logits at a time; no gradients). Ignored targets (-100) get 0.

    hidden: ``[..., d]``; weight: ``[vocab, d]``; targets: int64 of ``hidden``'s leading shape.
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} hidden states")
    chunk = chunk_tokens(weight.shape[0], hidden.device)
    out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        t = targets[start : start + chunk]
        valid = t != IGNORE_INDEX
        logits = buffer[: h.shape[0]]
        if h.dtype == torch.float32:
            torch.mm(h, weight.t(), out=logits)
        else:
            logits.copy_(h @ weight.t())
        picked = logits.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        lse = (row_max + logits.sub_(row_max).exp_().sum(dim=1, keepdim=True).log()).squeeze(1)
        out[start : start + chunk] = torch.where(valid, lse - picked, 0.0)
    return out.view(shape)


# exp(50) = 5e21: far above any vocabulary, so the clamp only keeps a diverged loss from overflowing to inf.
MAX_LOSS_FOR_PERPLEXITY = 50.0


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean cross-entropy in nats, clamped so that a diverged loss gives a finite number."""
    return math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY))
