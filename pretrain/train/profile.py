"""``train.profile=[START, END]``: steps START..END recorded with the PyTorch profiler.

Each rank writes ``<run_dir>/train/profile/rank{R}.json``, a Chrome trace (open it in https://ui.perfetto.dev or
``chrome://tracing``; TensorBoard's profile plugin reads it too). Python stacks are recorded, so the attention
kernel's functions (``pretrain/ops/attention/*``) appear by name beside the ATen operators they call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.parallel.distributed import DistContext


class StepProfiler:
    def __init__(self, window: list[int] | None, directory: Path, ctx: DistContext):
        self.window = window
        self.directory = Path(directory)
        self.trace = self.directory / f"rank{ctx.rank}.json"
        self.active: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if self.window is not None and self.active is None and step == self.window[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=True)
            self.active.__enter__()

    def after_step(self, step: int) -> bool:
        """True when the trace was written after this step."""
        if self.active is not None and step >= self.window[1]:
            self.close()
            return True
        return False

    def close(self) -> None:
        """Stop recording and write the trace (also when training ends inside the window)."""
        if self.active is None:
            return
        profile, self.active = self.active, None
        profile.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.trace))
