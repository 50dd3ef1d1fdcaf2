"""Prepare's work units through the command line, in real processes: a prepare killed with SIGKILL leaves no process
behind and its rerun finishes to the bytes of an uninterrupted one; 1 and 4 workers write the same bytes; a damaged
corpus is refused in one line; a bad unit is reported in one line and the other units are kept; two prepares of one
corpus at once build it once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from cli import cli_command, cli_env, run_pretrain
from data_fixtures import code_rows, complete_corpora, corpus_files, leftovers, write_jsonl

from pretrain.data.manifest import VERIFIED_FILE, read_manifest, verify

# 150 stdlib files cut into about 76 units of 20,000 characters: a few seconds of tokenizing on 2 workers, long
# enough to kill midway, and dozens of shards to compare.
SETTINGS = [
    "stage=prepare",
    "data.max_files=150",
    "data.vocab_size=400",
    "data.unit_bytes=20000",
    "data.tokenizer_sample_chars=300000",
    "data.num_proc=1",
]


def prepare_args(tmp_path: Path, name: str, workers: int, run: str = "run") -> list[str]:
    """The settings above, with a cache ``tmp_path/<name>`` and the run directory ``tmp_path/<run>``."""
    return [
        *SETTINGS,
        f"run_dir={tmp_path / run}",
        f"data.cache_dir={tmp_path / name}",
        f"data.workers={workers}",
    ]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, no traceback, and exactly one ``error:`` line holding every ``expected`` string; the line."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def start_prepare(args: list[str], cwd: Path, log: Path, token: str) -> subprocess.Popen:
    """``python -m pretrain ARGS`` left running, its output in ``log`` (a file, not a pipe: a process left behind
    would hold a pipe open), with ``PREPARE_TEST_TOKEN=token`` in its environment (every descendant inherits it)."""
    out = open(log, "w")
    try:
        return subprocess.Popen(
            cli_command(["pretrain", *args]),
            cwd=cwd,
            env=cli_env({"PREPARE_TEST_TOKEN": token}),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        out.close()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_with_token(token: str) -> list[psutil.Process]:
    """Live processes whose environment holds ``PREPARE_TEST_TOKEN=token``: the prepare and every descendant, even
    one its parent's death handed to init."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("PREPARE_TEST_TOKEN") == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"pid {proc.pid}")
    return out


