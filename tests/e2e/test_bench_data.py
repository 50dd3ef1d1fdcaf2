"""The data benchmarks (the loader on a sparse corpus, the prepare stage's scaling sections) through their command
line, on tiny sizes: the JSON has its fields and sane values (no timing is held against a target)."""

import json

from cli import run_bench


def test_loader_bench_on_a_sparse_corpus(tmp_path):
    out = tmp_path / "loader.json"
    corpus = tmp_path / "corpus"
    proc = run_bench(
        "loader", "--tokens", "2000000000", "--shards", "20", "--steps", "5", "--dir", str(corpus), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "loader"
    assert report["params"]["tokens"] == 2_000_000_000 and report["params"]["ranks"] == [1, 2]
    assert report["corpus"]["apparent_bytes"] == 4_000_000_000
    assert report["corpus"]["allocated_bytes"] < 2**20  # sparse: nothing written
    assert not any(corpus.iterdir())  # the synthetic files are removed
    rows = report["rows"]
    assert [(r["ranks"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    for r in rows:
        assert r["first_batch_s"] > 0 and r["rss_mib"] > r["baseline_rss_mib"] > 0
        assert r["bytes_used"] == 5 * 8 * 2049 * 2
        assert 1 <= r["shards_touched"] <= 20
        # Whole pages: at least the used bytes (less only where two windows share a page), at most a few pages more.
        assert 1.5 < r["read_amplification"] < 2.5, r
        assert r["page_floor"] == 8192 / 4098
    assert [c["status"] in ("PASS", "MISS") for c in report["checks"]] == [True] * 3
    assert "read ampl." in proc.stdout and "page floor" in proc.stdout


def test_prepare_bench_scaling_sections(tmp_path):
    out = tmp_path / "prepare.json"
    proc = run_bench(
        "prepare", "--sections", "scale", "encode", "workers", "--sizes-mb", "1", "--vocab-size", "400",
        "--unit-mb", "0.25", "--work-dir", str(tmp_path), "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rows"] == [] and report["params"]["sections"] == ["scale", "encode", "workers"]
    (scale,) = report["scale"]
    assert scale["size_mb"] == 1 and 1_000_000 <= scale["input_bytes"] < 1_200_000
    assert scale["tokens"] > 0 and scale["documents"] > 0 and scale["units"] == 1
    assert scale["peak_rss_mib"] > 0 and scale["tree_peak_rss_mib"] >= scale["max_process_rss_mib"] > 0
    assert scale["corpus_bytes"] > 0 and scale["temp_disk_ratio"] >= 0
    stage, raw = report["encode"]
    assert stage["same_tokens"] and stage["tokens"] == raw["tokens"] == scale["tokens"]
    assert stage["tokens_per_cpu_s"] > 0 and raw["tokens_per_cpu_s"] > 0 and raw["vs_raw"] == 1.0
    one, two = report["workers"]
    assert (one["workers"], two["workers"]) == (1, 2) and one["units"] == two["units"] >= 4
    assert two["same_shards"] and one["wall_vs_1"] == 1.0 and two["wall_vs_1"] > 0
    assert [c["status"] for c in report["checks"]][-1] == "INFO"
    assert all(c["status"] in ("PASS", "MISS") for c in report["checks"][:-1])
    assert list(tmp_path.glob("bench-prepare-*")) == []  # inputs and caches removed
    assert "temp/corpus" in proc.stdout and "vs raw" in proc.stdout and "same shards" in proc.stdout
