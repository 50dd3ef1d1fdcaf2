"""``bench gpu``'s row and exit logic, without a GPU: a planted ring error fails the ring row (also in fp32, where
the two runs once shared their leaf tensors and so one ``.grad``), targets are rows of their own, and the exit
status tells a missed target (1) from an error (2)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.bench.gpu import (
    EXIT_ERROR,
    EXIT_MISSED,
    EXIT_OK,
    compare_ring,
    exit_status,
    gpu_plan,
    rehearsal_plan,
    target_rows,
)
from pretrain.ops.attention import alibi_attention

PLAN = replace(rehearsal_plan(), ring_length=256, ring_heads=4)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient through it doubled: a ring whose dq is wrong and whose output is right."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def reference(q, k, v, s):
    return alibi_attention(q, k, v, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_planted_gradient_error_fails_the_ring_row(dtype):
    def planted(q, k, v, s):
        return alibi_attention(_ScaleGrad.apply(q), k, v, s)

    row = compare_ring(PLAN, dtype, planted, reference)
    assert row["status"].startswith("error"), row
    assert row["max_abs_error"]["out"] == 0 and row["max_abs_error"]["dq"] > 0
    assert exit_status([row]) == EXIT_ERROR


def test_a_planted_output_error_fails_the_ring_row():
    row = compare_ring(PLAN, torch.float32, lambda q, k, v, s: reference(q, k, v, s) + 0.01, reference)
    assert row["status"].startswith("error") and exit_status([row]) == EXIT_ERROR


def test_the_same_attention_on_both_sides_is_ok():
    row = compare_ring(PLAN, torch.float32, reference, reference)
    assert row["status"] == "ok" and exit_status([row]) == EXIT_OK


def _measured(plan, ratio, mfu):
    rows = [
        {"section": "attention", "backend": plan.attention_fused, "length": length, "fused_over_flash": ratio}
        for length in plan.attention_lengths
    ]
    rows += [{"section": "train_step", "model": m, "status": "ok", "mfu": mfu} for m in plan.train_models]
    return rows


def test_each_target_is_a_row_and_a_miss_exits_1_an_error_2():
    plan = gpu_plan()
    met = target_rows(plan, _measured(plan, 1.1, 0.45))
    assert len(met) == len(plan.attention_lengths) + 2
    assert {r["status"] for r in met} == {"pass"} and exit_status(met) == EXIT_OK
    assert any("MFU >= 40% for 350m" in r["name"] for r in met)
    missed = target_rows(plan, _measured(plan, 1.3, 0.45))
    assert {r["status"] for r in missed} == {"pass", "miss"} and exit_status(missed) == EXIT_MISSED
    assert exit_status(missed + [{"section": "flex", "status": "error: 1e-1 above 2e-3"}]) == EXIT_ERROR
    unmeasured = target_rows(plan, [])
    assert {r["status"] for r in unmeasured} == {"not measured"} and exit_status(unmeasured) == EXIT_OK


def test_the_rehearsal_computes_targets_but_never_judges_them():
    rows = target_rows(PLAN, _measured(PLAN, 9.0, 0.01))
    assert {r["status"] for r in rows} == {"rehearsed"} and exit_status(rows) == EXIT_OK
