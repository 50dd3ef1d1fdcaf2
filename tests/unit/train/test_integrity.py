"""Checkpoint checksums, the fallback past a corrupt checkpoint, the resume rules, and weights that fail to load
in one line (damaged, truncated, non-finite)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import Config, ModelConfig, TrainConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import file_sha256
from pretrain.train.checkpoint import COMPLETE, LATEST, CheckpointManager, describe_write_error
from pretrain.train.integrity import checksums, nonfinite_tensors, parameters_finite, verify_checksums
from pretrain.train.resume import check_resume, train_record
from pretrain.train.weights import WEIGHTS, WEIGHTS_CHECKSUM, load_weights, save_weights


def fake_checkpoint(directory, step, payload=b"x" * 4096):
    """A checkpoint directory as CheckpointManager.save leaves it: files, then complete.json with their checksums."""
    step_dir = directory / f"step_{step:08d}"
    (step_dir / "sub").mkdir(parents=True)
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(payload)
    (step_dir / "sub" / "rng_rank0.pt").write_bytes(b"rng" * 100)
    record = {"step": step, "world_size": 1, "checksums": checksums(step_dir, DistContext())}
    (step_dir / COMPLETE).write_text(json.dumps(record))
    (directory / LATEST).write_text(step_dir.name)
    return step_dir


def flip(path, at=100, count=64):
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_cover_every_file_and_catch_flips_truncation_and_loss(tmp_path):
    step_dir = fake_checkpoint(tmp_path, 10)
    recorded = json.loads((step_dir / COMPLETE).read_text())["checksums"]
    assert sorted(recorded) == ["mp_rank_00_model_states.pt", "sub/rng_rank0.pt"]
    assert verify_checksums(step_dir, recorded) is None
    flip(step_dir / "mp_rank_00_model_states.pt")
    assert "mp_rank_00_model_states.pt does not match" in verify_checksums(step_dir, recorded)
    step_dir = fake_checkpoint(tmp_path, 20)
    recorded = json.loads((step_dir / COMPLETE).read_text())["checksums"]
    (step_dir / "sub" / "rng_rank0.pt").write_bytes(b"rng")
    assert "rng_rank0.pt does not match" in verify_checksums(step_dir, recorded)
    (step_dir / "sub" / "rng_rank0.pt").unlink()
    assert "rng_rank0.pt is missing" in verify_checksums(step_dir, recorded)
    assert verify_checksums(step_dir, None) is None  # an earlier release's checkpoint: nothing recorded


def test_resume_auto_falls_back_past_a_corrupt_checkpoint_and_keeps_it(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    flip(newest / "mp_rank_00_model_states.pt")
    said = []
    manager = CheckpointManager(tmp_path, keep_last=2, ctx=DistContext())
    assert manager.find_verified("auto", say=said.append) == (tmp_path, "step_00000010")
    assert said and "skipping checkpoint step_00000020" in said[0] and "does not match" in said[0]
    assert (tmp_path / "step_00000020.corrupt" / "mp_rank_00_model_states.pt").is_file()  # kept, not deleted
    assert (tmp_path / LATEST).read_text() == "step_00000010"
    with pytest.raises(PipelineError, match="step_00000010.*mp_rank_00_model_states.pt does not match"):
        flip(tmp_path / "step_00000010" / "mp_rank_00_model_states.pt")
        manager.find_verified(str(tmp_path / "step_00000010"))


def test_pruning_removes_the_completion_record_first(tmp_path, monkeypatch):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    removed_while_complete = []
    import shutil

    real_rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        if (tmp_path / "step_00000010" / COMPLETE).exists() and str(path).endswith("step_00000010"):
            removed_while_complete.append(path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    CheckpointManager(tmp_path, keep_last=2, ctx=DistContext())._prune(keep="step_00000030")
    assert not (tmp_path / "step_00000010").exists() and not removed_while_complete


def test_write_errors_say_disk_full_or_size_limit():
    import errno

    path = __import__("pathlib").Path("/tmp/ckpt/step_00000004")
    assert "the disk is full" in describe_write_error(OSError(errno.ENOSPC, "No space left"), path)
    assert "size limit" in describe_write_error(OSError(errno.EFBIG, "File too large"), path)


def test_weights_that_are_damaged_or_not_finite_fail_in_one_line(tmp_path):
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, seq_len=16)
    model = GPT(cfg)
    save_weights(model, cfg, tmp_path, DistContext(), zero_stage=0)
    assert (tmp_path / WEIGHTS_CHECKSUM).read_text().split()[0] == file_sha256(tmp_path / WEIGHTS)
    load_weights(tmp_path)
    flip(tmp_path / WEIGHTS, at=2000)
    with pytest.raises(PipelineError, match=r"model.safetensors does not match its checksum"):
        load_weights(tmp_path)
    (tmp_path / WEIGHTS_CHECKSUM).unlink()  # no record: refused, naming the file and how to proceed
    with pytest.raises(PipelineError, match=r"has no checksum file model.safetensors.sha256 .*sha256sum"):
        load_weights(tmp_path)
    (tmp_path / WEIGHTS).write_bytes((tmp_path / WEIGHTS).read_bytes()[:100])
    (tmp_path / WEIGHTS_CHECKSUM).write_text(file_sha256(tmp_path / WEIGHTS))  # truncated, its checksum rewritten
    with pytest.raises(PipelineError, match=r"model.safetensors cannot be read"):
        load_weights(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["h.0.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / WEIGHTS))
    (tmp_path / WEIGHTS_CHECKSUM).write_text(file_sha256(tmp_path / WEIGHTS))
    with pytest.raises(PipelineError, match=r"weight h.0.mlp.dense_h_to_4h.weight holds NaN"):
        load_weights(tmp_path)
    assert nonfinite_tensors(state) == ["h.0.mlp.dense_h_to_4h.weight"]
    with torch.no_grad():
        model.h[0].mlp.dense_h_to_4h.weight[0, 0] = float("inf")
    assert not parameters_finite(model, DistContext())
    with pytest.raises(PipelineError, match="holds NaN or infinity"):
        save_weights(model, cfg, tmp_path / "new", DistContext(), zero_stage=0)
    assert not (tmp_path / "new" / WEIGHTS).exists()


def resume_setup(**train):
    cfg = Config(model=ModelConfig(vocab_size=512), train=TrainConfig(**train))
    record = {
        "model_config": asdict(cfg.model),
        "loader": {"n_tokens": 1000, "checksum": "abc"},
        "train_config": train_record(Config(), dp_size=1),
    }
    return cfg, record


def test_resume_refuses_another_model_or_corpus_and_names_both_values():
    cfg, record = resume_setup()
    assert check_resume(record, cfg, cfg.model, record["loader"], "ck") == []
    with pytest.raises(
        PipelineError,
        match=r"model.d_model is 256 but checkpoint ck holds a model with d_model=128.*"
        r"train.init_from=ck",
    ):
        check_resume(record, cfg, replace(cfg.model, d_model=256), record["loader"], "ck")
    with pytest.raises(PipelineError, match="model.pos_encoding is 'rope'"):
        check_resume(record, cfg, replace(cfg.model, pos_encoding="rope"), record["loader"], "ck")
    with pytest.raises(PipelineError, match="another train split"):
        check_resume(record, cfg, cfg.model, {"n_tokens": 1000, "checksum": "def"}, "ck")
    # The attention backend computes the same function: it may change.
    assert check_resume(record, cfg, replace(cfg.model, attention="sdpa"), record["loader"], "ck") == []


def test_resume_changes_optimization_keys_only_when_told():
    cfg, record = resume_setup(lr=1e-3)
    with pytest.raises(
        PipelineError,
        match=r"train.lr=0.001, but checkpoint ck was trained with train.lr=0.003.*"
        r"train.resume_override=\[train.lr\]",
    ):
        check_resume(record, cfg, cfg.model, record["loader"], "ck")
    cfg, _ = resume_setup(lr=1e-3, resume_override=["train.lr"])
    assert check_resume(record, cfg, cfg.model, record["loader"], "ck") == [
        "train.lr: 0.003 -> 0.001 (train.resume_override)"
    ]
    cfg, _ = resume_setup(seed=7)
    with pytest.raises(PipelineError, match="train.seed=7.*cannot change within a run"):
        check_resume(record, cfg, cfg.model, record["loader"], "ck")
    cfg, _ = resume_setup(precision="bf16")  # DeepSpeed's state cannot move between precisions: never offered
    with pytest.raises(PipelineError, match="train.precision='bf16'.*cannot change within a run") as err:
        check_resume(record, cfg, cfg.model, record["loader"], "ck")
    assert "resume_override" not in str(err.value)
    with pytest.raises(ConfigError, match="train.resume_override holds 'train.precision'"):
        TrainConfig(resume_override=["train.precision"])
    cfg, _ = resume_setup(max_steps=5000)  # extending a run
    assert check_resume(record, cfg, cfg.model, record["loader"], "ck") == []
    # 2 ranks -> 1 rank with grad_accum doubled: the same global batch, the same run.
    two_ranks = {**record, "train_config": train_record(Config(), dp_size=2)}
    cfg, _ = resume_setup(grad_accum=2)
    assert check_resume(two_ranks, cfg, cfg.model, record["loader"], "ck", dp_size=1) == []
    with pytest.raises(PipelineError, match=r"the global batch is 16 sequences .* trained with 32; keep it"):
        check_resume(two_ranks, Config(model=cfg.model), cfg.model, record["loader"], "ck", dp_size=1)
    cfg, _ = resume_setup(resume_override=["train.grad_accum"])
    assert check_resume(two_ranks, cfg, cfg.model, record["loader"], "ck")[0].startswith("global batch: 32 -> 16")
    with pytest.raises(ConfigError, match="train.resume_override holds 'train.seed'; the keys that may change"):
        TrainConfig(resume_override=["train.seed"])


def test_a_latest_naming_a_missing_checkpoint_is_refused_not_passed_over(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / LATEST).write_text("step_00000020")
    manager = CheckpointManager(tmp_path, keep_last=2, ctx=DistContext())
    for resume in ("auto", str(tmp_path)):
        with pytest.raises(PipelineError, match="names checkpoint 'step_00000020', which is missing or incomplete"):
            manager.find_verified(resume)
    (tmp_path / LATEST).write_text("step_00000010")
    assert manager.find_verified(str(tmp_path)) == (tmp_path, "step_00000010")
