"""What a user watches: a console progress bar, ``train/metrics.jsonl`` and wandb. Rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from pretrain.config import WandbConfig
from pretrain.ops.loss import perplexity
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import RunFiles, write_atomic
from pretrain.tracking import start_wandb


class Monitor:
    """Per-step metrics to the console, ``<run_dir>/train/metrics.jsonl`` and wandb (when enabled).

    On resume the JSONL keeps only steps up to the resumed one (a step logged after the last checkpoint
    is logged again, from the same state), and wandb continues the run whose id is kept in
    the run directory (``pretrain.tracking``).
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
        files = RunFiles(run_dir)
        self.dir = files.train_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = files.metrics
        self.val_path = files.validation
        self._truncate_after(start_step)
        self.metrics_file = self.metrics_path.open("a")
        if wandb_cfg.mode != "disabled":
            self.wandb = start_wandb(wandb_cfg, run_dir, config)
        self.total_steps, self.start_step = total_steps, start_step

    def _truncate_after(self, step: int) -> None:
        """Keep the rows of steps up to ``step`` (a resume rewrites what follows). A line that does not parse, such as
        the torn last line of a run killed mid-write, is dropped with a note rather than failing the resume."""
        for path in (self.metrics_path, self.val_path):
            if not path.exists():
                continue
            kept, torn = [], 0
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    row_step = int(row["step"])
                except (ValueError, TypeError, KeyError):
                    torn += 1
                    continue
                if row_step <= step:
                    kept.append(line)
            if torn:
                print(f"dropped {torn} unreadable line(s) of {path} (a write cut short when a run was killed)")
            write_atomic(path, "".join(f"{line}\n" for line in kept))

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

    def log_eval(self, step: int, val_loss: float, longer: dict | None = None) -> None:
        """The validation loss, and ``longer`` (``ppl@2x``, ``context_gain@2x``, ...: windows longer than training)."""
        if not self.active:
            return
        longer = longer or {}
        record = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss), **longer}
        with self.val_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            values = {"val/loss": val_loss, "val/ppl": record["val_ppl"]}
            values.update({f"val/{key}": value for key, value in longer.items()})
            self.wandb.log(values, step=step)
        curve = ", ".join(
            f"{key.removeprefix('ppl@')} {value:.2f}" for key, value in longer.items() if key.startswith("ppl@")
        )
        self.write(
            f"step {step}: validation loss {val_loss:.4f} (ppl {record['val_ppl']:.2f})"
            + (f"; ppl by length: {curve}" if curve else "")
        )

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
