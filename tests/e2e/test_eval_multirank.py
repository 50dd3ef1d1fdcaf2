"""Two CPU ranks under the DeepSpeed launcher evaluate exactly what one rank does: windows dealt out over the
ranks, or each window split over a sequence-parallel group (Ulysses, ring, zigzag ring)."""

from __future__ import annotations

import json
import shutil

import pytest
from cli import SMALL_RUN, run_pretrain

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher"),
]

# Window and trial counts that do not divide by two, so the ranks get unequal shares. Both lengths divide by
# 4, so a zigzag ring over 2 ranks can split them; 96 is past the training length (32), so the windowed
# control runs too.
EVAL = [
    "eval.lengths=[32,96]",
    "eval.max_tokens=2016",
    "eval.passkey_lengths=[130]",
    "eval.passkey_depths=[0.0,0.5,1.0]",
    "eval.passkey_trials=3",
]


def results(run_dir):
    return json.loads((run_dir / "eval" / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained and evaluated by one 2-rank run with each sequence split (stage=all, Ulysses): the
    eval stage reuses the train stage's process groups. Returns the work directory, the run and its output."""
    workdir = tmp_path_factory.mktemp("eval-multirank")
    run_dir = workdir / "trained"
    args = ["stage=all", f"run_dir={run_dir}", *SMALL_RUN, "train.max_steps=30", "parallel=ulysses2", *EVAL]
    proc = run_pretrain(args, cwd=workdir, ranks=2)
    return workdir, run_dir, proc.stdout + proc.stderr


def evaluate_on_one_rank(trained, name, *extra):
    """The reference: one rank evaluating the trained weights with whole windows."""
    workdir, run_dir, _ = trained
    out = workdir / name
    args = ["stage=eval", f"run_dir={out}", f"eval.checkpoint={run_dir / 'checkpoints'}", *SMALL_RUN, *EVAL, *extra]
    run_pretrain(args, cwd=workdir)
    return results(out)


@pytest.fixture(scope="module")
def one_rank(trained):
    return evaluate_on_one_rank(trained, "one")


def evaluate_on_two_ranks(trained, name, *parallel):
    workdir, run_dir, _ = trained
    out = workdir / name
    args = ["stage=eval", f"run_dir={out}", f"eval.checkpoint={run_dir / 'checkpoints'}", *SMALL_RUN, *EVAL]
    proc = run_pretrain([*args, *parallel], cwd=workdir, ranks=2)
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    return results(out), proc.stdout


def assert_same_numbers(want: dict, got: dict, rel: float) -> None:
    """Per length: the same windows and tokens, loss and windowed loss, loss by position; the same passkey cells."""
    assert len(got["results"]) == len(want["results"]) == 2
    for w, g in zip(want["results"], got["results"]):
        assert (g["length"], g["tokens"], g["windows"]) == (w["length"], w["tokens"], w["windows"])
        for key in ("loss", "ppl", "windowed_loss"):
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-7), (key, g, w)
    for w, g in zip(want["models"][0]["loss_by_position"], got["models"][0]["loss_by_position"], strict=True):
        assert [b["tokens"] for b in g["bins"]] == [b["tokens"] for b in w["bins"]]
        assert [b["loss"] for b in g["bins"]] == pytest.approx([b["loss"] for b in w["bins"]], rel=rel)
        assert [b["windowed_loss"] for b in g["bins"]] == pytest.approx(
            [b["windowed_loss"] for b in w["bins"]], rel=rel
        )
    for w, g in zip(want["passkey"]["cells"], got["passkey"]["cells"], strict=True):
        keys = ("length", "depth", "greedy", "likelihood", "trials")
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}
        assert g["key_depth"] == pytest.approx(w["key_depth"])


def test_two_ranks_evaluate_exactly_what_one_rank_does(trained, one_rank):
    got, stdout = evaluate_on_two_ranks(trained, "two")
    assert (one_rank["settings"]["world_size"], got["settings"]["world_size"]) == (1, 2)
    assert got["settings"]["sequence_parallel"]["sp_size"] == 1
    assert [r["windows"] for r in got["results"]] == [63, 21]
    assert_same_numbers(one_rank, got, rel=1e-6)
    # Only rank 0 wrote: one table in the output.
    assert stdout.count("full-windowed") == 1
    # Windows inside documents (eval.windows=documents) are dealt out the same way: the one-rank numbers again.
    want = evaluate_on_one_rank(trained, "one-documents", "eval.windows=documents")
    got, _ = evaluate_on_two_ranks(trained, "two-documents", "eval.windows=documents")
    assert (want["windows"], got["windows"]) == ("documents", "documents")
    assert [r["windows"] for r in got["results"]] == [63, 21]
    assert_same_numbers(want, got, rel=1e-6)
    for w, g in zip(want["results"], got["results"]):
        keys = ("qualified_documents", "qualified_tokens", "scored_documents")
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}
    assert [r["loss"] for r in got["results"]] != [r["loss"] for r in one_rank["results"]]  # other windows


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel, split",
    [
        (["parallel=ring2", "parallel.zigzag=false"], {"sp_mode": "ring", "zigzag": False}),
        (["parallel=ring2"], {"sp_mode": "ring", "zigzag": True}),
    ],
    ids=["ring", "ring-zigzag"],
)
def test_windows_split_over_a_ring_score_what_one_rank_does(trained, one_rank, parallel, split):
    """Each window's tokens split over 2 ranks (ring attention, global positions): the per-length losses, the loss
    by position and the windowed control of one rank holding whole windows."""
    name = "-".join(parallel).replace("=", "_")  # a run_dir=... value may not hold '='
    got, stdout = evaluate_on_two_ranks(trained, name, *parallel)
    assert got["settings"]["sequence_parallel"] == {"sp_size": 2, "data_parallel_groups": 1, **split}
    assert "each window split over 2 ranks (ring" in stdout
    assert_same_numbers(one_rank, got, rel=1e-5)


@pytest.mark.slow
def test_stage_all_with_ulysses_evaluates_what_one_rank_does(trained, one_rank):
    """The eval stage of the 2-rank stage=all run (Ulysses: heads split after the all-to-all, each rank with its
    heads' slopes) gives the one-rank numbers for the weights it trained."""
    _, run_dir, output = trained
    got = results(run_dir)
    assert got["settings"]["sequence_parallel"] == {
        "sp_size": 2, "sp_mode": "ulysses", "zigzag": False, "data_parallel_groups": 1,
    }  # fmt: skip
    assert "each window split over 2 ranks (ulysses)" in output
    assert all(r["peak_mib"] is None or r["peak_mib"] >= 0 for r in got["results"])
    assert_same_numbers(one_rank, got, rel=1e-5)


def test_an_eval_length_a_group_cannot_split_fails_with_its_name(trained, tmp_path):
    """Checked before the world size, so one process shows the message a 2-rank launch gives (and costs less)."""
    workdir, run_dir, _ = trained
    args = ["stage=eval", f"run_dir={tmp_path / 'bad'}", f"eval.checkpoint={run_dir / 'checkpoints'}", *SMALL_RUN]
    proc = run_pretrain([*args, "parallel=ring2", "eval.lengths=[32,66]"], cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: eval.lengths holds 66: with each window split over 2 ranks every window length must be a multiple of "
        "2 * parallel.sp_size = 4 (zigzag ring: two equal chunks per rank); for 66 use 64 or 68"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "eval").exists()  # refused before any work
