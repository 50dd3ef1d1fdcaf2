"""What a user watches while training: extrapolation at multiples of the training length (train.eval_lengths),
which equals a separate eval of the same checkpoint and picks one (eval.select=best_at:K), and a profiler window."""

from __future__ import annotations

import json

from cli import SMALL_RUN, run_pretrain


def test_in_training_extrapolation_equals_eval_and_selects_the_best_checkpoint_and_profiles(tmp_path):
    run_dir = tmp_path / "watched"
    train = ["stage=train", f"run_dir={run_dir}", *SMALL_RUN, "train.max_steps=20", "train.eval_every=10",
             "train.ckpt_every=10", "train.keep_last=3", "train.eval_lengths=[1,2]", "train.eval_tokens=2048",
             "train.profile=[3,4]"]  # fmt: skip
    proc = run_pretrain(train, cwd=tmp_path)
    rows = [json.loads(line) for line in (run_dir / "train" / "val.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [10, 20]
    for row in rows:
        assert {"ppl@1x", "ppl@2x", "context_gain@1x", "context_gain@2x"} <= set(row)
        assert row["context_gain@1x"] == 0.0  # within the training length the window changes nothing
    assert "ppl by length: 1x" in proc.stdout

    best = min(rows, key=lambda row: row["ppl@2x"])
    evaluate = ["stage=eval", f"run_dir={run_dir}", *SMALL_RUN, "eval.select=best_at:2", "eval.lengths=[32,64]",
                "eval.max_tokens=2048", "eval.passkey=false"]  # fmt: skip
    evaluated = run_pretrain(evaluate, cwd=tmp_path)
    assert f"step_{best['step']:08d}" in evaluated.stdout
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    by_length = {entry["length"]: entry for entry in results}
    for multiple, length in ((1, 32), (2, 64)):
        assert abs(by_length[length]["ppl"] - best[f"ppl@{multiple}x"]) < 1e-3 * best[f"ppl@{multiple}x"]
        gain = by_length[length]["windowed_loss"] - by_length[length]["loss"]
        assert abs(gain - best[f"context_gain@{multiple}x"]) < 1e-5

    trace = (run_dir / "train" / "profile" / "rank0.json").read_text()
    assert "blockwise_forward" in trace and "blockwise_backward" in trace  # the attention kernel, by name
    assert "profiled steps 3..4" in proc.stdout
