"""The run's wandb run: started (or continued) the same way by training and by evaluation.

Every stage of one run directory logs to one wandb run, whose id is kept in the run directory
(``RunFiles.wandb_id``): a resumed run, and an evaluation after training, continue it.
"""

from __future__ import annotations

import netrc
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

from pretrain.config import WandbConfig
from pretrain.errors import ConfigError
from pretrain.run_files import RunFiles, write_atomic

# How long the check before any work waits for the wandb server to answer.
REACH_TIMEOUT_S = 5.0


def check_wandb_online(cfg: WandbConfig) -> None:
    """``wandb=online`` needs an API key and the server: a ConfigError in one line, within seconds, when either is
    missing (wandb itself fails after minutes, with a traceback, once the run has started writing)."""
    if cfg.mode != "online":
        return
    base = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = base.hostname or "api.wandb.ai"
    port = base.port or (80 if base.scheme == "http" else 443)
    alternative = "use wandb=offline (and `wandb sync` the run directory's wandb/ later) or wandb=disabled"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        raise ConfigError(
            f"wandb=online needs an API key (WANDB_API_KEY, or `wandb login`, which writes ~/.netrc) and none is "
            f"set for {host}; {alternative}"
        )
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(
            f"wandb=online cannot reach {host}:{port} ({err.strerror or err}) within {REACH_TIMEOUT_S:g} s; "
            f"{alternative}"
        ) from None


def _netrc_has(host: str) -> bool:
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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