def wait_for(condition, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The corpus prepared uninterrupted with one worker (its units run one after another in the prepare itself)."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run_pretrain(prepare_args(tmp, "cache", workers=1), cwd=tmp, timeout=300)
    assert "prepared stdlib: 150 documents" in done.stdout, done.stdout
    (directory,) = complete_corpora(tmp / "cache")
    assert read_manifest(directory)["units"] > 40
    return directory


@pytest.mark.slow
def test_a_prepare_killed_with_sigkill_leaves_no_process_and_resumes_to_the_same_bytes(reference, tmp_path):
    args = prepare_args(tmp_path, "cache", workers=2)
    cache = tmp_path / "cache"
    token = uuid.uuid4().hex
    proc = start_prepare(args, tmp_path, tmp_path / "killed.log", token)
    try:
        started = wait_for(lambda: any(cache.glob(".build-*/units/*.json")), 240)  # a unit done: kill now
        assert started, f"no unit finished:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) > 2, "the workers run in processes of their own"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not processes_with_token(token), 5, interval=0.2)
        survivors = {p.pid: p for p in processes_with_token(token)}
        survivors.update({p.pid: p for p in family[1:] if alive(p)})
        report = describe(list(survivors.values()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for survivor in processes_with_token(token):  # only processes this test started carry its token
            survivor.kill()
    assert report == [], "processes of the killed prepare still alive 5 s after its SIGKILL:\n" + "\n".join(report)
    assert complete_corpora(cache) == []
    (build,) = leftovers(cache)
    total = read_manifest(reference)["units"]
    done_before = len(list(build.glob("units/*.json")))
    assert 1 <= done_before < total, f"killed after {done_before} of {total} units"
    temporary = list(build.rglob(".*.tmp*"))  # the shards the killed workers were writing, if any

    resumed = run_pretrain(args, cwd=tmp_path, timeout=300)
    found = re.search(r"(\d+) of (\d+) units already done", resumed.stdout)
    assert found, resumed.stdout
    assert int(found[1]) >= done_before and int(found[2]) == total, found[0]
    assert "keeping the tokenizer a stopped prepare of this corpus trained" in resumed.stdout
    if temporary:
        assert f"removed {len(temporary)} temporary files a stopped prepare left" in resumed.stdout, resumed.stdout
    (directory,) = complete_corpora(cache)
    assert corpus_files(directory) == corpus_files(reference)
    assert leftovers(cache) == []
    assert not list(cache.rglob(".*.tmp*")), "temporary files left"


@pytest.mark.slow
def test_one_worker_and_four_workers_write_the_same_bytes(reference, tmp_path):
    done = run_pretrain(prepare_args(tmp_path, "cache", workers=4), cwd=tmp_path, timeout=300)
    assert "on 4 worker processes" in done.stdout, done.stdout
    (directory,) = complete_corpora(tmp_path / "cache")
    assert directory.name == reference.name
    assert corpus_files(directory) == corpus_files(reference)
    assert leftovers(tmp_path / "cache") == []


def damage_tampered(directory: Path, manifest: dict) -> tuple[str, ...]:
    """Other valid token ids in the middle of a train shard: same size, same inode, and the mtime put back, so
    that only the contents (and the ctime, which no user can set back) tell."""
    shards = manifest["splits"]["train"]["shards"]
    shard = shards[len(shards) // 2]
    path = directory / shard["path"]
    before = path.stat()
    ids = np.fromfile(path, dtype=manifest["dtype"])
    middle = len(ids) // 2
    changed = ((ids[middle : middle + 16].astype(np.int64) + 7) % manifest["vocab_size"]).astype(manifest["dtype"])
    with open(path, "r+b") as f:
        f.seek(middle * ids.itemsize)
        f.write(changed.tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    return f"{shard['path']} does not match the SHA-256", str(directory)


def damage_vocab_size(directory: Path, manifest: dict) -> tuple[str, ...]:
    edited = {**manifest, "vocab_size": manifest["vocab_size"] + 112}
    (directory / "manifest.json").write_text(json.dumps(edited, indent=1, sort_keys=True))
    assert read_manifest(directory) is not None, "still a manifest of this format"
    return f"says vocab_size={edited['vocab_size']}, but its tokenizer spm.model has {manifest['vocab_size']} pieces", (
        str(directory / "manifest.json")
    )


def damage_missing(directory: Path, manifest: dict) -> tuple[str, ...]:
    shard = manifest["splits"]["val"]["shards"][0]["path"]
    (directory / shard).unlink()
    return f"{shard}, listed in its manifest, is missing", str(directory)


@pytest.mark.parametrize("damage", [damage_tampered, damage_vocab_size, damage_missing])
def test_a_damaged_corpus_is_refused_in_one_line(reference, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(reference.parent, cache, ignore=shutil.ignore_patterns(".*.lock"))
    directory = cache / reference.name
    args = prepare_args(tmp_path, "cache", workers=1)
    if damage is damage_tampered:
        # A first reuse verifies every file and remembers them (.verified.json): the tampering must still be seen.
        reused = run_pretrain(args, cwd=tmp_path, timeout=300)
        assert f"reusing the prepared corpus at {directory}" in reused.stdout, reused.stdout
        assert (directory / VERIFIED_FILE).is_file()
    expected = damage(directory, read_manifest(directory))
    refused = run_pretrain(args, cwd=tmp_path, timeout=300, check=False)
    assert_one_error_line(refused, *expected)
    assert "prepared stdlib" not in refused.stdout and "reusing" not in refused.stdout


def bad_jsonl_corpus(folder: Path, bad_file: int = 3) -> Path:
    """Four .jsonl files of 10 stdlib sources each; file ``bad_file`` ends in a line that is not JSON."""
    rows = code_rows(40)
    for index in range(4):
        write_jsonl(folder / f"{index}.jsonl", rows[index * 10 : (index + 1) * 10])
    with open(folder / f"{bad_file}.jsonl", "a") as f:
        f.write('{"text": "a line cut short\n')
    return folder


def test_a_bad_json_line_stops_the_load_in_one_line(tmp_path):
    corpus = bad_jsonl_corpus(tmp_path / "corpus")
    args = [
        "stage=prepare",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data=files",
        f"data.paths=[{corpus}/*.jsonl]",
        "data.vocab_size=400",
        "data.workers=1",
    ]
    failed = run_pretrain(args, cwd=tmp_path, timeout=300, check=False)
    # The split pass reads the files themselves: the line names the file and the line.
    assert_one_error_line(failed, f"{corpus / '3.jsonl'} line 11 is not valid JSON (")
    assert complete_corpora(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []


@pytest.mark.slow
def test_a_bad_unit_is_reported_in_one_line_and_the_other_units_are_kept(reference, tmp_path):
    """A stream is read inside the units (with a given tokenizer nothing reads it before): the fourth file's bad
    line fails its unit alone, after the three others have written their shards."""
    corpus = bad_jsonl_corpus(tmp_path / "corpus")
    tokenizer = shutil.copy(reference / "spm.model", tmp_path / "given.model")
    args = [
        "stage=prepare",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data=hf",
        "data.name=json",
        f"data.data_files=[{corpus}/*.jsonl]",
        "data.streaming=true",
        f"data.tokenizer={tokenizer}",
        "data.workers=2",
    ]
    failed = run_pretrain(args, cwd=tmp_path, timeout=300, check=False)
    line = assert_one_error_line(failed, "could not read shard 3 of the stream data.name='json'")
    assert "the other units' shards are kept" in line
    assert complete_corpora(tmp_path / "cache") == []
    (build,) = leftovers(tmp_path / "cache")
    assert sorted(p.name for p in (build / "units").iterdir()) == [
        "00000.json",
        "00001.json",
        "00002.json",
        "00003.error",
    ]
    for number in range(3):
        assert (build / "train" / f"{number:05d}.bin").is_file()
    assert not list(build.rglob(".*.tmp*")), "the failed unit's temporary shards"

    again = run_pretrain(args, cwd=tmp_path, timeout=300, check=False)
    assert "3 of 4 units already done; building the other 1" in again.stdout, again.stdout
    assert error_lines(again.stderr) == [line]


@pytest.mark.slow
def test_two_prepares_of_one_corpus_at_once_build_it_once(reference, tmp_path):
    token = uuid.uuid4().hex
    runs = []
    try:
        for name in ("first", "second"):
            args = prepare_args(tmp_path, "cache", workers=1, run=f"run-{name}")
            runs.append((start_prepare(args, tmp_path, tmp_path / f"{name}.log", token), tmp_path / f"{name}.log"))
        codes = [proc.wait(timeout=300) for proc, _ in runs]
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text() for _, log in runs]
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    built = [output for output in outputs if "[prepare] prepared stdlib" in output]
    waited = [output for output in outputs if "[prepare] prepared stdlib" not in output]
    assert len(built) == 1 and len(waited) == 1, "\n".join(output[-3000:] for output in outputs)
    assert "another prepare of this corpus is running" in waited[0], waited[0][-3000:]
    assert "reusing the prepared corpus" in waited[0], waited[0][-3000:]
    assert sum(output.count("training a bpe tokenizer") for output in outputs) == 1
    (directory,) = complete_corpora(tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []
    (directory / VERIFIED_FILE).unlink(missing_ok=True)
    verify(directory, read_manifest(directory))  # every listed file against its SHA-256
    assert corpus_files(directory) == corpus_files(reference)


def test_the_split_pass_reads_files_in_parallel_processes_to_the_same_rows(tmp_path, monkeypatch):
    """Many files are indexed by a pool of processes; the rows, hashes and offsets equal one process's."""
    import pretrain.data.documents as documents_module
    from pretrain.data.documents import FileDocuments

    rows = code_rows(24)
    files = [str(write_jsonl(tmp_path / "in" / f"{i:02d}.jsonl", rows[i * 3 : i * 3 + 3])) for i in range(8)]

    def noisy(message):
        raise AssertionError(message)

    serial = FileDocuments(files)
    (tmp_path / "serial").mkdir()
    u1, n1 = serial.scan(tmp_path / "serial", num_proc=1, max_documents=None, say=noisy)
    monkeypatch.setattr(documents_module, "PARALLEL_SCAN_BYTES", 0)
    parallel = FileDocuments(files)
    (tmp_path / "parallel").mkdir()
    u2, n2 = parallel.scan(tmp_path / "parallel", num_proc=2, max_documents=None, say=noisy)
    assert np.array_equal(u1, u2) and np.array_equal(n1, n2) and parallel.file_rows == serial.file_rows
    assert np.array_equal(np.load(serial.offsets_path), np.load(parallel.offsets_path))
    assert parallel.texts(0, len(rows)) == [row["text"] for row in rows]
