"""The record of how a run directory was made: each accepted command's config, kept.

Hydra would write ``<run_dir>/.hydra/`` before the program starts, so a command that is then refused would
already have replaced the record of the training that made the run. Here it is written once the command's
checks have passed, just before its first write into the run directory: ``.hydra/config.yaml`` and
``.hydra/overrides.yaml`` hold the latest accepted command's composed config and command-line overrides (where
Hydra keeps them), and ``.hydra/history.jsonl`` gains a line per accepted command (time, stage, overrides,
resolved config), so the training's config survives any later eval, export or resume.
"""

from __future__ import annotations

import json
import sys
import time

from omegaconf import DictConfig, OmegaConf

from pretrain.run_files import RunFiles, write_atomic


class Invocation:
    """One command: its composed config and overrides, written into the run directory on ``record``."""

    def __init__(self, dict_cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        self.config_yaml = OmegaConf.to_yaml(dict_cfg)
        self.resolved = OmegaConf.to_container(dict_cfg, resolve=True)
        if HydraConfig.initialized():
            self.overrides = list(HydraConfig.get().overrides.task)
        else:
            self.overrides = sys.argv[1:]
        self.recorded = False

    def record(self, run_dir: str) -> None:
        """Write the record (rank 0 calls; once per command, later calls do nothing)."""
        if self.recorded:
            return
        self.recorded = True
        files = RunFiles(run_dir)
        files.hydra_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(files.hydra_dir / "config.yaml", self.config_yaml)
        write_atomic(files.hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(self.overrides)))
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stage": self.resolved.get("stage"),
            "overrides": self.overrides,
            "config": self.resolved,
        }
        with open(files.hydra_dir / "history.jsonl", "a", encoding="utf-8") as history:
            history.write(json.dumps(line) + "\n")
