"""Two CPU ranks under the DeepSpeed launcher evaluate exactly what one rank does."""

from __future__ import annotations

import json
import shutil

import pytest
from train_helpers import SMALL_RUN, run_pretrain

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher"),
]

# Window and trial counts that do not divide by two, so the ranks get unequal shares.
EVAL = [
    "stage=eval",
    "eval.lengths=[32,96]",
    "eval.max_tokens=2016",
    "eval.passkey_lengths=[130]",
    "eval.passkey_depths=[0.0,0.5,1.0]",
    "eval.passkey_trials=3",
]


def test_two_ranks_evaluate_exactly_what_one_rank_does(tmp_path):
    trained = tmp_path / "trained"
    run_pretrain(["stage=train", f"run_dir={trained}", *SMALL_RUN, "train.max_steps=30"], cwd=tmp_path)
    checkpoint = f"eval.checkpoint={trained / 'checkpoints'}"
    one, two = tmp_path / "one", tmp_path / "two"
    run_pretrain([f"run_dir={one}", checkpoint, *SMALL_RUN, *EVAL], cwd=tmp_path)
    proc = run_pretrain([f"run_dir={two}", checkpoint, *SMALL_RUN, *EVAL], cwd=tmp_path, ranks=2)
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    want = json.loads((one / "eval" / "results.json").read_text())
    got = json.loads((two / "eval" / "results.json").read_text())
    assert (want["settings"]["world_size"], got["settings"]["world_size"]) == (1, 2)
    assert [r["windows"] for r in got["results"]] == [63, 21]
    assert len(got["results"]) == len(want["results"]) == 2
    for w, g in zip(want["results"], got["results"]):
        assert (g["length"], g["tokens"], g["windows"]) == (w["length"], w["tokens"], w["windows"])
        for key in ("loss", "ppl", "windowed_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), (key, g, w)
    for w, g in zip(want["models"][0]["loss_by_position"], got["models"][0]["loss_by_position"]):
        assert [b["tokens"] for b in g["bins"]] == [b["tokens"] for b in w["bins"]]
        assert [b["loss"] for b in g["bins"]] == pytest.approx([b["loss"] for b in w["bins"]], rel=1e-6)
    for w, g in zip(want["passkey"]["cells"], got["passkey"]["cells"], strict=True):
        assert {k: g[k] for k in ("length", "depth", "greedy", "likelihood", "trials")} == {
            k: w[k] for k in ("length", "depth", "greedy", "likelihood", "trials")
        }
        assert g["key_depth"] == pytest.approx(w["key_depth"])
    # Only rank 0 wrote: one table in the output.
    assert proc.stdout.count("full-windowed") == 1
