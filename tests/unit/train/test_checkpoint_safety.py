"""Loading a checkpoint never runs code from it: the project's own files load with ``weights_only=True``, and
every file DeepSpeed would unpickle is read as pickle opcodes first and refused when it names anything else."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import PipelineError
from pretrain.train.checkpoint import COMPLETE, check_pickles, load_rng_file, rng_state, set_rng_state
from pretrain.train.weights import load_checkpoint_weights


class RunsCode:
    """Unpickling this runs Python code (it writes ``marker``): what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1)), np.random.randn()


def test_rng_state_loads_with_weights_only_and_resumes_every_generator_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    torch.save(rng_state(), tmp_path / "rng_rank0.pt")
    want = draws()
    draws()
    set_rng_state(load_rng_file(tmp_path / "rng_rank0.pt"))
    assert draws() == want


def test_rng_files_of_earlier_releases_still_load(tmp_path):
    """They pickled the states themselves: Python's tuples, NumPy's array."""
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save(old, tmp_path / "rng_rank0.pt")
    want = draws()
    set_rng_state(load_rng_file(tmp_path / "rng_rank0.pt"))
    assert draws() == want


def crafted_checkpoint(tmp_path, marker):
    step_dir = tmp_path / "checkpoints" / "step_00000004"
    step_dir.mkdir(parents=True)
    torch.save({"module": RunsCode(marker)}, step_dir / "mp_rank_00_model_states.pt")
    record = {"step": 4, "world_size": 1, "model_config": asdict(ModelConfig(vocab_size=300))}
    (step_dir / COMPLETE).write_text(json.dumps(record))
    return step_dir


def test_a_crafted_pickle_is_refused_by_name_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    step_dir = crafted_checkpoint(tmp_path, marker)
    for load in (check_pickles, load_checkpoint_weights):
        with pytest.raises(PipelineError, match=r"mp_rank_00_model_states.pt refers to builtins.exec"):
            load(step_dir)
    assert not marker.exists()


def test_a_truncated_checkpoint_file_is_named(tmp_path):
    step_dir = tmp_path / "step_00000002"
    step_dir.mkdir()
    torch.save({"module": {"w": torch.zeros(1000)}}, step_dir / "mp_rank_00_model_states.pt")
    check_pickles(step_dir)  # a plain state dict passes
    data = (step_dir / "mp_rank_00_model_states.pt").read_bytes()
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="mp_rank_00_model_states.pt is not a readable checkpoint file"):
        check_pickles(step_dir)
