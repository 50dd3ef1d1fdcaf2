"""Error bars of the eval: the standard error of the mean loss over windows, the 95% interval on ppl, their sums over
ranks, and eval.compare's paired verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.eval.perplexity import Scores, paired_difference, ppl_interval, ratio_stderr, score_windows
from pretrain.eval.report import format_table
from pretrain.eval.windows import nonoverlapping_windows, shard, sliding_windows


def fake_losses(inputs, targets, positions=None):
    return (targets % 7).float() + 0.5


def test_stderr_of_equal_windows_is_the_standard_error_of_their_means():
    rng = np.random.default_rng(0)
    means = rng.normal(3.0, 0.2, size=12)
    counts = np.full(12, 64.0)
    expected = means.std(ddof=1) / math.sqrt(12)
    assert ratio_stderr(means * counts, counts) == pytest.approx(expected, rel=1e-12)
    assert ratio_stderr(np.array([5.0]), np.array([2.0])) is None  # one window: no noise estimate
    assert ratio_stderr(np.array([5.0, 0.0]), np.array([2.0, 0.0])) is None  # an unscored window does not count


def test_interval_is_the_exponentiated_normal_interval_of_the_loss():
    low, high = ppl_interval(2.0, 0.1)
    assert low == pytest.approx(math.exp(2.0 - 1.959964 * 0.1)) and high == pytest.approx(math.exp(2.0 + 0.1959964))
    assert ppl_interval(2.0, None) is None


@pytest.mark.parametrize("mode", ["nonoverlapping", "sliding"])
def test_window_sums_add_up_over_ranks(mode):
    """Each data-parallel rank keeps its windows' sums at their global indices: the sum over ranks is one rank's."""
    tokens = np.arange(2000) * 31 % 101
    windows = (
        nonoverlapping_windows(len(tokens), 32) if mode == "nonoverlapping" else sliding_windows(len(tokens), 32, 8)
    )
    whole = score_windows(tokens, windows, fake_losses, batch_size=3)
    assert whole.window_tokens.sum() == whole.tokens and whole.window_loss.sum() == pytest.approx(whole.loss_sum)
    indices = list(range(len(windows)))
    parts = [
        score_windows(
            tokens, shard(windows, r, 3), fake_losses, 2, indices=shard(indices, r, 3), n_windows=len(windows)
        )
        for r in range(3)
    ]
    assert np.allclose(sum(p.window_loss for p in parts), whole.window_loss)
    assert np.array_equal(sum(p.window_tokens for p in parts), whole.window_tokens)
    assert whole.loss_stderr is not None and whole.loss_stderr > 0


def test_paired_difference_sees_a_small_shift_the_unpaired_noise_hides():
    rng = np.random.default_rng(1)
    counts = np.full(40, 100.0)
    a_means = rng.normal(4.0, 0.5, size=40)  # windows differ a lot ...
    a = Scores(8, loss_sum=float((a_means * counts).sum()), tokens=4000, n_windows=40,
               window_loss=a_means * counts, window_tokens=counts)  # fmt: skip
    shifted = a_means - 0.05 + rng.normal(0, 0.01, size=40)  # ... model B is 0.05 better on every one
    b = Scores(8, loss_sum=float((shifted * counts).sum()), tokens=4000, n_windows=40,
               window_loss=shifted * counts, window_tokens=counts)  # fmt: skip
    assert 1.96 * a.loss_stderr > 0.05  # unpaired intervals overlap
    verdict = paired_difference(a, b)
    assert verdict["loss_diff"] == pytest.approx(b.loss - a.loss) and verdict["differs"] is True
    same = paired_difference(a, a)
    assert same["loss_diff"] == 0 and same["differs"] is False
    assert paired_difference(a, Scores(8, n_windows=3)) is None  # other windows: no paired verdict


def test_table_shows_the_error_bars_and_the_verdict():
    row = {"length": 64, "loss": 3.0, "loss_stderr": 0.05, "ppl": 20.09, "ppl_ci95": [18.2, 22.2], "tokens": 1000}
    model = {"name": "a", "pos_encoding": "alibi", "train_seq_len": 64, "results": [row], "skipped": []}
    other = dict(model, name="b", versus={"model": "a", "rows": [
        {"length": 64, "loss_diff": -0.2, "diff_stderr": 0.01, "differs": True}]})  # fmt: skip
    table = format_table({"mode": "nonoverlapping", "models": [model, other]})
    assert "0.0500" in table and "18.20..22.20" in table
    assert "+-0.2000" not in table and "-0.2000 +- 0.0100  differs (beyond 1.96 se)" in table


def test_scores_all_reduce_keeps_the_window_sums_on_one_rank():
    scores = Scores(4, n_windows=2, window_loss=np.array([1.0, 2.0]), window_tokens=np.array([1.0, 1.0]))

    class One:
        world_size = 1

    assert scores.all_reduce(One()) is scores and torch.tensor(scores.window_loss).sum() == 3.0


def test_training_extrapolation_scores_multiples_of_the_current_length_and_logs_the_error_bars(monkeypatch):
    """Under train.seq_len_schedule the model config handed in carries the length now trained."""
    from dataclasses import replace

    import pretrain.eval.during_training as during
    from pretrain.config import Config, ModelConfig, TrainConfig

    seen = []

    def fake_evaluate(model, model_cfg, tokens, ecfg, lengths, ctx, say, split):
        seen.append((list(lengths), list(ecfg.lengths), model_cfg.seq_len))
        return [
            {"length": n, "loss": 2.0, "ppl": 7.4, "loss_stderr": 0.1, "ppl_ci95": [6.0, 9.0], "windowed_loss": 2.1,
             "seconds": 0.1}
            for n in lengths
        ], [], []  # fmt: skip

    class Corpus:
        def tokens(self, split):
            return np.zeros(10, dtype=np.int64)

    monkeypatch.setattr(during, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(during, "make_split", lambda pcfg, ctx: object())
    cfg = Config(model=ModelConfig(seq_len=64), train=TrainConfig(eval_lengths=[1, 2]))
    score = during.training_extrapolation(cfg, None, Corpus())
    model = torch.nn.Linear(1, 1)
    metrics = score(model, replace(cfg.model, seq_len=32))  # the schedule's first length
    assert seen[-1] == ([32, 64], [32, 64], 32)
    assert metrics["ppl@2x"] == 7.4 and metrics["loss_stderr@2x"] == 0.1
    assert (metrics["ppl_low@1x"], metrics["ppl_high@1x"]) == (6.0, 9.0)
    score(model, cfg.model)
    assert seen[-1][0] == [64, 128]
