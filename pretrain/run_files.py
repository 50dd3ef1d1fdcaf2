"""Where each file of a run directory lives, and how files are written so that a crash never leaves half of one.

One home for the layout the README documents (``<run_dir>/train/metrics.jsonl``, ``checkpoints/``,
``eval/results.json``, ...): stages name their files through ``RunFiles``, never by joining strings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFiles:
    """The files of one run directory."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / "spm.model"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def metrics(self) -> Path:
        return self.train_dir / "metrics.jsonl"

    @property
    def validation(self) -> Path:
        return self.train_dir / "val.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def harness_results(self) -> Path:
        """``stage=harness``: lm-evaluation-harness's results with what was evaluated and how."""
        return self.eval_dir / "harness.json"

    @property
    def harness_samples(self) -> Path:
        """``harness.log_samples=true``: every scored request, ``<task>.jsonl`` a task."""
        return self.eval_dir / "harness_samples"

    @property
    def harness_compare(self) -> Path:
        """``harness.compare``: the runs' results side by side (Markdown)."""
        return self.eval_dir / "harness_compare.md"

    @property
    def generate_dir(self) -> Path:
        return self.root / "generate"

    @property
    def generate_samples(self) -> Path:
        """``stage=generate``'s completions: ``{"prompt", "text", "token_ids"}`` a line."""
        return self.generate_dir / "samples.jsonl"

    @property
    def hf(self) -> Path:
        """The Hugging Face export (``stage=export``), written whole under a temporary name and renamed."""
        return self.root / "hf"

    @property
    def hydra_dir(self) -> Path:
        """The accepted commands' configs (``pretrain.run_record``)."""
        return self.root / ".hydra"

    @property
    def lock(self) -> Path:
        """Held by the one program writing this run directory (``pretrain.run_lock``)."""
        return self.root / ".pretrain.lock"

    @property
    def wandb_id(self) -> Path:
        """The id of the run's wandb run: training and evaluation log to the same one. Kept where earlier
        releases wrote it, so their runs continue in the same wandb run."""
        return self.train_dir / "wandb_id"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader (or a crash) sees the old file
    or the new one, never a part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
