"""What every benchmark's JSON report carries: the machine, the date, and how it is written."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path

import torch


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def machine_info(device: str) -> dict:
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device_name": device_name,
        # Timings are only as good as the machine was idle: the 1-minute load average when the run started.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_report(out: Path | None, benchmark: str, started: str, machine: dict, params, rows: list, say=print, **extra):
    """Write ``{benchmark, date, machine, params, rows, **extra}`` as JSON to ``out`` (nothing when None).

    ``params``: the benchmark's parameters, a dataclass or a dict.
    """
    if out is None:
        return
    from dataclasses import asdict

    params = params if isinstance(params, dict) else asdict(params)
    report = {"benchmark": benchmark, "date": started, "machine": machine, "params": params, "rows": rows}
    report.update(extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}")
