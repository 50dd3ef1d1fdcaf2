"""Extrapolation watched during training: the validation windows scored at multiples of the training length.

Users pick checkpoints and tune on what they watch, so every ``train.eval_every`` steps the train stage scores
``train.eval_lengths`` (multiples of ``model.seq_len``) with the eval stage's own code (``evaluate_model``: the
same windows, the same windowed control, sequence parallelism when the run has it) on ``train.eval_tokens``
predictions per length, and logs ``val/ppl@{k}x`` (with ``val/loss_stderr@{k}x`` and the 95% interval
``val/ppl_low@{k}x`` .. ``val/ppl_high@{k}x``, as the eval stage's rows carry them) and
``val/context_gain@{k}x`` (the windowed loss minus the full
loss: how much the context beyond the training length lowers the loss; negative when it hurts).

The train stage sits below this package, so the pipeline hands it the function built here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from pretrain.config import Config, ModelConfig
from pretrain.eval.perplexity import evaluate_model
from pretrain.eval.split import EvalSplit, make_split
from pretrain.parallel.distributed import DistContext


def extrapolation_lengths(cfg: Config) -> list[int]:
    """The token lengths ``train.eval_lengths`` names (multiples of ``model.seq_len``)."""
    return [k * cfg.model.seq_len for k in cfg.train.eval_lengths or ()]


def training_extrapolation(cfg: Config, ctx: DistContext, corpus) -> Callable[[torch.nn.Module, ModelConfig], dict]:
    """``score(model, model_cfg) -> {"ppl@2x": ..., "context_gain@2x": ..., ...}`` for the train stage (all ranks
    call it at the same step), or None when ``train.eval_lengths`` is empty."""
    lengths = extrapolation_lengths(cfg)
    if not lengths:
        return None
    ecfg = replace(
        cfg.eval,
        lengths=lengths,
        mode="nonoverlapping",
        windows="stream",  # the same tokens at every length, as the in-training curve compares lengths
        stride=None,
        max_tokens=cfg.train.eval_tokens,
        window_control=True,
        passkey=False,
    )
    tokens = corpus.tokens("val")
    split: EvalSplit | None = None

    def score(model: torch.nn.Module, model_cfg: ModelConfig) -> dict:
        """The lengths are multiples of ``model_cfg.seq_len``: the length now trained (``train.seq_len_schedule``)."""
        nonlocal split
        seq_len = model_cfg.seq_len
        lengths = [k * seq_len for k in cfg.train.eval_lengths]
        if split is None:  # the process groups, made once by every rank at the same step
            split = make_split(cfg.parallel, ctx)
        training = model.training
        model.eval()
        try:
            at = replace(ecfg, lengths=lengths)
            results, _, _ = evaluate_model(model, model_cfg, tokens, at, lengths, ctx, lambda message: None, split)
        finally:
            model.train(training)
        metrics = {"extrapolation_s": round(sum(entry["seconds"] for entry in results), 3)}
        for entry in results:
            k = entry["length"] // seq_len
            metrics[f"ppl@{k}x"] = entry["ppl"]
            metrics[f"loss@{k}x"] = entry["loss"]
            if entry["ppl_ci95"] is not None:  # at least two windows
                metrics[f"loss_stderr@{k}x"] = entry["loss_stderr"]
                metrics[f"ppl_low@{k}x"], metrics[f"ppl_high@{k}x"] = entry["ppl_ci95"]
            metrics[f"context_gain@{k}x"] = entry["windowed_loss"] - entry["loss"]
        return metrics

    return score
