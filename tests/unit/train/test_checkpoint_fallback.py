"""The fallback past a corrupt checkpoint (``train.resume=auto``): idempotent, safe at every point of a crash, and a
damaged ``complete.json`` is a reason to fall back, not a fatal error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.parallel.distributed import DistContext
from pretrain.train.checkpoint import COMPLETE, LATEST, CheckpointManager
from pretrain.train.integrity import checksums


def fake_checkpoint(directory, step, payload=b"x" * 4096):
    """A checkpoint as CheckpointManager.save leaves it: files, then complete.json with their checksums, then latest."""
    step_dir = directory / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(payload)
    record = {"step": step, "world_size": 1, "checksums": checksums(step_dir, DistContext())}
    (step_dir / COMPLETE).write_text(json.dumps(record))
    (directory / LATEST).write_text(step_dir.name)
    return step_dir


def corrupt(step_dir):
    path = step_dir / "mp_rank_00_model_states.pt"
    path.write_bytes(b"y" + path.read_bytes()[1:])


def manager(directory):
    return CheckpointManager(directory, keep_last=3, ctx=DistContext())


def test_the_same_step_corrupted_twice_is_set_aside_under_a_new_name(tmp_path):
    fake_checkpoint(tmp_path, 2)
    corrupt(fake_checkpoint(tmp_path, 4))
    assert manager(tmp_path).find_verified("auto", say=lambda _: None) == (tmp_path, "step_00000002")
    corrupt(fake_checkpoint(tmp_path, 4))  # resumed, saved step 4 again, corrupted again
    said = []
    assert manager(tmp_path).find_verified("auto", say=said.append) == (tmp_path, "step_00000002")
    assert "kept as step_00000004.corrupt-2" in said[0]
    assert (tmp_path / "step_00000004.corrupt" / f"{COMPLETE}.unverified").is_file()
    assert (tmp_path / "step_00000004.corrupt-2" / "mp_rank_00_model_states.pt").is_file()
    assert (tmp_path / LATEST).read_text() == "step_00000002"


@pytest.mark.parametrize("damage", [b'{"step": 4, "checks', b"", b"[1, 2]", b'{"checksums": 7}'])
def test_a_damaged_completion_record_is_a_reason_to_fall_back(tmp_path, damage):
    fake_checkpoint(tmp_path, 2)
    (fake_checkpoint(tmp_path, 4) / COMPLETE).write_bytes(damage)
    said = []
    assert manager(tmp_path).find_verified("auto", say=said.append) == (tmp_path, "step_00000002")
    assert "skipping checkpoint step_00000004" in said[0] and "complete.json" in said[0]
    assert (tmp_path / "step_00000004.corrupt").is_dir()


def test_a_crash_at_any_point_of_the_fallback_leaves_a_resumable_directory(tmp_path, monkeypatch):
    """Kill the fallback at each of its renames (``latest`` has moved before the first); the next resume finds the
    older checkpoint at once, never a ``latest`` naming a checkpoint without ``complete.json``."""
    real_rename = Path.rename
    for crash_at in (1, 2):
        directory = tmp_path / str(crash_at)
        directory.mkdir()
        fake_checkpoint(directory, 2)
        corrupt(fake_checkpoint(directory, 4))
        calls = []

        def crashing_rename(self, target, crash_at=crash_at, calls=calls):
            calls.append(target)
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # the kill
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", crashing_rename)
        with pytest.raises(KeyboardInterrupt):
            manager(directory).find_verified("auto", say=lambda _: None)
        monkeypatch.setattr(Path, "rename", real_rename)
        assert (directory / LATEST).read_text() == "step_00000002"
        assert manager(directory).find("auto") == (directory, "step_00000002")
        assert manager(directory).find_verified("auto", say=lambda _: None) == (directory, "step_00000002")


def test_an_earlier_release_stopped_between_its_renames_is_resumed_not_refused(tmp_path):
    fake_checkpoint(tmp_path, 2)
    bad = fake_checkpoint(tmp_path, 4)
    (bad / COMPLETE).rename(bad / f"{COMPLETE}.unverified")  # latest still names step 4
    assert manager(tmp_path).find_verified("auto", say=lambda _: None) == (tmp_path, "step_00000002")
    fake_checkpoint(tmp_path, 6).rename(tmp_path / "step_00000006.corrupt")  # renamed, latest not moved
    (tmp_path / LATEST).write_text("step_00000006")
    assert manager(tmp_path).find("auto") == (tmp_path, "step_00000002")


def test_no_checkpoint_that_verifies_removes_latest_and_starts_over(tmp_path):
    corrupt(fake_checkpoint(tmp_path, 2))
    said = []
    assert manager(tmp_path).find_verified("auto", say=said.append) is None
    assert not (tmp_path / LATEST).exists() and (tmp_path / "step_00000002.corrupt").is_dir()
    assert "training starts from the beginning" in said[-1]
    assert manager(tmp_path).find("auto") is None
