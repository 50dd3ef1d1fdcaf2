"""The benchmarks through their command line, on tiny sizes (no timing assertions)."""

import json

import pytest
import torch
from cli import run_bench


def test_attention_bench_writes_rows(tmp_path):
    out = tmp_path / "attention.json"
    proc = run_bench(
        "attention", "--lengths", "64", "512", "--backends", "fused", "sdpa", "--heads", "2", "--head-dim", "16",
        "--repeats", "1", "--warmup", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "attention"
    assert {"platform", "cpu_count", "torch", "device_name"} <= set(report["machine"])
    assert report["machine"]["torch"] == torch.__version__
    assert report["params"]["lengths"] == [64, 512] and report["params"]["heads"] == 2
    assert "T" in report["date"]
    rows = report["rows"]
    assert [(r["length"], r["backend"]) for r in rows] == [(64, "fused"), (64, "sdpa"), (512, "fused"), (512, "sdpa")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and len(r["times_ms"]) == 1
        assert r["peak_extra_mib"] >= 0
        assert "clear_refs" in r["memory_method"]
    # At L=512 the sdpa bias alone is 2 heads x 512 x 512 float32 = 2 MiB; both backends must show memory.
    assert all(r["peak_extra_mib"] > 0 for r in rows if r["length"] == 512)
    sdpa_512 = next(r for r in rows if r["length"] == 512 and r["backend"] == "sdpa")
    assert sdpa_512["time_vs_sdpa"] == 1.0 and sdpa_512["memory_vs_sdpa"] == 1.0
    assert [c["status"] for c in report["checks"]] == ["SKIP", "SKIP"]  # no L=4096 or 8192 here
    assert "L=512" in proc.stdout and "peak extra MiB" in proc.stdout


def test_unknown_backend_is_a_clear_error():
    proc = run_bench("attention", "--backends", "flash", "--lengths", "64")
    assert proc.returncode != 0
    assert "invalid choice: 'flash'" in proc.stderr and "sdpa_causal_nobias" in proc.stderr


def test_unknown_benchmark_is_a_clear_error():
    proc = run_bench("no_such_bench")
    assert proc.returncode != 0
    assert "invalid choice: 'no_such_bench'" in proc.stderr and "attention" in proc.stderr


@pytest.mark.multirank
def test_sequence_parallel_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "sp.json"
    proc = run_bench("sequence_parallel", "--seq-len", "64", "--steps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["none", "ulysses", "ring"]
    assert [r["ranks"] for r in report["rows"]] == [1, 2, 2]
    for row in report["rows"]:
        assert row["time_s"] > 0 and len(row["per_rank"]) == row["ranks"]
    assert "peak MiB/rank" in proc.stdout
