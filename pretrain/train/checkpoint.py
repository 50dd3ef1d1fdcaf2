"""Checkpoints: DeepSpeed's save/load plus everything else a run needs to continue exactly.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/      DeepSpeed's files (model, optimizer shards), client state (step, data loader),
                        rng_rank{R}.pt per rank, and complete.json written last (step, world size, the
                        model config: enough to evaluate the checkpoint on its own, see load_checkpoint_weights)
    latest              the tag of the newest *complete* checkpoint (replaced atomically)
    step_00000100_universal/  the same checkpoint in DeepSpeed's universal format, made when a ZeRO run
                        resumes on another number of ranks
    model.safetensors   consolidated weights of the final model (also from ZeRO-3), with model_config.json

A checkpoint becomes ``latest`` only after every rank has written its files and rank 0 has written
``complete.json``, so a run killed while saving resumes from the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pretrain.config import ModelConfig
from pretrain.errors import PipelineError
from pretrain.parallel.distributed import DistContext

LATEST = "latest"
TAG_PATTERN = re.compile(r"step_\d{8}")
COMPLETE = "complete.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, ctx: DistContext, sp_size: int = 1):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.ctx = ctx
        self.sp_size = sp_size

    def save(self, engine, step: int, client_state: dict, model_cfg: ModelConfig | None = None) -> Path:
        """Save on every rank (DeepSpeed requires it), then mark complete, point ``latest`` and prune.

        ``model_cfg`` (with the tokenizer's vocabulary size) goes into ``complete.json``, so the checkpoint can be
        evaluated before the run has written its final ``model_config.json``.
        """
        tag = tag_for_step(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), self.directory / tag / f"rng_rank{self.ctx.rank}.pt")
        self.ctx.barrier()
        if self.ctx.is_main:
            record = {"step": step, "world_size": self.ctx.world_size, "sp_size": self.sp_size}
            if model_cfg is not None:
                record["model_config"] = asdict(model_cfg)
            _write_atomic(self.directory / tag / COMPLETE, json.dumps(record))
            _write_atomic(self.directory / LATEST, tag)
            self._prune(keep=tag)
        self.ctx.barrier()
        return self.directory / tag

    def _prune(self, keep: str) -> None:
        """Remove complete checkpoints older than the newest ``keep_last`` (and their universal copies)."""
        complete = complete_tags(self.directory)
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            if tag != keep:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
                shutil.rmtree(self.directory / f"{tag}_universal", ignore_errors=True)

    def find(self, resume: str) -> tuple[Path, str] | None:
        """``(load_dir, tag)`` to resume from for ``train.resume`` (auto | none | PATH), or None to start fresh."""
        if resume == "none":
            return None
        if resume == "auto":
            if not (self.directory / LATEST).exists():
                return None
            return self.directory, self._read_latest(self.directory, "train.resume=auto")
        path = Path(resume)
        if not path.exists():
            raise PipelineError(f"train.resume={resume!r}: no such checkpoint directory")
        if (path / LATEST).exists():
            return path, self._read_latest(path, f"train.resume={resume!r}")
        if (path / COMPLETE).exists():
            return path.parent, path.name
        raise PipelineError(
            f"train.resume={resume!r} is neither a checkpoints directory (with a '{LATEST}' file) nor a "
            f"complete checkpoint (with {COMPLETE})"
        )

    @staticmethod
    def _read_latest(directory: Path, key: str) -> str:
        tag = (directory / LATEST).read_text().strip()
        if not (directory / tag / COMPLETE).exists():
            raise PipelineError(
                f"{key}: {directory / LATEST} names checkpoint {tag!r}, which is missing or incomplete "
                f"under {directory}; point train.resume at a complete checkpoint or use train.resume=none"
            )
        return tag

    @staticmethod
    def saved_world_size(load_dir: Path, tag: str) -> int:
        return json.loads((load_dir / tag / COMPLETE).read_text())["world_size"]

    def to_universal(self, load_dir: Path, tag: str) -> tuple[Path, str]:
        """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads on any number of ranks.

        ZeRO-1/2/3 shard the optimizer state by data-parallel rank, so a checkpoint of N ranks cannot be
        loaded by M. Rank 0 runs DeepSpeed's ``ds_to_universal`` once (the result, ``<tag>_universal``,
        is kept and reused); the others wait. Per-rank RNG states do not carry over to another world size.
        """
        universal = f"{tag}_universal"
        if self.ctx.is_main and not (load_dir / universal / COMPLETE).exists():
            shutil.rmtree(load_dir / universal, ignore_errors=True)
            command = [
                sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                "--input_folder", str(load_dir / tag), "--output_folder", str(load_dir / universal),
                "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
            ]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PipelineError(
                    f"could not convert checkpoint {load_dir / tag} to a universal checkpoint for "
                    f"{self.ctx.world_size} ranks:\n{proc.stderr[-2000:]}"
                )
            shutil.copy(load_dir / tag / COMPLETE, load_dir / universal / COMPLETE)
        self.ctx.barrier()
        return load_dir, universal

    def load(self, engine, load_dir: Path, tag: str) -> dict:
        """Load DeepSpeed state and this rank's RNG; return the client state (step, data loader, ...)."""
        saved_sp = json.loads((load_dir / tag / COMPLETE).read_text()).get("sp_size", 1)
        if saved_sp != self.sp_size:
            raise PipelineError(
                f"checkpoint {load_dir / tag} was written with parallel.sp_size={saved_sp}; resume it with the "
                f"same sequence-parallel size (now {self.sp_size})"
            )
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise PipelineError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        rng_file = load_dir / tag / f"rng_rank{self.ctx.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state


