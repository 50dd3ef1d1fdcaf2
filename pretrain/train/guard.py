"""The divergence guard: a step whose loss or gradients are not finite changes no weight, too many such steps in
a row stop the run, and loss spikes are logged and counted.

The update is skipped inside the optimizer's ``step`` (the innermost one, which DeepSpeed calls at every ZeRO
stage and precision), as DeepSpeed's fp16 loss scaler skips an overflowing step: the weights and Adam's moments
stay as they were. The training loop tells the guard whether the step's loss was finite on every rank; the
optimizer checks the gradients it is about to apply (at ZeRO-1/2/3, this rank's partition of them).
"""

from __future__ import annotations

import math
import types
from collections import deque

import torch

from pretrain.errors import PipelineError


def gradients_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor | bool:
    """Whether every gradient the optimizer holds is finite: a bool tensor on the gradients' device (no host sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class DivergenceGuard:
    """Wraps ``optimizer.step`` (``wrap``) so that a non-finite step leaves the weights unchanged, and counts bad steps.

    ``max_bad_steps`` non-finite steps in a row raise a PipelineError (the run stops, non-zero exit, no
    checkpoint of the bad state). ``spike_factor`` > 0 flags a finite loss above that multiple of the mean of the
    last ``spike_window`` finite losses.
    """

    def __init__(self, max_bad_steps: int, spike_factor: float, spike_window: int = 50):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.loss_finite = True
        self.updates_skipped = 0  # optimizer steps skipped in the current training step
        self.bad_in_a_row = 0
        self.first_bad_step: int | None = None
        self.bad_steps = 0
        self.spikes = 0
        self.failure: str | None = None

    def wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step`` skip the update of a bad step (before a schedule is attached to it)."""
        inner = optimizer.step

        def guarded_step(opt, *args, **kwargs):
            # The one host sync of a training step: whether to update at all must be known here.
            if bool(gradients_finite(opt) & self.loss_finite):
                return inner(*args, **kwargs)
            self.updates_skipped += 1
            return None

        # A bound method, as the learning-rate schedule expects when it wraps ``step`` in turn.
        optimizer.step = types.MethodType(guarded_step, optimizer)

    def before_update(self, loss_finite: torch.Tensor | bool) -> None:
        """Called before the engine's step with whether the step's loss was finite on every rank (a bool, or a bool
        tensor left on the device: the optimizer's step reads it with the gradients' check, in one sync)."""
        self.loss_finite = loss_finite
        self.updates_skipped = 0

    def raise_if_diverged(self) -> None:
        """PipelineError once ``max_bad_steps`` bad steps came in a row (called after the step is logged)."""
        if self.failure is not None:
            raise PipelineError(self.failure)

    def after_step(self, step: int, loss: float, grad_norm: float | None) -> dict:
        """Account for optimizer step ``step``; return what to log with it."""
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm)
        bad = not math.isfinite(loss) or self.updates_skipped > 0 or norm_bad
        record: dict = {}
        if bad:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            if self.first_bad_step is None:
                self.first_bad_step = step
            record["skipped"] = True
            if self.bad_in_a_row >= self.max_bad_steps:
                self.failure = (
                    f"training diverged: the loss or gradients were not finite in {self.bad_in_a_row} steps in a row "
                    f"(steps {self.first_bad_step}..{step}, train.max_bad_steps={self.max_bad_steps}); no checkpoint "
                    "was written from them. Resume from the last checkpoint with a lower learning rate "
                    "(e.g. train.lr=... train.resume_override=[train.lr]) or more warm-up"
                )
            return record
        self.bad_in_a_row, self.first_bad_step = 0, None
        if self.spike_factor > 0 and len(self.recent) >= 10:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                self.spikes += 1
                record["loss_spike"] = True
        self.recent.append(loss)
        return record
