"""Runs the stages a config asks for: ``all`` is prepare -> train (eval joins in a later release)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config, ConfigError
from pretrain.distributed import init_distributed, shutdown_distributed


class PipelineError(RuntimeError):
    """A problem with the user's input found while a stage runs (a missing file, an empty corpus, ...)."""


def to_config(dict_cfg: DictConfig) -> Config:
    """Build the typed config; this runs every ``__post_init__`` check before any work starts."""
    return OmegaConf.to_object(dict_cfg)


def run_from_dictconfig(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    ctx = init_distributed()
    try:
        run_stages(cfg, ctx)
    except (ConfigError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


def run_stages(cfg: Config, ctx) -> None:
    from pretrain.prepare import run_prepare

    # A later stage asks for the prepared corpus again: a cache hit when it is already there.
    corpus = run_prepare(cfg, ctx)
    if cfg.stage in ("all", "train"):
        from pretrain.train import run_train

        run_train(cfg, ctx, corpus)
