"""The chain of stages: ``stage=all`` is prepare -> train -> eval; ``prepare`` / ``train`` / ``eval`` run that
stage (after prepare, a cache hit, when it needs the corpus).

Every check of the config runs before any work: the schemas' own checks when the config is built
(``config.py``), then the checks that need the world size (``check_before_work``). A problem a user can cause
(``ConfigError``, ``PipelineError``) ends the program with one line and exit status 2.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config
from pretrain.data.prepare import run_prepare
from pretrain.errors import ConfigError, PipelineError
from pretrain.eval.run import plan_eval, run_eval
from pretrain.eval.split import check_eval_split
from pretrain.eval.windows import eval_lengths
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.distributed import DistContext, init_distributed, launcher_env, shutdown_distributed
from pretrain.perf.plan import format_plan, make_plan
from pretrain.run_files import RunFiles
from pretrain.run_lock import RunLock
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.loop import check_training_split, run_train
from pretrain.train.weights import WEIGHTS


def to_config(dict_cfg: DictConfig) -> Config:
    """Build the typed config; this runs every ``__post_init__`` check before any work starts."""
    return OmegaConf.to_object(dict_cfg)


def run_from_dictconfig(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
        if not cfg.print_plan:
            check_before_work(cfg, launcher_env()[1])
    except (ConfigError, PipelineError) as err:
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


def check_before_work(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for what the schemas cannot check alone: splits over ``world_size`` ranks, the
    DeepSpeed config with ``train.deepspeed`` merged in, and the eval lengths (for ``stage=eval`` also the models'
    paths, PipelineError; for training the checkpoint ``train.resume`` names), so that no corpus is prepared and no
    step trained for a run that would fail later."""
    files = RunFiles(cfg.run_dir)
    if files.root.exists() and not files.root.is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir!r} is a file; give a directory (it is created when missing)")
    if cfg.stage == "all":
        # The eval stage checks again with the trained model's own length and heads.
        heads = {"model": cfg.model.n_head}
        explicit = bool(cfg.eval.lengths)
        check_eval_split(eval_lengths(cfg), explicit, cfg.model.seq_len, heads, cfg.parallel, world_size)
    if cfg.stage == "eval":
        plan_eval(cfg, world_size)
    if cfg.stage in ("all", "train"):
        check_training_split(cfg, world_size)
        CheckpointManager(files.checkpoints, cfg.train.keep_last, DistContext()).find(cfg.train.resume)
        sp_size = cfg.parallel.sp_size
        deepspeed_config(cfg.train, max(1, world_size // sp_size), sp_size)


def print_run_plan(cfg: Config) -> None:
    """``print_plan=true``: the plan for ``plan_world_size`` devices (or the launcher's world), no work."""
    rank, world, _ = launcher_env()
    if rank == 0:
        # The vocabulary is the tokenizer's target size: the plan needs no prepared corpus.
        print(format_plan(make_plan(cfg, cfg.plan_world_size or world, vocab_size=cfg.data.vocab_size)))


def run_stages(cfg: Config, ctx: DistContext) -> None:
    """``all``: prepare -> train -> eval; ``prepare`` / ``train`` / ``eval``: that stage after prepare."""
    lock = RunLock(cfg.run_dir, ctx)
    lock.acquire()  # before anything is written into the run directory
    try:
        _run_stages(cfg, ctx)
    finally:
        lock.release()


def _run_stages(cfg: Config, ctx: DistContext) -> None:
    files = RunFiles(cfg.run_dir)
    trained_tokenizer = None
    if cfg.stage == "eval" and cfg.eval.checkpoint is None:
        # Prepare (a cache hit when the corpus is there) gives the validation split and installs its tokenizer
        # in the run directory: a model trained on another corpus must not be scored on this one.
        if (files.checkpoints / WEIGHTS).is_file() and files.tokenizer.is_file():
            trained_tokenizer = files.tokenizer.read_bytes()
        ctx.barrier()  # every rank has read it before rank 0 may replace it
    # A later stage asks for the prepared corpus again: a cache hit when it is already there.
    corpus = run_prepare(cfg, ctx)
    if cfg.stage in ("all", "train"):
        run_train(cfg, ctx, corpus)
    if trained_tokenizer is not None and trained_tokenizer != files.tokenizer.read_bytes():
        ctx.barrier()
        if ctx.is_main:
            files.tokenizer.write_bytes(trained_tokenizer)
        raise PipelineError(
            f"{cfg.run_dir} was trained with another tokenizer than these data.* settings give; run stage=eval "
            "with the data.* settings it was trained with"
        )
    if cfg.stage in ("all", "eval"):
        run_eval(cfg, ctx, corpus)
