"""The divergence guard: a non-finite step changes no weight and no optimizer state, too many in a row stop the run,
and loss spikes are flagged."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.errors import PipelineError
from pretrain.train.guard import DivergenceGuard


def setup(max_bad_steps=3, spike_factor=2.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    guard = DivergenceGuard(max_bad_steps, spike_factor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard.wrap(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # attaches to the wrapped step
    return model, optimizer, scheduler, guard


def one_step(model, optimizer, scheduler, guard, step, poison=None):
    loss = model(torch.ones(3, 4)).pow(2).mean()
    if poison == "loss":
        loss = loss * math.nan
    loss.backward()
    if poison == "grad":
        model.weight.grad[0, 0] = math.inf
    guard.before_update(bool(torch.isfinite(loss)))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return guard.after_step(step, loss.item(), None)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_a_non_finite_step_leaves_weights_and_moments_unchanged(poison):
    model, optimizer, scheduler, guard = setup()
    one_step(model, optimizer, scheduler, guard, 1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    flags = one_step(model, optimizer, scheduler, guard, 2, poison)
    assert flags == {"skipped": True}
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for name, value in optimizer.state[model.weight].items():
        assert torch.equal(value, moments[name]), name
    assert one_step(model, optimizer, scheduler, guard, 3) == {}  # a good step updates again
    assert not torch.equal(model.weight, weights["weight"])


def test_max_bad_steps_in_a_row_stop_the_run_and_a_good_step_resets_the_count():
    model, optimizer, scheduler, guard = setup(max_bad_steps=3)
    one_step(model, optimizer, scheduler, guard, 1, "loss")
    one_step(model, optimizer, scheduler, guard, 2, "loss")
    one_step(model, optimizer, scheduler, guard, 3)
    one_step(model, optimizer, scheduler, guard, 4, "loss")
    one_step(model, optimizer, scheduler, guard, 5, "grad")
    guard.raise_if_diverged()
    one_step(model, optimizer, scheduler, guard, 6, "loss")
    with pytest.raises(PipelineError, match=r"3 steps in a row \(steps 4\.\.6, train.max_bad_steps=3\)"):
        guard.raise_if_diverged()
    assert guard.bad_steps == 5


def test_a_non_finite_gradient_norm_counts_as_bad():
    guard = DivergenceGuard(5, 0.0)
    assert guard.after_step(1, 1.0, math.inf) == {"skipped": True}
    assert guard.after_step(2, 1.0, 0.5) == {}


def test_a_loss_far_above_the_recent_mean_is_a_spike():
    guard = DivergenceGuard(5, 2.0)
    for step in range(1, 21):
        assert guard.after_step(step, 3.0, 1.0) == {}
    assert guard.after_step(21, 6.5, 1.0) == {"loss_spike": True}
    assert guard.after_step(22, 5.0, 1.0) == {}
    assert guard.spikes == 1
    off = DivergenceGuard(5, 0.0)
    for step in range(1, 21):
        off.after_step(step, 3.0, 1.0)
    assert off.after_step(21, 100.0, 1.0) == {}
