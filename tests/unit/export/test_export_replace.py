"""Replacing ``<run_dir>/hf/`` with a new export: a kill at any point leaves an export there (the previous one or
the new one), and nothing an export moved aside is leaked."""

from __future__ import annotations

import os

import pytest

from pretrain.export import run as export_run


def export_dir(path, text):
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


def killed_at_second_replace(monkeypatch):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill, between moving the old export aside and moving the new one in
        return real_replace(src, dst)

    monkeypatch.setattr(export_run.os, "replace", replace)


def test_a_kill_between_the_renames_never_leaves_no_export(tmp_path, monkeypatch):
    target = export_dir(tmp_path / "hf", "old")
    build = export_dir(tmp_path / ".hf.tmp-1", "new")
    killed_at_second_replace(monkeypatch)
    export_run._replace(build, target)  # one step where the filesystem exchanges directories (Linux)
    assert (target / "config.json").read_text() == "new"
    assert (build / "config.json").read_text() == "old"  # what the caller removes


def test_where_no_exchange_exists_the_next_export_puts_the_previous_one_back(tmp_path, monkeypatch):
    target = export_dir(tmp_path / "hf", "old")
    build = export_dir(tmp_path / ".hf.tmp-1", "new")
    monkeypatch.setattr(export_run, "_exchange", lambda a, b: False)
    killed_at_second_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_run._replace(build, target)
    monkeypatch.undo()
    assert not target.exists() and len(list(tmp_path.glob(".hf.old-*"))) == 1
    said = []
    export_run.recover_stale(target, said.append)
    assert (target / "config.json").read_text() == "old" and "put back" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_stale_folders_of_killed_exports_are_removed_beside_a_complete_one(tmp_path):
    target = export_dir(tmp_path / "hf", "current")
    export_dir(tmp_path / ".hf.old-4242", "older")
    export_dir(tmp_path / ".hf.tmp-4343", "partial")
    export_run.recover_stale(target, lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (target / "config.json").read_text() == "current"
