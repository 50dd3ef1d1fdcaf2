"""The chain of stages: ``stage=all`` is prepare -> train -> eval -> export (-> harness, with ``harness.tasks``);
``prepare`` / ``train`` / ``eval`` run that stage (after prepare, a cache hit, when it needs the corpus); ``export``
and ``harness`` need no corpus.

Every check of the config runs before any work: the schemas' own checks when the config is built
(``config.py``), then the checks that need the world size (``check_before_work``). A problem a user can cause
(``ConfigError``, ``PipelineError``) ends the program with one line and exit status 2. A prepare that hands its units
to a Slurm job (``data.executor=slurm``) stops on purpose, with one line saying how to go on: exit 0 for
``stage=prepare``, 75 (``EXIT_STOPPED_EARLY``, "try again later") for a stage after it.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config
from pretrain.data.prepare import install_tokenizer, run_prepare
from pretrain.data.slurm import SlurmSubmitted
from pretrain.errors import EXIT_STOPPED_EARLY, ConfigError, PipelineError
from pretrain.eval.during_training import training_extrapolation
from pretrain.eval.passkey import check_passkey_fits
from pretrain.eval.run import plan_eval, run_eval
from pretrain.eval.split import check_eval_split
from pretrain.eval.windows import eval_lengths
from pretrain.export.run import plan_export, run_export
from pretrain.generate.run import plan_generate, run_generate
from pretrain.harness.run import harness_requested, plan_harness, run_harness
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.distributed import DistContext, init_distributed, launcher_env, shutdown_distributed
from pretrain.perf.plan import format_plan, make_plan
from pretrain.run_files import RunFiles
from pretrain.run_lock import RunLock
from pretrain.run_record import Invocation
from pretrain.tracking import check_wandb_online
from pretrain.train.checkpoint import CheckpointManager, complete_tags
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
        run_stages(cfg, ctx, Invocation(dict_cfg) if ctx.is_main else None)
    except SlurmSubmitted as stop:  # data.executor=slurm: the corpus's units run as a Slurm job; an expected stop
        if cfg.stage == "prepare":
            print(f"[prepare] {stop}", flush=True)
            return
        print(f"[prepare] {stop}; stage={cfg.stage} stopped after prepare", flush=True)
        sys.exit(EXIT_STOPPED_EARLY)
    except (ConfigError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: the first asks training to stop with a checkpoint
        print("interrupted", file=sys.stderr)
        sys.exit(130)
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
    check_wandb_online(cfg.wandb)
    cache = Path(cfg.data.cache_dir).expanduser().resolve()
    run_root = files.root.expanduser().resolve()
    if run_root == cache or cache in run_root.parents:
        # The cache is the prepare stage's: a run inside it could be taken for a corpus (or moved aside as one).
        raise ConfigError(
            f"run_dir={cfg.run_dir!r} is inside data.cache_dir={cfg.data.cache_dir!r}, where prepared corpora live; "
            "put the run directory elsewhere"
        )
    if cfg.stage == "all":
        # The eval stage checks again with the trained model's own length and heads.
        heads = {"model": cfg.model.n_head}
        explicit = bool(cfg.eval.lengths)
        check_eval_split(eval_lengths(cfg), explicit, cfg.model.seq_len, heads, cfg.parallel, world_size)
        check_passkey_fits(
            replace(cfg.model, vocab_size=getattr(cfg.data, "vocab_size", cfg.model.vocab_size)), cfg.eval
        )
    if cfg.stage == "eval":
        plan_eval(cfg, world_size)
    if cfg.stage == "export":
        plan_export(cfg)  # the weights and tokenizer exist, and BLOOM and the tokenizer conversion represent them
    if cfg.stage == "generate":
        plan_generate(cfg)  # a prompt is given, the weights exist, a learned table is long enough
    if harness_requested(cfg):
        plan_harness(cfg)  # lm-eval is installed, it knows the tasks, the export exists or can be made
    if cfg.stage in ("all", "train"):
        if cfg.train.resume == "none":
            refuse_starting_over(files)
        check_training_split(cfg, world_size)
        CheckpointManager(files.checkpoints, cfg.train.keep_last, DistContext()).find(cfg.train.resume)
        sp_size = cfg.parallel.sp_size
        deepspeed_config(cfg.train, max(1, world_size // sp_size), sp_size)


def refuse_starting_over(files: RunFiles) -> None:
    """``train.resume=none`` in a run directory that has trained would write a new run over the earlier one's
    metrics, checkpoints and weights; a ConfigError says so and how to start over, before anything is touched."""
    trained = [
        path.relative_to(files.root).as_posix()
        for path in (files.checkpoints / "latest", files.checkpoints / "model.safetensors", files.metrics)
        if path.is_file() and path.stat().st_size > 0
    ]
    trained += sorted(p.relative_to(files.root).as_posix() for p in files.checkpoints.glob("step_*") if p.is_dir())[-1:]
    if trained:
        raise ConfigError(
            f"train.resume=none, but run_dir={str(files.root)!r} already holds a training run ({', '.join(trained)}) "
            "that starting over would overwrite; to start a new run use another run_dir (or move this one aside "
            "first); to continue this one, use train.resume=auto"
        )


def print_run_plan(cfg: Config) -> None:
    """``print_plan=true``: the plan for ``plan_world_size`` devices (or the launcher's world), no work."""
    rank, world, _ = launcher_env()
    if rank == 0:
        # The vocabulary is the tokenizer's target size: the plan needs no prepared corpus.
        print(format_plan(make_plan(cfg, cfg.plan_world_size or world, vocab_size=cfg.data.vocab_size)))


def run_stages(cfg: Config, ctx: DistContext, invocation: Invocation | None = None) -> None:
    """``all``: prepare -> train -> eval; ``prepare`` / ``train`` / ``eval``: that stage after prepare."""
    lock = RunLock(cfg.run_dir, ctx)
    lock.acquire()  # before anything is written into the run directory
    try:
        _run_stages(cfg, ctx, invocation)
    finally:
        lock.release()


def check_run_tokenizer(cfg: Config, corpus) -> None:
    """A run that has trained (final weights or a checkpoint) keeps its tokenizer: PipelineError, before anything is
    written, when these data.* settings give another one (its model would read other pieces for its ids)."""
    files = RunFiles(cfg.run_dir)
    trained = (files.checkpoints / WEIGHTS).is_file() or bool(complete_tags(files.checkpoints))
    if trained and files.tokenizer.is_file() and files.tokenizer.read_bytes() != corpus.tokenizer_path.read_bytes():
        raise PipelineError(
            f"{cfg.run_dir} was trained with another tokenizer than these data.* settings give; run stage={cfg.stage} "
            "with the data.* settings it was trained with"
        )


def _run_stages(cfg: Config, ctx: DistContext, invocation: Invocation | None) -> None:
    if cfg.stage == "export":  # the run's weights and tokenizer only: no corpus is prepared
        if ctx.is_main and invocation is not None:
            invocation.record(cfg.run_dir)  # its checks passed in check_before_work (plan_export)
        run_export(cfg, ctx)
        return
    if cfg.stage == "harness":  # the export (made first when missing or stale) and lm-eval's tasks: no corpus
        if ctx.is_main and invocation is not None:
            invocation.record(cfg.run_dir)
        run_harness(cfg, ctx)
        return
    # A later stage asks for the prepared corpus again: a cache hit when it is already there. Its tokenizer is
    # installed in the run directory only once the stage's checks pass: a refused command changes nothing.
    corpus = run_prepare(cfg, ctx, install=False)

    def checked() -> None:
        """The command's checks passed: its first writes into the run directory (rank 0)."""
        install_tokenizer(corpus, cfg.run_dir)
        if invocation is not None:
            invocation.record(cfg.run_dir)

    if cfg.stage in ("all", "train"):
        # on_checked: after checking a resume against this config and corpus.
        extrapolation = training_extrapolation(cfg, ctx, corpus)
        trained = run_train(cfg, ctx, corpus, on_checked=checked, extrapolation=extrapolation)
        if not trained["finished"]:
            # The later stages would use stale or no weights: the chain stops here.
            if ctx.is_main and cfg.stage == "all":
                print(f"training stopped before train.max_steps ({trained['stopped']}): the later stages did not run")
            if trained["requeue"]:
                sys.exit(EXIT_STOPPED_EARLY)
            return
    else:
        check_run_tokenizer(cfg, corpus)
        if ctx.is_main:
            checked()
        ctx.barrier()
    if cfg.stage in ("all", "eval"):
        run_eval(cfg, ctx, corpus)
    if cfg.stage == "all":
        exported = run_export(cfg, ctx)  # skipped, with one line saying why, for a model BLOOM cannot represent
        if cfg.harness.tasks:
            if exported is not None:
                run_harness(cfg, ctx, just_exported=True)
            elif ctx.is_main:
                print("[harness] skipped: there is no export to score")
    if cfg.stage == "generate":  # not part of stage=all
        run_generate(cfg, ctx, corpus)
