"""What the pipeline checks before any work: nothing is prepared or trained for a command that would fail."""

from __future__ import annotations

import pytest

from pretrain.config import Config, DataConfig, EvalConfig, TrainConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.pipeline import check_before_work


def config(tmp_path, **kwargs) -> Config:
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(cache_dir=str(tmp_path / "data")), **kwargs)


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    cfg = config(tmp_path)
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run_dir=.* is a file; give a directory"):
        check_before_work(cfg, 1)


@pytest.mark.parametrize("run_dir", ["data", "data/runs/x"])
def test_a_run_dir_inside_the_corpus_cache_is_refused(tmp_path, run_dir):
    cfg = Config(run_dir=str(tmp_path / run_dir), data=DataConfig(cache_dir=str(tmp_path / "data")))
    with pytest.raises(ConfigError, match=r"run_dir=.* is inside data.cache_dir=.*put the run directory elsewhere"):
        check_before_work(cfg, 1)
    cache_in_run = Config(run_dir=str(tmp_path / "run"), data=DataConfig(cache_dir=str(tmp_path / "run" / "data")))
    check_before_work(cache_in_run, 1)  # a cache inside a run directory harms nothing


@pytest.mark.parametrize("stage", ["all", "train"])
def test_a_resume_path_that_is_not_a_checkpoint_fails_before_prepare(tmp_path, stage):
    cfg = config(tmp_path, stage=stage, train=TrainConfig(resume=str(tmp_path / "nowhere")))
    with pytest.raises(PipelineError, match="no such checkpoint directory"):
        check_before_work(cfg, 1)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_eval_of_a_run_without_weights_fails_before_prepare(tmp_path):
    cfg = config(tmp_path, stage="eval", eval=EvalConfig())
    with pytest.raises(PipelineError, match="no trained weights"):
        check_before_work(cfg, 1)
    assert not (tmp_path / "data").exists()


def test_a_split_the_world_cannot_make_fails_before_prepare(tmp_path):
    cfg = config(tmp_path, stage="train")
    cfg.parallel.sp_size = 2
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_before_work(cfg, 3)


def test_starting_over_in_a_run_directory_that_trained_is_refused(tmp_path):
    from pretrain.run_files import RunFiles

    cfg = config(tmp_path, stage="train", train=TrainConfig(resume="none"))
    check_before_work(cfg, 1)  # an empty run directory: fine
    files = RunFiles(tmp_path / "run")
    files.metrics.parent.mkdir(parents=True)
    files.metrics.write_text('{"step": 1, "loss": 9.0}\n')
    (files.checkpoints / "step_00000006").mkdir(parents=True)
    with pytest.raises(
        ConfigError,
        match=r"train.resume=none, but run_dir=.* already holds a training run "
        r"\(train/metrics.jsonl, checkpoints/step_00000006\).*use another run_dir.*train.resume=auto",
    ):
        check_before_work(cfg, 1)
    assert files.metrics.read_text() == '{"step": 1, "loss": 9.0}\n'
