"""train.seq_len_schedule through the real CLI: the switch at the step, constant tokens per step, seq_len in the
metrics rows, and a run stopped between the two lengths that resumes to the same losses."""

from __future__ import annotations

import pytest
from cli import SMALL_RUN, metrics, refusal, run_pretrain

SCHEDULE = ["train.seq_len_schedule=[[0,16],[3,32]]", "train.max_steps=6", "model.seq_len=32"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("schedule")
    run_pretrain(["stage=prepare", f"run_dir={path / 'prep'}", *SMALL_RUN], cwd=path)
    return path


def test_a_run_stopped_between_the_lengths_resumes_exactly(workdir):
    common = ["stage=train", *SMALL_RUN, *SCHEDULE]
    whole, parts = workdir / "whole", workdir / "parts"
    out = run_pretrain([*common, f"run_dir={whole}"], cwd=workdir).stdout
    assert "step 4: sequence length 32 (train.seq_len_schedule)" in out
    rows = metrics(whole)
    assert [m["seq_len"] for m in rows] == [16, 16, 16, 32, 32, 32]
    assert [m["tokens"] for m in rows] == [128 * step for step in range(1, 7)]  # 8 x 16, then 4 x 32 tokens
    run_pretrain([*common, "train.stop_at_step=3", f"run_dir={parts}"], cwd=workdir)
    run_pretrain([*common, f"run_dir={parts}"], cwd=workdir)
    assert [m["loss"] for m in metrics(parts)] == [m["loss"] for m in rows]


def test_falling_lengths_are_refused_before_any_work(tmp_path):
    proc = run_pretrain(
        ["stage=train", *SMALL_RUN, "train.seq_len_schedule=[[0,32],[3,16]]", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
    )
    assert "they must rise" in refusal(proc)
    assert not (tmp_path / "run").exists()
