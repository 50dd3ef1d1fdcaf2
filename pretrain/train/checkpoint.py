"""Checkpoints: DeepSpeed's save/load plus everything else a run needs to continue exactly.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/      DeepSpeed's files (model, optimizer shards), client state (step, data loader),
                        rng_rank{R}.pt per rank, and complete.json written last (step, world size, the
                        model config: enough to evaluate the checkpoint on its own, see load_checkpoint_weights;
                        the train.* settings and data position a resume is checked against; the SHA-256 of
                        every file, verified before loading)
    step_00000100.corrupt/  a checkpoint that failed verification on resume, kept for inspection, never loaded
                        (``.corrupt-2``, ``-3``, ... when the same step failed again after a re-save)
    latest              the tag of the newest *complete* checkpoint (replaced atomically)
    step_00000100_universal/  the same checkpoint in DeepSpeed's universal format, made when a ZeRO run
                        resumes on another number of ranks
    model.safetensors   consolidated weights of the final model (also from ZeRO-3), with model_config.json

A checkpoint becomes ``latest`` only after every rank has written its files and rank 0 has written
``complete.json``, so a run killed while saving resumes from the previous checkpoint. Pruning removes
``complete.json`` first, so a kill while pruning never leaves a directory that looks complete. A save that
fails (a full disk, a file-size limit) removes its partial directory and stops the run with one line.
"""

from __future__ import annotations

import errno
import json
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
from pretrain.parallel.distributed import DistContext, all_ranks
from pretrain.run_files import write_atomic
from pretrain.train.integrity import checksums, parameters_finite, verify_checksums

LATEST = "latest"


TAG_PATTERN = re.compile(r"step_\d{8}")


COMPLETE = "complete.json"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def check_pickles(step_dir: Path) -> None:
    """Raise PipelineError, naming the file, when a ``.pt`` file of a checkpoint refers to anything outside
    ``allowed_globals()`` (or is not a checkpoint file at all). The files are read as pickle opcodes, never run."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    allowed.add("numpy.core.multiarray._reconstruct")  # the same function, as NumPy 1 named it in older files
    for path in sorted(Path(step_dir).rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as err:  # truncated, or not torch.save's format
            raise PipelineError(f"{path} is not a readable checkpoint file ({type(err).__name__}: {err})") from None
        unexpected = sorted(set(names) - allowed)
        if unexpected:
            raise PipelineError(
                f"{path} refers to {', '.join(unexpected)}, which no checkpoint of this pipeline holds; it is not "
                "loaded, since loading a pickle can run code (delete the checkpoint if you did not write it)"
            )


def rng_state() -> dict:
    """Every RNG's state as tensors and numbers, so that it loads with ``weights_only=True``."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        # This rank's own device only: a resume may see fewer GPUs (or other ones) than the run that saved.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def cuda_rng_state_to_restore(saved, current_device: int):
    """The CUDA generator state to restore on ``current_device`` from a checkpoint's ``"cuda"`` entry: one state
    (this release: the saving rank's device), or, from earlier releases, the list of every visible device's,
    of which the current device's entry (the first one when the list is shorter); None when nothing was saved."""
    if saved is None:
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    if len(saved) == 0:
        return None
    return saved[current_device] if current_device < len(saved) else saved[0]


def set_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    else:  # written by an earlier release: the tuples themselves
        random.setstate(python)
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
        )
    else:
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_state = cuda_rng_state_to_restore(state["cuda"], torch.cuda.current_device())
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


