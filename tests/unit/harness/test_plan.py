"""The harness stage's checks before any work, in-process and without lm-eval's task index or a model: what is
refused in one line (no tasks, lm-eval missing, a model with no export, a missing folder, an unknown task, a dataset
that cannot be loaded), when the export is made again first, and what harness.json says was evaluated."""

import os
import sys

import pytest

from pretrain.config import Config, ExportConfig, HarnessConfig, ModelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.extras import MissingExtraError
from pretrain.harness import run as harness_run
from pretrain.harness.run import (
    check_task_names,
    checkpoint_evaluated,
    export_to_make,
    load_tasks,
    plan_harness,
    weights_mtime,
)


def config(tmp_path, stage="harness", **harness) -> Config:
    return Config(stage=stage, run_dir=str(tmp_path / "run"), harness=HarnessConfig(**harness))


def exported(tmp_path, weights_age: float | None = None):
    """A run directory with an export and (with ``weights_age``, seconds after the export) final weights."""
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "model.safetensors").write_bytes(b"x")
    if weights_age is not None:
        (run / "checkpoints").mkdir()
        weights = run / "checkpoints" / "model.safetensors"
        weights.write_bytes(b"y")
        when = (run / "hf" / "model.safetensors").stat().st_mtime + weights_age
        os.utime(weights, (when, when))
    return run


def test_stage_harness_needs_tasks_or_runs_to_compare(tmp_path):
    with pytest.raises(ConfigError, match=r"stage=harness needs harness.tasks=\[TASK, ...\]"):
        plan_harness(config(tmp_path))
    plan_harness(config(tmp_path, stage="all"))  # the default run: nothing to check


def test_without_lm_eval_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without it gives on import
    with pytest.raises(MissingExtraError) as err:
        plan_harness(config(tmp_path, tasks=["hellaswag"]))
    message = str(err.value)
    assert message.startswith("stage=harness (EleutherAI's lm-evaluation-harness) needs lm-eval, which is not")
    assert 'pip install -e ".[harness]"' in message and "\n" not in message


def test_a_model_with_no_export_is_refused_before_training(tmp_path):
    cfg = config(tmp_path, stage="all", tasks=["hellaswag"])
    cfg.model = ModelConfig(pos_encoding="rope")
    with pytest.raises(ConfigError, match="harness.tasks scores the export, which this model cannot have: .*rope"):
        plan_harness(cfg)


def test_no_export_and_no_weights_is_the_exports_own_line(tmp_path):
    with pytest.raises(PipelineError, match="no trained weights in"):
        plan_harness(config(tmp_path, tasks=["hellaswag"]))


def test_a_missing_include_path_is_one_line(tmp_path):
    exported(tmp_path)
    with pytest.raises(PipelineError, match="harness.include_path='nowhere' is not a folder"):
        plan_harness(config(tmp_path, tasks=["t"], include_path="nowhere"))


def test_the_export_is_made_again_when_older_than_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(harness_run, "plan_export", lambda cfg: "exported again")
    run = exported(tmp_path, weights_age=-60)
    assert export_to_make(config(tmp_path)) is None  # newer than the weights
    os.utime(run / "checkpoints" / "model.safetensors")
    os.utime(run / "hf" / "model.safetensors", (1, 1))
    assert export_to_make(config(tmp_path)) == "exported again"
    (run / "checkpoints" / "model.safetensors").unlink()
    assert export_to_make(config(tmp_path)) is None  # an export with no weights beside it is scored as it is
    cfg = config(tmp_path)
    cfg.export = ExportConfig(checkpoint=str(run / "checkpoints"))
    assert export_to_make(cfg) == "exported again"  # export.checkpoint: always that checkpoint
    (run / "hf" / "model.safetensors").unlink()
    assert export_to_make(config(tmp_path)) == "exported again"


def test_a_deepspeed_checkpoint_is_as_new_as_its_newest_file(tmp_path):
    step = tmp_path / "step_00000003"
    (step / "zero").mkdir(parents=True)
    for name, when in (("mp_rank_00_model_states.pt", 100), ("zero/optim.pt", 300)):
        (step / name).write_bytes(b"x")
        os.utime(step / name, (when, when))
    assert weights_mtime(step) == 300


class FakeManager:
    all_tasks = ["arc_easy", "arc_challenge", "hellaswag", "tiny_choice"]

    def __init__(self, error=None):
        self.error = error

    def load(self, names):
        raise self.error


def test_an_unknown_task_names_the_closest_ones():
    with pytest.raises(PipelineError) as err:
        check_task_names(FakeManager(), ["hellaswag", "arc_esay"], "tasks")
    message = str(err.value)
    assert "has no task, group or tag 'arc_esay'; did you mean arc_easy" in message
    assert "harness.include_path='tasks'" in message and "`lm-eval ls tasks`" in message


def test_a_dataset_that_cannot_be_loaded_is_one_line_naming_the_task(tmp_path, monkeypatch):
    error = ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(harness_run, "task_manager", lambda h, names, full=False: FakeManager(error))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PipelineError) as err:
        load_tasks(HarnessConfig(tasks=["hellaswag"]), ["hellaswag"])
    message = str(err.value)
    assert message.startswith("harness task 'hellaswag': its dataset could not be loaded (HF_DATASETS_OFFLINE set)")
    assert "Rowan/hellaswag" in message and "harness.include_path" in message and "\n" not in message


def test_the_checkpoint_evaluated_is_read_from_the_cards_source_line(tmp_path):
    run = exported(tmp_path, weights_age=-60)
    (run / "checkpoints" / "model.safetensors.sha256").write_text("abc123  model.safetensors\n")
    (run / "train").mkdir()
    (run / "train" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 7}\n')
    (run / "hf" / "README.md").write_text(f"| exported from | `{run / 'checkpoints'}` |\n")
    found = checkpoint_evaluated(config(tmp_path), None, run / "hf")
    assert found["weights"] == str(run / "checkpoints") and found["weights_sha256"] == "abc123"
    assert found["step"] == 7 and found["exported"]
    (run / "hf" / "README.md").write_text("| exported from | `/runs/x/checkpoints/step_00000250` |\n")
    assert checkpoint_evaluated(config(tmp_path), None, run / "hf")["step"] == 250


def test_inputs_are_never_cut_except_where_the_export_cannot_read_them():
    from pretrain.harness.run import NO_LIMIT, model_max_length

    assert model_max_length(HarnessConfig(), {"model_type": "bloom", "seq_length": 128}) == NO_LIMIT
    assert model_max_length(HarnessConfig(max_length=4096), {"model_type": "bloom"}) == 4096
    # transformers' MPT builds its bias for max_seq_len positions and fails past them
    assert model_max_length(HarnessConfig(), {"model_type": "mpt", "max_seq_len": 8192}) == 8192
    assert model_max_length(HarnessConfig(max_length=4096), {"model_type": "mpt", "max_seq_len": 8192}) == 4096
