"""``train.precision=auto`` (the default): bf16 where the device has it, fp32 on CPU, and a resumed run keeps its
checkpoint's precision, resolved before anything records or compares it. No GPU needed: the device is mocked."""

from __future__ import annotations

import types

import pytest
import torch

from pretrain.config import Config, TrainConfig, resolve_precision
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.train.loop import resolved_precision


def test_auto_is_the_default_and_resolves_by_device():
    assert TrainConfig().precision == "auto"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda", bf16_supported=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_supported=False) == "fp32"  # V100, T4
    assert resolve_precision("auto", "cuda", True, saved="fp32") == "fp32"  # a resume keeps its precision
    assert resolve_precision("fp16", "cuda", True, saved="fp32") == "fp16"  # an explicit one is never changed


def _ctx(kind: str):
    return types.SimpleNamespace(device=torch.device(kind))


def test_the_default_cpu_run_trains_in_fp32_as_before():
    cfg = resolved_precision(Config(), _ctx("cpu"), None)
    assert cfg.train.precision == "fp32"
    # precision reaches the run through the DeepSpeed config only: the one the fp32 default generated before
    assert deepspeed_config(cfg.train, 1) == deepspeed_config(TrainConfig(precision="fp32"), 1)


@pytest.fixture
def tf32_restored():
    """torch's TF32 switches as they were (set and reset by hand: they are properties of torch's backend modules,
    which pytest's monkeypatch cannot undo on every pytest release)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_gpu_run_gets_bf16_and_tf32_and_an_old_fp32_checkpoint_still_resumes(monkeypatch, tf32_restored):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolved_precision(Config(), _ctx("cuda"), None).train.precision == "bf16"
    assert torch.backends.cuda.matmul.allow_tf32
    old = {"train_config": {"train.precision": "fp32", "train.seed": 1234}}
    assert resolved_precision(Config(), _ctx("cuda"), old).train.precision == "fp32"
    older = {"step": 10}  # before train_config was recorded: fp32 was the only default
    assert resolved_precision(Config(), _ctx("cuda"), older).train.precision == "fp32"
    bf16 = {"train_config": {"train.precision": "bf16"}}
    assert resolved_precision(Config(), _ctx("cuda"), bf16).train.precision == "bf16"