def allowed_globals() -> list:
    """What a checkpoint's pickles may refer to besides tensors and plain containers: DeepSpeed's ZeRO optimizer
    state (DeepSpeed 0.19), and NumPy's arrays in the RNG files of earlier releases. DeepSpeed unpickles its files
    with full pickle, which can run any code a file names, so ``check_pickles`` refuses a checkpoint naming
    anything else; ``weights_only=True`` loads allow exactly these (``torch.serialization.safe_globals``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    return [LossScaler, ZeroStageEnum, fragment_address, np.dtype, np.ndarray, reconstruct, type(np.dtype(np.uint32))]


def load_rng_file(path: Path) -> dict:
    """An ``rng_rank*.pt`` with ``weights_only=True`` (NumPy's arrays allowed: earlier releases pickled them)."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, weights_only=True)
    except Exception as err:
        raise PipelineError(f"{path} cannot be loaded ({type(err).__name__}: {err})") from None


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, ctx: DistContext, sp_size: int = 1):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.ctx = ctx
        self.sp_size = sp_size

    def save(self, engine, step: int, client_state: dict, model_cfg: ModelConfig | None = None, extra=None) -> Path:
        """Save on every rank (DeepSpeed requires it), then mark complete, point ``latest`` and prune.

        ``model_cfg`` (with the tokenizer's vocabulary size) goes into ``complete.json``, so the checkpoint can be
        evaluated before the run has written its final ``model_config.json``; ``extra`` entries too (what a resume
        is checked against). Weights that are not finite are never saved: PipelineError.
        """
        tag = tag_for_step(step)
        step_dir = self.directory / tag
        if not parameters_finite(engine.module, self.ctx):
            raise PipelineError(
                f"not saving checkpoint {step_dir}: the model's weights hold NaN or infinity; the last checkpoint "
                f"({self.directory / LATEST}) is kept"
            )
        if self.ctx.is_main and step_dir.exists():  # an earlier, abandoned save of this step (a resumed run)
            self._remove(tag)
        self.ctx.barrier()
        failure = None
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
            torch.save(rng_state(), step_dir / f"rng_rank{self.ctx.rank}.pt")
        except (OSError, RuntimeError) as err:
            failure = err
        self._raise_if_failed(failure, step_dir)
        sums = checksums(step_dir, self.ctx)
        if self.ctx.is_main:
            record = {"step": step, "world_size": self.ctx.world_size, "sp_size": self.sp_size, **(extra or {})}
            if model_cfg is not None:
                record["model_config"] = asdict(model_cfg)
            record["checksums"] = sums
            write_atomic(step_dir / COMPLETE, json.dumps(record))
            write_atomic(self.directory / LATEST, tag)
            self._prune(keep=tag)
        self.ctx.barrier()
        return step_dir

    def _raise_if_failed(self, failure: BaseException | None, step_dir: Path) -> None:
        """All ranks learn whether any rank's save failed; then the partial directory is removed and the run stops
        with one line (a full disk or a file-size limit said as such)."""
        if all_ranks(failure is None, self.ctx):
            return
        if self.ctx.is_main:
            shutil.rmtree(step_dir, ignore_errors=True)
        latest = self.directory / LATEST
        kept = f"{latest.read_text().strip()} is still the latest checkpoint" if latest.is_file() else "no checkpoint"
        reason = describe_write_error(failure, step_dir) if failure is not None else "another rank failed to write"
        raise PipelineError(
            f"could not save checkpoint {step_dir}: {reason}; the partial checkpoint was removed and {kept}: free "
            "space, then run the same command to resume"
        )

    def _remove(self, tag: str) -> None:
        """Delete a checkpoint: ``complete.json`` first, so that no kill leaves it looking complete."""
        (self.directory / tag / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(self.directory / tag, ignore_errors=True)
        shutil.rmtree(self.directory / f"{tag}_universal", ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Remove complete checkpoints older than the newest ``keep_last`` (and their universal copies)."""
        complete = complete_tags(self.directory)
        for tag in complete[: max(0, len(complete) - self.keep_last)]:
            if tag != keep:
                self._remove(tag)

    def find(self, resume: str) -> tuple[Path, str] | None:
        """``(load_dir, tag)`` to resume from for ``train.resume`` (auto | none | PATH), or None to start fresh.
        Reads only the directory's records; ``find_verified`` also verifies the files."""
        if resume == "none":
            return None
        if resume == "auto":
            candidates = self._auto_candidates()
            return (self.directory, candidates[0]) if candidates else None
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

    def _auto_candidates(self) -> list[str]:
        """Complete checkpoints for ``train.resume=auto``, newest first: the one ``latest`` names and older ones."""
        if not (self.directory / LATEST).exists():
            return []
        # A latest naming a checkpoint that is not there is refused, not passed over: the directory was changed by
        # hand or by another program, and starting over from an older checkpoint (or none) would hide it.
        named = (self.directory / LATEST).read_text().strip()
        if self._set_aside_interrupted(named):  # by an earlier release, which renamed before moving latest
            return [tag for tag in reversed(complete_tags(self.directory)) if tag < named]
        latest = self._read_latest(self.directory, "train.resume=auto")
        return [tag for tag in reversed(complete_tags(self.directory)) if tag <= latest]

    def _set_aside_interrupted(self, tag: str) -> bool:
        """Whether ``latest`` names a checkpoint this program was setting aside as corrupt when it stopped."""
        if not TAG_PATTERN.fullmatch(tag) or (self.directory / tag / COMPLETE).exists():
            return False
        step_dir = self.directory / tag
        return (step_dir / f"{COMPLETE}.unverified").exists() or (
            not step_dir.exists() and any(self.directory.glob(f"{tag}.corrupt*"))
        )

    def find_verified(self, resume: str, say=print) -> tuple[Path, str] | None:
        """``find``, with every file of the checkpoint verified against the checksums recorded when it was saved.

        ``train.resume=auto`` falls back to the newest checkpoint that verifies: one that does not is renamed
        ``<tag>.corrupt`` (kept, never loaded) and ``say`` tells which and why. An explicit path that fails raises a
        PipelineError naming the file. All ranks call; they share the hashing.
        """
        if resume != "auto":
            found = self.find(resume)
            if found is not None:
                problem = verify_checksums(found[0] / found[1], self.record(*found).get("checksums"), self.ctx)
                if problem:
                    raise PipelineError(f"train.resume={resume!r}: {problem}")
            return found
        candidates = self._auto_candidates()
        for index, tag in enumerate(candidates):
            problem = self._problem(tag)
            if problem is None:
                if self.ctx.is_main and (self.directory / LATEST).read_text().strip() != tag:
                    write_atomic(self.directory / LATEST, tag)
                self.ctx.barrier()
                return self.directory, tag
            if self.ctx.is_main:
                self._set_aside(tag, problem, candidates[index + 1 :], say)
            self.ctx.barrier()
        if candidates and self.ctx.is_main:
            say(f"no checkpoint under {self.directory} verifies: training starts from the beginning")
        return None

    def _problem(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be resumed from (a damaged ``complete.json`` or a file that does not match
        its checksum), or None. Every rank calls (they share the hashing)."""
        try:
            record = self.record(self.directory, tag)
        except PipelineError as err:
            return str(err)
        if not isinstance(record, dict) or not isinstance(record.get("checksums", {}), (dict, type(None))):
            return f"{self.directory / tag / COMPLETE} is damaged (not the record this program writes)"
        return verify_checksums(self.directory / tag, record.get("checksums"), self.ctx)

    def _set_aside(self, tag: str, problem: str, older: list[str], say) -> None:
        """Rank 0: take a checkpoint that failed verification out of use, safely at every point of a crash.

        ``latest`` moves first (to the next older candidate, or is removed when there is none), so it never names a
        checkpoint that is being set aside; then the directory is renamed, in one step, to a name not yet taken
        (``<tag>.corrupt``, ``<tag>.corrupt-2``, ...: the same step may be corrupted again after a re-save); last its
        ``complete.json`` is renamed inside it, so the kept copy is never taken for a complete checkpoint."""
        if older:
            write_atomic(self.directory / LATEST, older[0])
        else:
            (self.directory / LATEST).unlink(missing_ok=True)
        kept = corrupt_name(self.directory, tag)
        say(f"skipping checkpoint {tag}: {problem}; it is kept as {kept.name} and not loaded")
        (self.directory / tag).rename(kept)
        if (kept / COMPLETE).exists():
            (kept / COMPLETE).rename(kept / f"{COMPLETE}.unverified")

    @staticmethod
    def _read_latest(directory: Path, key: str) -> str:
        tag = (directory / LATEST).read_text().strip()
        if not (directory / tag / COMPLETE).exists():
            raise PipelineError(
                f"{key}: {directory / LATEST} names checkpoint {tag!r}, which is missing or incomplete "
                f"under {directory}; point train.resume at a complete checkpoint (train.resume={directory}/step_N), or "
                "start a new run in another run_dir"
            )
        return tag

    @staticmethod
    def record(load_dir: Path, tag: str) -> dict:
        """A checkpoint's ``complete.json``."""
        try:
            return json.loads((load_dir / tag / COMPLETE).read_text())
        except (OSError, ValueError) as err:
            raise PipelineError(f"{load_dir / tag / COMPLETE} cannot be read ({err})") from None

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
        check_pickles(load_dir / tag)  # every rank: they must agree before rank 0 runs the converter on it
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
        if not tag.endswith("_universal"):  # a universal copy is made by this program from a checked checkpoint
            check_pickles(load_dir / tag)
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise PipelineError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        rng_file = load_dir / tag / f"rng_rank{self.ctx.rank}.pt"
        if rng_file.exists():
            set_rng_state(load_rng_file(rng_file))
        return client_state


def describe_write_error(err: BaseException, path: Path) -> str:
    """What a failed write means, in words: a full disk and a file-size limit named as such."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return f"the disk is full ({path})"
    if code == errno.EFBIG:
        return f"a file reached the size limit (ulimit -f) ({path})"
    text = str(err)
    # torch.save reports a short write as a RuntimeError without an errno.
    if "file write failed" in text or "unexpected pos" in text:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        if free < 64 * 2**20:
            return f"the disk is full ({free // 2**20} MiB free at {path.parent})"
        return f"a file could not be written in full: the disk is full or a file-size limit was reached ({path})"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def corrupt_name(directory: Path, tag: str) -> Path:
    """A name not yet taken for setting checkpoint ``tag`` aside: ``<tag>.corrupt``, else ``<tag>.corrupt-N``."""
    path = Path(directory) / f"{tag}.corrupt"
    n = 2
    while path.exists() or path.is_symlink():
        path = Path(directory) / f"{tag}.corrupt-{n}"
        n += 1
    return path


def complete_tags(directory: Path) -> list[str]:
    """The tags of the complete checkpoints in a checkpoints directory, oldest first."""
    directory = Path(directory)
    tags = sorted(p.name for p in directory.glob("step_*") if TAG_PATTERN.fullmatch(p.name))
    return [t for t in tags if (directory / t / COMPLETE).exists()]
