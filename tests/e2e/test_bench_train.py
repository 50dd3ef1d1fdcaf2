"""The train_step and prepare benchmarks through their command line, on tiny sizes (no timing assertions)."""

import json

import pytest
import torch
from cli import run_bench

from pretrain.bench.prepare import main as prepare_main
from pretrain.bench.train_step import main as train_step_main


def test_train_step_bench_writes_both_rows(tmp_path):
    out = tmp_path / "train_step.json"
    proc = run_bench(
        "train_step", "--models", "tiny", "--lengths", "64", "--steps", "1", "--warmup", "1", "--min-time", "0",
        "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train_step" and "T" in report["date"]
    import transformers

    assert report["machine"]["transformers"] == transformers.__version__
    assert report["machine"]["torch"] == torch.__version__ and "deepspeed" in report["machine"]
    assert report["params"]["lengths"] == [64] and report["params"]["dtype"] == "float32"
    assert report["params"]["threads"] == 1
    assert report["shapes"]["tiny"] == {"name": "tiny", "n_layer": 2, "d_model": 128, "n_head": 4}
    rows = report["rows"]
    assert [(r["model"], r["seq"], r["impl"]) for r in rows] == [("tiny", 64, "ours"), ("tiny", 64, "bloom")]
    for r in rows:
        assert r["status"] == "ok", r
        assert len(r["times_s"]) == 1 and len(r["warmup_times_s"]) == 1
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0 and r["total_mib"] > 0
        assert "clear_refs" in r["memory_method"]
    ours, bloom = rows
    assert ours["n_params"] == bloom["n_params"]  # exactly the same shape
    assert ours["tokens_per_s_vs_bloom"] > 0 and ours["peak_vs_bloom"] > 0
    assert bloom["tokens_per_s_vs_bloom"] == 1.0
    assert [c["status"] for c in report["checks"]] == ["SKIP", "SKIP", "SKIP"]  # no seq 512, 2048 or 8192 here
    assert "tok/s ours/BLOOM" in proc.stdout


def test_train_step_rows_over_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "skipped.json"
    # Over the memory limit: skipped before any worker starts.
    assert train_step_main(["--models", "tiny", "--lengths", "64", "--max-memory-gib", "0.001", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ours", "bloom"]
    for r in rows:
        assert r["status"].startswith("skipped:") and "--max-memory-gib" in r["status"]
        assert "tokens_per_s" not in r and r["tokens_per_s_vs_bloom"] is None

    # The warm-up step fits the budget, but 1 + 1000 steps would not: stopped after it, its memory kept.
    proc = run_bench(
        "train_step", "--models", "tiny", "--lengths", "64", "--impls", "bloom", "--max-seconds", "5",
        "--steps", "1000", "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"].startswith("skipped: the last warm-up step took") and "--max-seconds 5" in row["status"]
    assert len(row["warmup_times_s"]) == 1 and row["total_mib"] > 0


def test_prepare_bench_writes_its_row(tmp_path):
    out = tmp_path / "prepare.json"
    proc = run_bench("prepare", "--max-files", "10", "--vocab-size", "400", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "prepare" and report["params"]["max_files"] == 10
    assert {"sentencepiece", "datasets", "torch"} <= set(report["machine"])
    (row,) = report["rows"]
    assert row["files"] == 10 and row["vocab_size"] == 400
    assert row["tokens"]["train"] > 0 and row["documents"]["train"] > 0
    assert row["wall_s"] > 0 and row["cache_hit_s"] > 0 and row["tokens_per_s"] > 0
    assert all(row["seconds"][phase] is not None for phase in ("load", "split", "tokenizer", "tokenize"))
    assert report["summary"]["tokens_per_s"] == row["tokens_per_s"]
    assert "tokenize tok/s" in proc.stdout


def test_prepare_bench_bad_options_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--vocab-size", "100"])
    assert exit_info.value.code == 2
    assert "data.vocab_size=100 is not allowed; it must be >= 260" in capsys.readouterr().err
    # Allowed in general, but below this corpus's alphabet: found by the stage, still one clear line.
    assert prepare_main(["--max-files", "10", "--vocab-size", "300"]) == 2
    assert "too small for this corpus's alphabet" in capsys.readouterr().err
