"""Two ranks started by the DeepSpeed launcher on CPU: rank 0 prepares once, the other waits and reads; a failure on
rank 0, before or inside its work units, stops both ranks with one line each."""

from __future__ import annotations

import shutil

import pytest
from cli import run_cli
from data_fixtures import code_rows, complete_corpora, leftovers, write_jsonl

from pretrain.data.tokenizer import train_tokenizer

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


def test_a_unit_failing_on_rank_0_stops_both_ranks_in_one_line_each(tmp_path):
    """Rank 0 tokenizes a stream's files on worker processes; the last file's bad line fails its unit. Rank 1, which
    waits on a status file rather than a collective, stops too: one line from each rank, no hang, no traceback."""
    rows = code_rows(12)
    for index in range(3):
        write_jsonl(tmp_path / "corpus" / f"{index}.jsonl", rows[index * 4 : (index + 1) * 4])
    with open(tmp_path / "corpus" / "2.jsonl", "a") as f:
        f.write('{"text": "a line cut short\n')
    given = train_tokenizer([row["text"] for row in rows], tmp_path / "given", 400)
    args = [
        "stage=prepare",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data=hf",
        "data.name=json",
        f"data.data_files=[{tmp_path / 'corpus'}/*.jsonl]",
        "data.streaming=true",
        f"data.tokenizer={given}",
        "data.workers=2",
    ]
    failed = run_cli(["pretrain", *args], cwd=tmp_path, ranks=2, timeout=180)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr + failed.stdout, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    rank0 = [line for line in lines if line.startswith("error: could not read shard 2 of the stream")]
    rank1 = [
        line for line in lines if line.startswith("error: rank 0 could not prepare the corpus: could not read shard 2")
    ]
    assert len(rank0) == 1 and len(rank1) == 1 and len(lines) == 2, failed.stderr[-3000:]
    assert complete_corpora(tmp_path / "cache") == []