def complete_tags(directory: Path) -> list[str]:
    """The tags of the complete checkpoints in a checkpoints directory, oldest first."""
    directory = Path(directory)
    tags = sorted(p.name for p in directory.glob("step_*") if TAG_PATTERN.fullmatch(p.name))
    return [t for t in tags if (directory / t / COMPLETE).exists()]


def save_weights(model: torch.nn.Module, model_cfg: ModelConfig, directory: Path, ctx: DistContext, zero_stage: int):
    """Write ``model.safetensors`` and ``model_config.json``, gathering ZeRO-3 partitions first. All ranks call."""
    from safetensors.torch import save_file

    params = list(model.parameters())
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if ctx.is_main else None
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if ctx.is_main else None
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS))
        _write_atomic(directory / MODEL_CONFIG, json.dumps(asdict(model_cfg), indent=2))
    ctx.barrier()
    return directory / WEIGHTS


def load_weights(directory: Path) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, state_dict)`` from a directory written by ``save_weights``, or from one DeepSpeed checkpoint
    (``step_NNNNNNNN``, see ``load_checkpoint_weights``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if is_checkpoint(directory):
        return load_checkpoint_weights(directory)
    if not (directory / WEIGHTS).exists():
        raise PipelineError(f"no {WEIGHTS} in {directory}: train the model first (stage=train)")
    cfg = ModelConfig(**json.loads((directory / MODEL_CONFIG).read_text()))
    return cfg, load_file(str(directory / WEIGHTS))


def model_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` of the weights ``load_weights(directory)`` reads, without loading them."""
    directory = Path(directory)
    if is_checkpoint(directory):
        return checkpoint_model_config(directory)
    return ModelConfig(**json.loads((directory / MODEL_CONFIG).read_text()))


# ---------------------------------------------------------------- one DeepSpeed checkpoint as a model


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one DeepSpeed checkpoint directory: a ``step_NNNNNNNN`` one (complete or not) or any with
    ``complete.json`` (a universal copy)."""
    path = Path(path)
    return path.is_dir() and (TAG_PATTERN.fullmatch(path.name) is not None or (path / COMPLETE).is_file())


def checkpoint_model_config(step_dir: Path, where: str | None = None) -> ModelConfig:
    """The model config recorded in a complete checkpoint's ``complete.json``.

    Raises a PipelineError that starts with ``where`` (the setting that named the directory) and says what to
    pass instead for an unfinished save, a universal copy, or a checkpoint saved before the config was recorded.
    """
    step_dir = Path(step_dir)
    where = where or f"checkpoint {step_dir}"
    if step_dir.name.endswith("_universal"):
        original = step_dir.with_name(step_dir.name.removesuffix("_universal"))
        raise PipelineError(
            f"{where} is a universal copy made to resume on another number of ranks; evaluate the checkpoint "
            f"it was made from: {original}"
        )
    if not (step_dir / COMPLETE).is_file():
        raise PipelineError(
            f"{where}: checkpoint {step_dir.name} is incomplete (no {COMPLETE}: its save did not finish, or is "
            f"still running); {_complete_neighbours(step_dir)}"
        )
    record = json.loads((step_dir / COMPLETE).read_text())
    if "model_config" not in record:
        raise PipelineError(
            f"{where}: checkpoint {step_dir.name} was saved before checkpoints recorded their model config (its "
            f"{COMPLETE} has no 'model_config' entry), so its shapes are unknown. Evaluate the run's final weights "
            f"instead (eval.checkpoint={step_dir.parent}), or record the config by hand: put the object in "
            f"{step_dir.parent / MODEL_CONFIG} (written when the run finished; otherwise the run's model.* settings "
            f"with the tokenizer's vocab_size) under 'model_config' in {step_dir / COMPLETE}"
        )
    return ModelConfig(**record["model_config"])


def _complete_neighbours(step_dir: Path) -> str:
    """What to pass instead of an incomplete checkpoint: the complete ones just older and just newer."""
    tags = complete_tags(step_dir.parent)
    older = [t for t in tags if t < step_dir.name][-1:]
    newer = [t for t in tags if t > step_dir.name][:1]
    if not tags:
        return f"{step_dir.parent} holds no complete checkpoint yet: wait for the next save, or train further"
    named = [f"{step_dir.parent / t} (older)" for t in older] + [f"{step_dir.parent / t} (newer)" for t in newer]
    return f"pass a complete one: {' or '.join(named)}"


def load_checkpoint_weights(step_dir: Path) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, float32 state_dict of GPT)`` from one complete DeepSpeed checkpoint ``<checkpoints>/<tag>``.

    ZeRO-1/2/3 keep the float32 master weights partitioned in the ranks' ``*_optim_states.pt``: DeepSpeed's own
    reader joins them (for ZeRO-3 the model states hold only placeholders). ZeRO-0 writes no optimizer
    partitions (DeepSpeed's reader fails on it) but the whole module in ``mp_rank_00_model_states.pt``: in the
    training dtype, so a bf16/fp16 ZeRO-0 run gives its 16-bit weights, as its final model.safetensors does.
    The names are ``GPT``'s: DeepSpeed saves ``engine.module``'s state dict (no ``module.`` prefix), and the
    tied LM head is the word embedding itself, so no duplicate entry appears.
    """
    step_dir = Path(step_dir)
    cfg = checkpoint_model_config(step_dir)
    if any(step_dir.glob("*_optim_states.pt")):
        state = _zero_master_weights(step_dir)
    else:
        state = _module_weights(step_dir)
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _zero_master_weights(step_dir: Path) -> dict:
    """The float32 weights joined from a ZeRO-1/2/3 checkpoint's partitions by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints its progress to stdout and stderr: kept off the eval stage's console (and out of its errors'
    # way: a missing partition still raises).
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        except (FileNotFoundError, ValueError) as err:
            raise PipelineError(f"could not read the ZeRO partitions of checkpoint {step_dir}: {err}") from None


def _module_weights(step_dir: Path) -> dict:
    """The whole module's state dict that a ZeRO-0 checkpoint keeps in ``mp_rank_00_model_states.pt``."""
    path = step_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise PipelineError(f"checkpoint {step_dir} holds neither ZeRO partitions nor {path.name}")
    # mmap: the file also holds the optimizer's moments (twice the weights), which are never read.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["module"]
