"""What a user watches: a console progress bar, ``train/metrics.jsonl`` and wandb. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from pretrain.config import WandbConfig
from pretrain.parallel.distributed import DistContext

WANDB_ID_FILE = "wandb_id"


class Monitor:
    """Per-step metrics to the console, ``<run_dir>/train/metrics.jsonl`` and wandb (when enabled).

    On resume the JSONL keeps only steps up to the resumed one (a step logged after the last checkpoint
    is logged again, from the same state), and wandb continues the run whose id is kept in
    ``<run_dir>/train/wandb_id``.
    """

    def __init__(
        self,
        run_dir: Path,
        wandb_cfg: WandbConfig,
        ctx: DistContext,
        total_steps: int,
        start_step: int,
        config: dict,
    ):
        self.active = ctx.is_main
        self.wandb = None
        self.bar = None
        if not self.active:
            return
        self.dir = Path(run_dir) / "train"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.metrics_file = self.metrics_path.open("a")
        if wandb_cfg.mode != "disabled":
            self.wandb = self._start_wandb(wandb_cfg, Path(run_dir), config)
        self.total_steps, self.start_step = total_steps, start_step

    def _truncate_after(self, step: int) -> None:
        for path in (self.metrics_path, self.dir / "val.jsonl"):
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(f"{line}\n" for line in kept))

    def _start_wandb(self, cfg: WandbConfig, run_dir: Path, config: dict):
        import wandb

        id_file = self.dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            id=run_id,
            resume="allow",
            mode=cfg.mode,
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            tags=list(cfg.tags),
            dir=str(run_dir),
            config=config,
        )

    def log_step(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        if self.bar is None:  # created at the first step, so the start-up lines print above it
            self.bar = tqdm(
                total=self.total_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True
            )
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
        if metrics.get("tokens_per_s"):
            postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
        if metrics.get("mfu") is not None:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def log_eval(self, step: int, val_loss: float) -> None:
        if not self.active:
            return
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        with (self.dir / "val.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({"val/loss": val_loss, "val/ppl": record["val_ppl"]}, step=step)
        self.write(f"step {step}: validation loss {val_loss:.4f} (ppl {record['val_ppl']:.2f})")

    def write(self, message: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self, summary: dict | None = None) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish()
