"""The run's wandb run: started (or continued) the same way by training and by evaluation.

Every stage of one run directory logs to one wandb run, whose id is kept in the run directory
(``RunFiles.wandb_id``): a resumed run, and an evaluation after training, continue it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pretrain.config import WandbConfig
from pretrain.run_files import RunFiles, write_atomic


def start_wandb(cfg: WandbConfig, run_dir: str | Path, config: dict | None = None):
    """``wandb.init`` for the run in ``run_dir`` (a new id the first time, the kept one after). Rank 0 only."""
    import wandb

    files = RunFiles(run_dir)
    id_file = files.wandb_id
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(id_file, run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        id=run_id,
        resume="allow",
        mode=cfg.mode,
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or files.root.name,
        tags=list(cfg.tags),
        dir=str(files.root),
        config=config,
    )
