"""Sequence parallelism on 2 ranks against the full sequence: one step in a torchrun worker, and training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli import SMALL_RUN, metrics, run_pretrain, run_torchrun

WORKER = Path(__file__).parent / "workers" / "sp_equivalence.py"


def run_worker(tmp_path, *args):
    out = tmp_path / "result.json"
    proc = run_torchrun(WORKER, [*args, "--out", str(out)], nproc=2, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.multirank
@pytest.mark.parametrize(
    "args",
    [
        ["--mode", "ulysses", "--n-head", "4"],
        ["--mode", "ulysses", "--n-head", "6"],  # not a power of two: slopes are not monotone in the head
        ["--mode", "ring", "--n-head", "4"],
        ["--mode", "ring", "--n-head", "6", "--zigzag"],
        ["--mode", "ring", "--n-head", "6", "--window", "7"],
        ["--mode", "ulysses", "--n-head", "6", "--pos-encoding", "rope"],
        ["--mode", "ulysses", "--n-head", "4", "--documents"],
        ["--mode", "ring", "--n-head", "6", "--zigzag", "--documents"],
        ["--mode", "ring", "--n-head", "4", "--documents", "--pos-encoding", "learned"],
        # grouped-query attention: 2 key/value heads for 6 query heads; and multi-query (its one head replicated)
        ["--mode", "ulysses", "--n-head", "6", "--n-kv-head", "2"],
        ["--mode", "ring", "--n-head", "6", "--n-kv-head", "2", "--zigzag"],
        ["--mode", "ulysses", "--n-head", "6", "--n-kv-head", "1"],
    ],
    ids=" ".join,
)
def test_two_ranks_equal_one_rank_on_the_full_sequence(tmp_path, args):
    """Loss and every parameter's gradient of a 44-token sequence split over 2 ranks, against 1 rank."""
    result = run_worker(tmp_path, *args, "--seq-len", "44")
    assert abs(result["loss"] - result["reference"]) / result["reference"] < 1e-5
    worst = max(result["grad_errors"], key=result["grad_errors"].get)
    assert result["grad_errors"][worst] < 1e-5, (worst, result["grad_errors"][worst])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    run_pretrain(["stage=prepare", f"run_dir={path / 'prep'}", *SMALL_RUN], cwd=path)
    return path


@pytest.mark.multirank
@pytest.mark.parametrize("parallel", [["parallel=ulysses"], ["parallel=ring"], ["parallel=ring", "train.zero_stage=2"]])
def test_training_with_sequences_split_over_two_ranks_matches_one_rank(workdir, parallel):
    """20 steps of model=tiny with each sequence split over 2 ranks: the same losses and gradient norms."""
    common = ["stage=train", *SMALL_RUN, "train.max_steps=20", "model.seq_len=40", "model.n_head=4"]
    name = "-".join(parallel).replace("=", "_")
    one, two = workdir / f"one-{name}", workdir / f"two-{name}"
    zero = [a for a in parallel if a.startswith("train.")]
    run_pretrain([*common, *zero, f"run_dir={one}"], cwd=workdir)
    run_pretrain([*common, *parallel, f"run_dir={two}"], cwd=workdir, ranks=2)
    want, got = metrics(one), metrics(two)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, 21))
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] < 1e-3, (a, b)
        assert a["tokens"] == b["tokens"]


DOCUMENT_MASKED = ["stage=train", *SMALL_RUN, "train.max_steps=6", "model.seq_len=40", "model.n_head=4",
                   "train.document_mask=true"]  # fmt: skip


@pytest.fixture(scope="module")
def document_masked_one_rank(workdir):
    """The 1-rank reference of the document-masked runs, trained once for both modes."""
    one = workdir / "docs-one"
    run_pretrain([*DOCUMENT_MASKED, f"run_dir={one}"], cwd=workdir)
    return metrics(one)


@pytest.mark.multirank
@pytest.mark.parametrize("parallel", ["parallel=ulysses2", "parallel=ring2"])
def test_document_masked_training_on_two_ranks_matches_one_rank(workdir, document_masked_one_rank, parallel):
    """train.document_mask=true: 6 steps with each sequence split over 2 ranks give the 1-rank losses (documents
    cross the shard and ring-block boundaries of these 40-token windows)."""
    two = workdir / f"docs-two-{parallel.replace('=', '_')}"
    run_pretrain([*DOCUMENT_MASKED, parallel, f"run_dir={two}"], cwd=workdir, ranks=2)
    want, got = document_masked_one_rank, metrics(two)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, 7))
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) / a["loss"] <= 1e-4, (a, b)


@pytest.mark.multirank
def test_bad_sequence_split_fails_before_training(workdir):
    proc = run_pretrain(
        ["stage=train", *SMALL_RUN, "model.seq_len=33", "parallel=ulysses", f"run_dir={workdir / 'bad'}"],
        cwd=workdir,
        ranks=2,
        check=False,
    )
    assert proc.returncode != 0
    assert "model.seq_len=33: with each sequence split over 2 ranks" in proc.stdout + proc.stderr


@pytest.mark.multirank
def test_sequence_parallel_with_zero3_resumes_exactly(workdir):
    """Ulysses on 2 ranks under ZeRO-3, stopped at step 5 and resumed, against one rank that never stopped."""
    common = ["stage=train", *SMALL_RUN, "train.max_steps=10", "train.ckpt_every=5", "model.seq_len=40"]
    one, two = workdir / "z3-one", workdir / "z3-two"
    run_pretrain([*common, "train.zero_stage=3", f"run_dir={one}"], cwd=workdir)
    split = [*common, "train.zero_stage=3", "parallel=ulysses", f"run_dir={two}"]
    run_pretrain([*split, "train.stop_at_step=5"], cwd=workdir, ranks=2)
    assert [m["step"] for m in metrics(two)] == [1, 2, 3, 4, 5]
    run_pretrain(split, cwd=workdir, ranks=2)
    want, got = metrics(one), metrics(two)
    assert [m["step"] for m in got] == list(range(1, 11))
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] < 1e-3, (a, b)
    assert (two / "checkpoints" / "model.safetensors").exists()
