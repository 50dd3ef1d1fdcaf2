"""The CUDA RNG in a checkpoint: this rank's device only, and a state saved with more GPUs visible still loads
(torch indexes ``default_generators[idx]``: restoring every saved device's state raised IndexError). No GPU
needed: torch.cuda is mocked."""

from __future__ import annotations

import torch

import pretrain.train.checkpoint as checkpoint
from pretrain.train.checkpoint import cuda_rng_state_to_restore, rng_state, set_rng_state

GEN0, GEN1 = torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)


def test_a_list_of_two_generator_states_gives_the_current_devices_entry():
    assert cuda_rng_state_to_restore([GEN0, GEN1], 0) is GEN0
    assert cuda_rng_state_to_restore([GEN0, GEN1], 1) is GEN1
    assert cuda_rng_state_to_restore([GEN0, GEN1], 3) is GEN0  # fewer saved than the device index: the first
    assert cuda_rng_state_to_restore(GEN1, 0) is GEN1  # this release: one state
    assert cuda_rng_state_to_restore(None, 0) is None
    assert cuda_rng_state_to_restore([], 0) is None


def test_a_resume_saved_with_two_cuda_generators_loads_where_one_is_visible(monkeypatch, tmp_path):
    saved = rng_state()  # CPU here: "cuda" is None
    saved["cuda"] = [GEN0, GEN1]  # what an earlier release wrote with two GPUs visible
    path = tmp_path / "rng_rank0.pt"
    torch.save(saved, path)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    def set_all(states):  # what torch does with one device visible
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    set_rng_state(checkpoint.load_rng_file(path))
    assert len(restored) == 1 and torch.equal(restored[0], GEN0)


def test_the_saved_state_holds_the_current_devices_generator_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": GEN1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [GEN0, GEN1])
    assert rng_state()["cuda"] is GEN1
