"""Runs the stages a config asks for: ``all`` is prepare -> train -> eval."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config
from pretrain.errors import ConfigError, PipelineError
from pretrain.parallel.distributed import init_distributed, shutdown_distributed


def to_config(dict_cfg: DictConfig) -> Config:
    """Build the typed config; this runs every ``__post_init__`` check before any work starts."""
    return OmegaConf.to_object(dict_cfg)


def run_from_dictconfig(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if cfg.print_plan:
        print_run_plan(cfg)
        return
    ctx = init_distributed()
    try:
        run_stages(cfg, ctx)
    except (ConfigError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


def print_run_plan(cfg: Config) -> None:
    """``print_plan=true``: the plan for ``plan_world_size`` devices (or the launcher's world), no work."""
    from pretrain.parallel.distributed import launcher_env
    from pretrain.perf.plan import format_plan, make_plan

    rank, world, _ = launcher_env()
    if rank == 0:
        # The vocabulary is the tokenizer's target size: the plan needs no prepared corpus.
        print(format_plan(make_plan(cfg, cfg.plan_world_size or world, vocab_size=cfg.data.vocab_size)))


def run_stages(cfg: Config, ctx) -> None:
    """``all``: prepare -> train -> eval; ``prepare`` / ``train`` / ``eval``: that stage after prepare."""
    from pretrain.data.prepare import run_prepare

    if cfg.stage == "all" and cfg.parallel.sp_size > 1:
        # Eval lengths a sequence-parallel group cannot split fail now, not after training.
        from pretrain.eval.run import check_eval_split, eval_lengths

        heads = {"model": cfg.model.n_head}
        check_eval_split(
            eval_lengths(cfg), bool(cfg.eval.lengths), cfg.model.seq_len, heads, cfg.parallel, ctx.world_size
        )
    trained_tokenizer = None
    if cfg.stage == "eval" and cfg.eval.checkpoint is None:
        # Prepare (a cache hit when the corpus is there) gives the validation split and installs its tokenizer
        # in the run directory: a model trained on another corpus must not be scored on this one.
        if (Path(cfg.run_dir) / "checkpoints" / "model.safetensors").is_file():
            trained_tokenizer = _read_if_file(Path(cfg.run_dir) / "tokenizer" / "spm.model")
        ctx.barrier()  # every rank has read it before rank 0 may replace it
    # A later stage asks for the prepared corpus again: a cache hit when it is already there.
    corpus = run_prepare(cfg, ctx)
    if cfg.stage in ("all", "train"):
        from pretrain.train.loop import run_train

        run_train(cfg, ctx, corpus)
    if trained_tokenizer is not None:
        installed = Path(cfg.run_dir) / "tokenizer" / "spm.model"
        if trained_tokenizer != installed.read_bytes():
            ctx.barrier()
            if ctx.is_main:
                installed.write_bytes(trained_tokenizer)
            raise PipelineError(
                f"{cfg.run_dir} was trained with another tokenizer than these data.* settings give; run stage=eval "
                "with the data.* settings it was trained with"
            )
    if cfg.stage in ("all", "eval"):
        from pretrain.eval.run import run_eval

        run_eval(cfg, ctx, corpus)


def _read_if_file(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None
