"""The prepare stage: corpora of every source, packed shards, the cache, and clear errors on bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fixtures import (
    code_rows,
    complete_corpora,
    config,
    corpus_files,
    data_config,
    leftovers,
    stdlib_texts,
    write_jsonl,
    write_parquet,
)

import pretrain.data.prepare as prepare
from pretrain.data.corpus import split_hash, stdlib_files
from pretrain.data.prepare import PreparedCorpus, load_prepared, prepare_corpus, run_prepare
from pretrain.data.tokenizer import EOS_ID, load_tokenizer
from pretrain.errors import PipelineError
from pretrain.parallel.distributed import DistContext

CTX = DistContext()


def decoded_documents(corpus: PreparedCorpus, split: str) -> list[str]:
    """A shard cut at its EOS tokens and decoded: the documents it holds, in order."""
    sp = load_tokenizer(corpus.tokenizer_path)
    tokens = np.asarray(corpus.tokens(split))
    assert len(tokens) and tokens[-1] == EOS_ID
    ends = np.flatnonzero(tokens == EOS_ID)
    return [
        sp.decode(tokens[a + 1 if i else 0 : b].tolist())
        for i, (a, b) in enumerate(zip([-1, *ends[:-1]], ends, strict=True))
    ]


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stdlib")
    cfg = config(tmp)
    return run_prepare(cfg, CTX), cfg


def test_stdlib_shards_hold_every_document_and_one_eos_each(stdlib_corpus):
    corpus, cfg = stdlib_corpus
    sp = load_tokenizer(corpus.tokenizer_path)
    texts = stdlib_texts(10**6)  # every non-empty UTF-8 stdlib file, by relative path
    keys = [k for k in stdlib_files()[: cfg.data.max_files] if k in texts]
    meta = corpus.metadata
    expected_tokens = sum(len(sp.encode(texts[k])) + 1 for k in keys)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == expected_tokens
    assert len(corpus.tokens("train")) + len(corpus.tokens("val")) == expected_tokens
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(keys)
    # The split follows the hash of each file's relative path.
    val_keys = [k for k in keys if split_hash(k) < cfg.data.val_fraction]
    if val_keys:  # (a tiny corpus where none hashes low enough gets its lowest-hash file instead)
        assert decoded_documents(corpus, "val") == [texts[k] for k in val_keys]
    assert sorted(decoded_documents(corpus, "train") + decoded_documents(corpus, "val")) == sorted(
        texts[k] for k in keys
    )
    assert meta["dtype"] == "uint16" and corpus.dtype == "uint16"
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert meta["vocab_size"] == corpus.vocab_size == 512


def test_val_boundaries_and_run_dir_tokenizer(stdlib_corpus):
    corpus, cfg = stdlib_corpus
    offsets = corpus.val.document_offsets()
    assert offsets[0] == 0 and offsets[-1] == len(corpus.tokens("val"))
    assert len(offsets) == corpus.metadata["splits"]["val"]["documents"] + 1
    docs = list(corpus.val_documents())
    assert all(doc[-1] == EOS_ID and EOS_ID not in doc[:-1] for doc in docs)
    installed = os.path.join(cfg.run_dir, "tokenizer", "spm.model")
    assert open(installed, "rb").read() == corpus.tokenizer_path.read_bytes()
    assert load_prepared(cfg).directory == corpus.directory


def test_cache_is_reused_without_tokenizing(stdlib_corpus, monkeypatch, capsys):
    corpus, cfg = stdlib_corpus
    mtimes = {p.name: p.stat().st_mtime_ns for p in corpus.directory.iterdir()}

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(prepare, "_build", no_build)
    again = run_prepare(cfg, CTX)
    assert again.directory == corpus.directory and again.metadata == corpus.metadata
    assert {p.name: p.stat().st_mtime_ns for p in corpus.directory.iterdir()} == mtimes
    assert f"reusing the prepared corpus at {corpus.directory}" in capsys.readouterr().out


def test_prepare_is_reproducible(stdlib_corpus, tmp_path):
    corpus, cfg = stdlib_corpus
    again = prepare_corpus(data_config(tmp_path))  # same inputs, another cache directory and process id
    assert again.directory.name == corpus.directory.name
    assert corpus_files(again.directory) == corpus_files(corpus.directory)


def test_units_are_cut_by_the_inputs_and_join_to_the_same_stream(stdlib_corpus, tmp_path):
    corpus, _ = stdlib_corpus
    small_units = prepare_corpus(data_config(tmp_path, unit_bytes=40_000))
    assert small_units.directory.name == corpus.directory.name  # unit_bytes is not part of the fingerprint
    assert small_units.manifest["units"] > 5 and len(small_units.manifest["splits"]["train"]["shards"]) > 5
    for split in ("train", "val"):
        assert np.array_equal(small_units.tokens(split)[:], corpus.tokens(split)[:]), split
        assert np.array_equal(small_units.tokens(split).document_offsets(), corpus.tokens(split).document_offsets())
    assert small_units.split_digest("train") != corpus.split_digest("train")  # other shards: another split identity


def test_changed_vocab_size_or_file_prepares_again(tmp_path):
    corpus_file = write_jsonl(tmp_path / "corpus" / "a.jsonl", code_rows(12))
    first = prepare_corpus(data_config(tmp_path, source="files", paths=[str(corpus_file)]))
    other_vocab = prepare_corpus(data_config(tmp_path, source="files", paths=[str(corpus_file)], vocab_size=600))
    assert other_vocab.directory != first.directory and other_vocab.vocab_size == 600
    write_jsonl(corpus_file, code_rows(12, start=1))  # one document fewer at the front, one more at the end
    changed = prepare_corpus(data_config(tmp_path, source="files", paths=[str(corpus_file)]))
    assert changed.directory not in (first.directory, other_vocab.directory)
    assert changed.metadata["splits"] != first.metadata["splits"]
    assert len(complete_corpora(tmp_path / "cache")) == 3


def test_jsonl_txt_and_parquet_through_files(tmp_path):
    rows = code_rows(16)
    write_jsonl(tmp_path / "in" / "a.jsonl", rows[:6])
    write_jsonl(tmp_path / "in" / "b.jsonl", rows[6:10] + [{"text": "", "path": "empty"}])
    (tmp_path / "in" / "c.txt").write_text(rows[10]["text"])
    write_parquet(tmp_path / "pq" / "d.parquet", [{"content": r["text"], "n": i} for i, r in enumerate(rows[11:])])
    cfg = data_config(tmp_path, source="files", paths=[str(tmp_path / "in" / "*")])
    corpus = prepare_corpus(cfg)
    texts = [r["text"] for r in rows[:11]]
    got = decoded_documents(corpus, "train") + decoded_documents(corpus, "val")
    assert sorted(got) == sorted(texts)
    assert corpus.metadata["documents_dropped_empty"] == 1
    parquet = prepare_corpus(
        data_config(tmp_path, source="files", paths=[str(tmp_path / "pq" / "*.parquet")], text_field="content")
    )
    got = decoded_documents(parquet, "train") + decoded_documents(parquet, "val")
    assert sorted(got) == sorted(r["text"] for r in rows[11:])


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_path_with_a_local_loader(tmp_path, monkeypatch, streaming):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = code_rows(40)
    write_jsonl(tmp_path / "hub" / "part-0.jsonl", rows[:20])
    write_jsonl(tmp_path / "hub" / "part-1.jsonl", rows[20:])
    cfg = data_config(
        tmp_path,
        source="hf",
        name="json",
        data_files=[str(tmp_path / "hub" / "*.jsonl")],
        streaming=streaming,
        max_documents=30,
        val_fraction=0.2,
    )
    unused = prepare._RowsPart if streaming else prepare._StreamPart

    def wrong_path(*args, **kwargs):
        raise AssertionError(f"streaming={streaming} took the other path")

    monkeypatch.setattr(prepare, unused.__name__, wrong_path)
    corpus = prepare_corpus(cfg)
    got = decoded_documents(corpus, "train") + decoded_documents(corpus, "val")
    assert sorted(got) == sorted(r["text"] for r in rows[:30])
    val = [r["text"] for r in rows[:30] if split_hash(r["text"]) < 0.2]
    assert decoded_documents(corpus, "val") == val


def test_hf_path_with_a_saved_dataset_directory(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = code_rows(12)
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(saved))
    corpus = prepare_corpus(data_config(tmp_path, source="hf", name=str(saved), split="train"))
    assert corpus.metadata["splits"]["train"]["documents"] + corpus.metadata["splits"]["val"]["documents"] == 12
    with pytest.raises(PipelineError, match="no split data.split='test'; it has: train"):
        prepare_corpus(data_config(tmp_path, source="hf", name=str(saved), split="test"))


def test_given_tokenizer_is_used_as_is(stdlib_corpus, tmp_path):
    corpus, _ = stdlib_corpus
    rows = code_rows(8)
    write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = data_config(tmp_path, source="files", paths=[str(tmp_path / "a.jsonl")], tokenizer=str(corpus.tokenizer_path))
    other = prepare_corpus(cfg)
    assert other.tokenizer_path.read_bytes() == corpus.tokenizer_path.read_bytes()
    assert other.vocab_size == corpus.vocab_size and other.metadata["tokenizer"]["trained"] is False


def stopped_at_the_fourth_unit(monkeypatch, cfg) -> None:
    """A prepare of ``cfg`` stopped (KeyboardInterrupt) as its fourth unit starts: three units are done."""
    from pretrain.data.units import UnitJob

    real_run_unit = UnitJob.run_unit
    calls = []

    def stopped(self, unit):
        calls.append(unit.number)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run_unit(self, unit)

    with monkeypatch.context() as patch:
        patch.setattr(UnitJob, "run_unit", stopped)
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(cfg)


def test_a_stopped_prepare_keeps_its_finished_units_and_resumes_to_the_same_bytes(tmp_path, monkeypatch, capsys):
    reference = prepare_corpus(data_config(tmp_path / "reference", unit_bytes=40_000))
    cfg = data_config(tmp_path, unit_bytes=40_000)
    stopped_at_the_fourth_unit(monkeypatch, cfg)
    assert complete_corpora(tmp_path / "cache") == [] and len(leftovers(tmp_path / "cache")) == 1
    resumed = prepare_corpus(cfg)
    out = capsys.readouterr().out
    assert "keeping the tokenizer a stopped prepare of this corpus trained" in out
    assert f"3 of {reference.manifest['units']} units already done" in out
    assert corpus_files(resumed.directory) == corpus_files(reference.directory)
    assert leftovers(tmp_path / "cache") == []


def test_a_killed_build_directory_is_never_taken_as_complete(tmp_path):
    cfg = data_config(tmp_path)
    corpus = prepare_corpus(cfg)
    (corpus.directory / "manifest.json").unlink()  # a folder that is not a complete corpus
    assert PreparedCorpus.open(corpus.directory) is None
    with pytest.raises(PipelineError, match="run `pretrain stage=prepare`"):
        load_prepared(cfg)
    assert prepare_corpus(cfg).directory == corpus.directory
    moved = list(corpus.directory.parent.glob(f"{corpus.directory.name}.incomplete-*"))
    assert len(moved) == 1 and (moved[0] / "spm.model").is_file()  # moved aside, never deleted


def bad_inputs(tmp_path):
    write_jsonl(tmp_path / "notext.jsonl", [{"body": "x = 1\n"}, {"body": "y = 2\n"}])
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    (tmp_path / "not-a-model").write_text("hello")
    return {
        "glob matches nothing": (
            {"source": "files", "paths": [str(tmp_path / "nothing" / "*.jsonl")]},
            r"data\.paths: '.*nothing/\*\.jsonl' matches no file",
        ),
        "empty corpus": (
            {"source": "files", "paths": [str(tmp_path / "empty.jsonl")]},
            r"is empty: it has no document with any text",
        ),
        "jsonl without the text field": (
            {"source": "files", "paths": [str(tmp_path / "notext.jsonl")]},
            r"has no text field data\.text_field='text'; its fields are: body",
        ),
        "vocabulary too large": (
            {"max_files": 3, "vocab_size": 40000},
            r"data\.vocab_size=40000 is too large for this corpus.*Set data\.vocab_size=\d+ or lower",
        ),
        "tokenizer is not a model": (
            {"tokenizer": str(tmp_path / "not-a-model")},
            r"data\.tokenizer=.*not-a-model' is not a sentencepiece model",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "glob matches nothing",
        "empty corpus",
        "jsonl without the text field",
        "vocabulary too large",
        "tokenizer is not a model",
    ],
)
def test_bad_input_gives_a_clear_error_and_no_cache(tmp_path, case):
    overrides, message = bad_inputs(tmp_path)[case]
    with pytest.raises(PipelineError, match=message):
        run_prepare(config(tmp_path, **overrides), CTX)
    assert complete_corpora(tmp_path / "cache") == [] and leftovers(tmp_path / "cache") == []
    assert not (tmp_path / "run" / "tokenizer").exists()


@pytest.mark.parametrize(
    "overrides, source",
    [
        ([], "stdlib"),
        (["data=files", "data.paths=[corpus/*.jsonl]", "data.text_field=content"], "files"),
        (["data=hf", "data.name=json", "data.data_files=[a.jsonl]", "data.streaming=true"], "hf"),
    ],
)
def test_data_configs_compose(overrides, source):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pretrain.__main__ import CONF_DIR
    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    assert cfg.data.source == source


@pytest.mark.parametrize(
    "values, message",
    [
        ({"source": "files"}, r"data=files needs data\.paths"),
        ({"source": "hf"}, r"data=hf needs data\.name"),
        ({"data_files": ["a.jsonl"]}, r"data\.data_files is for data=hf"),
        ({"max_files": 0}, r"data\.max_files=0 is not allowed"),
        ({"vocab_size": 100}, r"data\.vocab_size=100 is not allowed"),
    ],
)
def test_data_config_checks_name_the_key(values, message):
    from pretrain.config import DataConfig
    from pretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        DataConfig(**values)


def test_a_stream_is_cut_into_its_own_shards(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = code_rows(40)
    for part in range(3):
        write_jsonl(tmp_path / "hub" / f"part-{part}.jsonl", rows[part * 13 : (part + 1) * 13 + (part == 2)])
    files = [str(tmp_path / "hub" / "*.jsonl")]
    stream = prepare_corpus(
        data_config(tmp_path, source="hf", name="json", data_files=files, streaming=True, val_fraction=0.2)
    )
    assert stream.manifest["units"] == 3  # one unit per file of the stream, whatever the workers
    rows_corpus = prepare_corpus(
        data_config(tmp_path, source="hf", name="json", data_files=files, streaming=False, val_fraction=0.2)
    )
    for split in ("train", "val"):
        assert decoded_documents(stream, split) == decoded_documents(rows_corpus, split), split


def test_a_stopped_build_resumed_with_another_unit_size_rebuilds_the_other_cut(tmp_path, monkeypatch):
    reference = prepare_corpus(data_config(tmp_path / "reference", unit_bytes=60_000))
    stopped_at_the_fourth_unit(monkeypatch, data_config(tmp_path, unit_bytes=25_000))  # 3 units of another cut
    resumed = prepare_corpus(data_config(tmp_path, unit_bytes=60_000))
    assert corpus_files(resumed.directory) == corpus_files(reference.directory)
    shards = {p.relative_to(resumed.directory).as_posix() for p in resumed.directory.rglob("*.bin")}
    assert shards == {s["path"] for split in ("train", "val") for s in resumed.manifest["splits"][split]["shards"]}
