"""The prepare stage in a process of its own: killed midway it leaves nothing that looks complete; through the
command line it prepares, then reuses, and reports bad input in one line."""

from __future__ import annotations

import json
import signal

from cli import TESTS, run_cli, run_python
from data_fixtures import complete_corpora, data_config, leftovers

from pretrain.data.prepare import prepare_corpus

KILLED_PREPARE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from pretrain.data.shards import ShardWriter
from pretrain.data.prepare import prepare_corpus
from data_fixtures import data_config

def killed(self):
    os.kill(os.getpid(), signal.SIGKILL)  # as if the node died while the shards were being written

ShardWriter.finish = killed
prepare_corpus(data_config(Path({tmp!r})))
"""


def test_a_prepare_killed_midway_leaves_nothing_that_looks_complete(tmp_path):
    script = KILLED_PREPARE.format(tests=str(TESTS), tmp=str(tmp_path))
    killed = run_python(script, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert complete_corpora(tmp_path / "cache") == []
    (stale,) = leftovers(tmp_path / "cache")
    assert list(stale.rglob(".*.tmp-*")), "the killed unit's temporary shard"
    corpus = prepare_corpus(data_config(tmp_path))  # the next prepare resumes the build and sweeps its leftovers
    assert complete_corpora(tmp_path / "cache") == [corpus.directory] and leftovers(tmp_path / "cache") == []
    assert not list(corpus.directory.rglob(".*.tmp-*"))


def test_cli_prepares_then_reuses_and_reports_errors(tmp_path):
    args = [
        "stage=prepare",
        f"run_dir={tmp_path / 'run'}",
        "data.cache_dir=cache",  # relative to the current directory
        "data.max_files=12",
        "data.vocab_size=400",
        "data.num_proc=2",
    ]
    first = run_cli(["pretrain", *args], cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "[prepare] prepared stdlib: 12 documents" in first.stdout
    assert "tokens/s" in first.stdout and "MB on disk" in first.stdout
    (directory,) = complete_corpora(tmp_path / "cache")
    assert json.loads((directory / "manifest.json").read_text())["vocab_size"] == 400
    assert (tmp_path / "run" / "tokenizer" / "spm.model").is_file()
    second = run_cli(["pretrain", *args], cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"reusing the prepared corpus at {directory}" in second.stdout
    assert "prepared stdlib" not in second.stdout
    bad = run_cli(
        ["pretrain", "stage=prepare", f"run_dir={tmp_path / 'run'}", "data=files", "data.paths=[missing/*.txt]"],
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "error: data.paths: 'missing/*.txt' matches no file" in bad.stderr
