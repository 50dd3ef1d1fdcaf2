"""Documents read directly from local files: rows in order across files and formats, and one line for bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data.corpus import split_hash
from pretrain.data.documents import FileDocuments
from pretrain.errors import PipelineError


def say(message: str) -> None:
    raise AssertionError(f"unexpected message: {message}")


def scanned(files, tmp_path, max_documents=None, **kwargs):
    documents = FileDocuments([str(f) for f in files], **kwargs)
    u, n_chars = documents.scan(tmp_path, num_proc=1, max_documents=max_documents, say=say)
    return documents, u, n_chars


@pytest.fixture
def mixed_files(tmp_path):
    """A text file, JSON lines with a blank line, CRLF endings and a row without text, a JSON array, and a parquet
    file of three row groups; and the texts they hold, in order."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = inputs / "a.py"
    text.write_text("def f():\n    return 'é'\n", encoding="utf-8")
    lines = inputs / "b.jsonl"
    lines.write_bytes(b'{"text": "one"}\r\n\n{"text": "two\\nlines", "id": 2}\n{"id": 3}\n{"text": "four \\u00e9"}')
    array = inputs / "c.json"
    array.write_text(json.dumps([{"text": "x"}, {"text": "yy"}]))
    parquet = inputs / "d.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(7)], "n": list(range(7))}), parquet, row_group_size=3)
    texts = ["def f():\n    return 'é'\n", "one", "two\nlines", "", "four é", "x", "yy"]
    texts += [f"row {i}" for i in range(7)]
    return [text, lines, array, parquet], texts


def test_every_format_is_read_row_by_row_in_file_order(mixed_files, tmp_path):
    files, texts = mixed_files
    documents, u, n_chars = scanned(files, tmp_path)
    assert len(documents) == len(texts) == 14
    assert n_chars.tolist() == [len(t) for t in texts]
    assert np.array_equal(u, [split_hash(t) for t in texts])  # a document's key is its text
    assert documents.texts(0, len(texts)) == texts
    for start, stop in [(0, 1), (1, 3), (2, 9), (4, 5), (7, 12), (10, 14), (13, 14)]:
        assert documents.texts(start, stop) == texts[start:stop], (start, stop)
    assert documents.texts_at(np.array([0, 2, 3, 9, 10, 13])) == [texts[i] for i in (0, 2, 3, 9, 10, 13)]


def test_a_resumed_build_reads_the_same_rows_without_scanning_again(mixed_files, tmp_path):
    files, texts = mixed_files
    documents, _, _ = scanned(files, tmp_path)
    again = FileDocuments([str(f) for f in files])
    again.restore(tmp_path, documents.split_state())
    assert again.texts(0, len(texts)) == texts
    # Pickled for a worker process: small, and without the JSON array it read last.
    documents.texts(5, 7)
    assert documents._array is not None
    copy = pickle.loads(pickle.dumps(documents))
    assert copy._array is None and copy.texts(5, 7) == ["x", "yy"]


def test_max_documents_cuts_the_rows_across_files(mixed_files, tmp_path):
    files, texts = mixed_files
    documents, u, _ = scanned(files, tmp_path, max_documents=6)
    assert len(documents) == len(u) == 6 and documents.files == [str(f) for f in files[:3]]
    assert documents.texts(0, 6) == texts[:6]


def test_stdlib_files_split_by_their_key_and_undecodable_ones_are_left_out(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("x = 1\n")
    bad.write_bytes(b"# -*- coding: latin-1 -*-\nname = '\xe9'\n")
    documents, u, _ = scanned(
        [good, bad], tmp_path, keys=["pkg/good.py", "pkg/bad.py"], skip_undecodable=True, quiet_skips=True
    )
    assert len(documents) == 1 and u.tolist() == [split_hash("pkg/good.py")]
    with pytest.raises(PipelineError, match=r"bad\.py is not UTF-8 text \(byte 34\); convert it to UTF-8"):
        scanned([good, bad], tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "a"}\n{"text": "b"\n', r"b\.jsonl line 2 is not valid JSON \(Expecting ',' delimiter\): "),
        (b'{"text": "a"}\n\n{"text": 7}\n', r"b\.jsonl line 3: field data\.text_field='text' holds int, not text"),
        (
            b'{"body": "a"}\n{"body": "b"}\n',
            r"b\.jsonl has no text field data\.text_field='text'; its fields are: body",
        ),
        (b'{"text": "a"}\n["a"]\n', r"b\.jsonl line 2 is a JSON list, not an object with a text field"),
    ],
    ids=["bad line", "number", "no text field", "not an object"],
)
def test_bad_json_lines_are_named_by_file_and_line(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        scanned([path], tmp_path)


def test_bad_parquet_files_are_named(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(
        PipelineError, match=r"t\.parquet has no text field data\.text_field='text'; its fields are: body"
    ):
        scanned([path], tmp_path)
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(PipelineError, match=r"t\.parquet: field data\.text_field='text' holds int64, not text"):
        scanned([path], tmp_path)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(PipelineError, match=r"could not read .*t\.parquet as parquet"):
        scanned([path], tmp_path)


def test_a_file_changed_after_the_split_pass_is_refused(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    documents, _, _ = scanned([path], tmp_path)
    path.write_text('{"text": "a"}\n\n\n\n\n\n\n\n\n{"text": "b"}\n{"text": "c"}\n')
    with pytest.raises(PipelineError, match=r"b\.jsonl changed while the corpus was prepared"):
        documents.texts(0, 2)
