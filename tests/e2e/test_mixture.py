"""A weighted mixture (data=mix) through the real command line: prepared once, trained, stopped and resumed to the
losses of an uninterrupted run, validation loss per source; bad weights refused in one line before any work."""

from __future__ import annotations

import json

import pytest
from cli import SMALL_RUN, losses, run_pretrain
from data_fixtures import stdlib_texts

# The small run's settings, the corpus given by data.sources instead of data.max_files.
MIX_RUN = [arg for arg in SMALL_RUN if not arg.startswith("data.max_files=")] + [
    "train.max_steps=8",
    "train.ckpt_every=4",
    "train.eval_every=4",
    "train.eval_lengths=[]",  # the longer windows are another test's; here only the loss per source
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Text files of a second source (long documents) beside the stdlib's first files."""
    path = tmp_path_factory.mktemp("mix")
    (path / "long").mkdir()
    for index, text in enumerate(stdlib_texts(12, start=400).values()):
        (path / "long" / f"doc{index}.txt").write_text(text)
    return path


def sources(weight_stdlib="0.3", weight_long="0.7") -> str:
    return (
        f"data.sources=[{{kind: stdlib, max_files: 30, weight: {weight_stdlib}}}, "
        f"{{kind: files, paths: [long/*.txt], weight: {weight_long}, label: long}}]"
    )


def train(workdir, name, *extra, mix=None, check=True):
    run_dir = workdir / name
    args = ["stage=train", f"run_dir={run_dir}", "data=mix", mix or sources(), *MIX_RUN, *extra]
    return run_dir, run_pretrain(args, cwd=workdir, check=check)


def test_a_mixture_resumes_to_the_uninterrupted_run_with_validation_per_source(workdir):
    straight, proc = train(workdir, "straight")
    out = proc.stdout
    assert "prepared mix:" in out and "source 'long' (files, weight 0.7 = 70.0% of training windows)" in out
    stopped, proc = train(workdir, "stopped", "train.stop_at_step=4")
    assert "reusing the prepared corpus" in proc.stdout and "stopped after step 4" in proc.stdout
    assert sorted(losses(stopped)) == [1, 2, 3, 4]
    train(workdir, "stopped")  # the same command again: resume=auto
    want, got = losses(straight), losses(stopped)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    rows = [json.loads(line) for line in (straight / "train" / "val.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8]
    for row in rows:
        assert row["val_loss"] == pytest.approx(0.3 * row["loss/stdlib"] + 0.7 * row["loss/long"])
    resumed = [json.loads(line) for line in (stopped / "train" / "val.jsonl").read_text().splitlines()]
    assert resumed[-1]["loss/long"] == pytest.approx(rows[-1]["loss/long"], abs=1e-6)


def test_bad_weights_are_one_line_before_any_work(workdir):
    cache = f"data.cache_dir={workdir / 'untouched'}"
    run_dir, proc = train(workdir, "bad", cache, mix=sources("-1", "0.7"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: data.sources[0].weight=-1 is not allowed; a weight is a number >= 0, relative to the other sources'"
    )
    assert not run_dir.exists() and not (workdir / "untouched").exists()
