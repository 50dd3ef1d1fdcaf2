"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pretrain.config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of ``train.lr`` for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``max_steps``
    (Loshchilov & Hutter 2017, as in GPT-3 and nanoGPT); flat at the floor after that.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, wrap=None):
    """``(AdamW, LambdaLR)``. Biases, LayerNorms and other vectors are not decayed (GPT-3, nanoGPT).

    ``wrap(optimizer)`` runs before the schedule is attached (the divergence guard wraps ``step`` there: the
    schedule records the step function it will see)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if wrap is not None:
        wrap(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
