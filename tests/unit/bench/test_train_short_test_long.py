"""The headline report: rows from results.json and each run's metrics, the claim checked per longer baseline."""

import json

from pretrain.bench.train_short_test_long import build, claims, run_dir_of


def make_run(root, name, seq_len, step_time, peak):
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    lines = [
        {"step": s, "loss": 5.0 - s / 10, "tokens": 1024 * s, "step_time_s": step_time, "peak_memory_mib": peak + s}
        for s in (1, 2, 3)
    ]
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def model(run, encoding, seq_len, ppl):
    return {
        "name": run.name,
        "source": str(run / "checkpoints"),
        "pos_encoding": encoding,
        "train_seq_len": seq_len,
        "results": [{"length": n, "ppl": p} for n, p in ppl.items()],
        "skipped": [],
    }


def test_rows_claims_and_outputs(tmp_path):
    alibi = make_run(tmp_path, "alibi", 64, 0.5, 100)
    sin = make_run(tmp_path, "sinusoidal", 64, 0.5, 100)
    sin2 = make_run(tmp_path, "sinusoidal-128", 128, 0.6, 120)
    rope2 = make_run(tmp_path, "rope-128", 128, 0.4, 90)
    report = {
        "mode": "nonoverlapping",
        "models": [
            model(alibi, "alibi", 64, {64: 50.0, 128: 48.0, 256: 47.0}),
            model(sin, "sinusoidal", 64, {64: 51.0, 128: 400.0, 256: 2000.0}),
            model(sin2, "sinusoidal", 128, {64: 52.0, 128: 47.5, 256: 900.0}),
            model(rope2, "rope", 128, {64: 49.0, 128: 45.0, 256: 60.0}),
        ],
    }
    results = tmp_path / "results.json"
    results.write_text(json.dumps(report))
    (tmp_path / "timings.tsv").write_text(f"{alibi}\t9.5\t3.0\n{sin2}\t12.0\t4.0\n{rope2}\t8.0\n")
    summary = build(results, tmp_path / "out", tmp_path / "timings.tsv", tolerance=0.02, script_seconds=60.0)

    rows = {r["name"]: r for r in summary["models"]}
    assert rows["alibi"]["train_step_seconds"] == 1.5 and rows["alibi"]["peak_memory_mib"] == 103
    assert rows["alibi"]["median_step_seconds"] == 0.5
    assert rows["alibi"]["train_command_seconds"] == 9.5 and rows["sinusoidal"]["train_command_seconds"] is None
    assert rows["alibi"]["train_command_cpu_seconds"] == 3.0 and rows["rope-128"]["train_command_cpu_seconds"] is None
    assert rows["sinusoidal-128"]["tokens"] == 3072 and summary["lengths"] == [64, 128, 256]
    by_baseline = {c["baseline"]: c for c in summary["claims"]}
    assert set(by_baseline) == {"sinusoidal-128", "rope-128"}  # only baselines trained longer than ALiBi
    s = by_baseline["sinusoidal-128"]
    assert s["length"] == 128 and s["ppl_ratio"] == 48.0 / 47.5 and s["matches_or_beats"]  # within 2%
    assert s["faster"] and s["less_memory"] and s["train_time_ratio"] == 0.75  # CPU seconds when both have them
    assert s["train_time_measure"] == "train_command_cpu_seconds"
    r = by_baseline["rope-128"]
    assert not r["matches_or_beats"] and not r["faster"] and not r["less_memory"]
    assert r["train_time_measure"] == "median_step_seconds" and r["train_time_ratio"] == 0.5 / 0.4
    table = (tmp_path / "out" / "headline.md").read_text()
    assert "| alibi | 64 | 3,072 |" in table and "**50.00**" in table and "does not hold" in table
    assert (tmp_path / "out" / "headline.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "headline.json").read_text())["script_seconds"] == 60.0


def test_claims_need_a_longer_baseline():
    rows = [{"pos_encoding": "alibi", "train_seq_len": 64, "ppl": {"64": 1.0}, "name": "a"}]
    assert claims(rows, 0.02) == []


def test_run_dir_of_weights_paths(tmp_path):
    assert run_dir_of(str(tmp_path / "run" / "checkpoints")) == tmp_path / "run"
    assert run_dir_of(str(tmp_path / "run" / "checkpoints" / "step_00000010")) == tmp_path / "run"
