"""``python -m pretrain.bench gpu --rehearse``: the GPU acceptance run's sections, calls, rows and exit logic on
CPU at small sizes (see pretrain/bench/gpu.py). About 2 minutes on a shared 2-core CPU, compiles included
(1 min 42 s measured with a warm inductor cache; a cold one adds a few seconds a kernel)."""

from __future__ import annotations

import json

from cli import run_bench

import pretrain.ops.attention.flex as flex
from pretrain.bench.gpu import SECTIONS


def test_the_rehearsal_runs_every_section_and_exits_0(tmp_path):
    out = tmp_path / "gpu-rehearsal.json"
    proc = run_bench("gpu", "--rehearse", "--peak-flops", "1e12", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS) | {"kernels", "target"}
    errors = [r for r in rows if r["status"] not in ("ok", "rehearsed")]
    assert not errors, errors
    # The flex section: every case in both dtypes, forward only (no compiled FlexAttention backward on CPU).
    flex_rows = [r for r in rows if r["section"] == "flex"]
    assert len(flex_rows) == 10 and not any(r["backward"] for r in flex_rows)
    # The MFU path ran on CPU through --peak-flops; the row says how many tokens a step holds.
    (step,) = [r for r in rows if r["section"] == "train_step"]
    assert step["peak_flops"] == 1e12 and 0 < step["mfu"] < 1 and step["tokens_per_step"] == 2 * 128
    # Each target is a row of its own, computed and not judged on CPU.
    targets = [r for r in rows if r["section"] == "target"]
    assert [r["status"] for r in targets] == ["rehearsed"] * 3
    assert all(r["value"] is not None for r in targets)
    # Kernels compiled per section and in all, within the bound the recompile limit is set from.
    kernels = report["kernels"]
    assert set(kernels) == set(SECTIONS) | {"total"}
    assert kernels["total"] == sum(kernels[s] for s in SECTIONS) <= flex.BENCH_KERNELS <= flex.RECOMPILE_LIMIT
    assert kernels["flex"] >= 1 and kernels["eval"] >= 1
    assert "exit 0" in proc.stdout
