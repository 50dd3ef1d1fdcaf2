"""Two ranks started by the DeepSpeed launcher on CPU: rank 0 prepares once, the other waits and reads."""

from __future__ import annotations

import shutil

import pytest
from cli import run_cli
from data_fixtures import complete_corpora, leftovers

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher"),
]


def test_two_ranks_prepare_once_then_reuse(tmp_path):
    args = [
        "stage=prepare",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_files=12",
        "data.vocab_size=400",
        "data.num_proc=1",
    ]
    first = run_cli(["pretrain", *args], cwd=tmp_path, ranks=2, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "dist_world_size=2" in first.stdout + first.stderr
    output = first.stdout
    assert output.count("[prepare] training a bpe tokenizer") == 1
    assert output.count("[prepare] prepared stdlib: 12 documents") == 1
    assert len(complete_corpora(tmp_path / "cache")) == 1 and leftovers(tmp_path / "cache") == []
    assert (tmp_path / "run" / "tokenizer" / "spm.model").is_file()
    second = run_cli(["pretrain", *args], cwd=tmp_path, ranks=2, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("[prepare] reusing the prepared corpus") == 1
    assert "training a bpe tokenizer" not in second.stdout


def test_an_error_on_rank_0_stops_every_rank(tmp_path):
    args = ["stage=prepare", f"run_dir={tmp_path / 'run'}", "data=files", f"data.paths=[{tmp_path}/none/*.jsonl]"]
    failed = run_cli(["pretrain", *args], cwd=tmp_path, ranks=2, timeout=240)
    assert failed.returncode != 0
    assert "error: data.paths:" in failed.stderr and "matches no file" in failed.stderr
    assert "error: rank 0 could not prepare the corpus: data.paths:" in failed.stderr
    assert complete_corpora(tmp_path / "cache") == []
