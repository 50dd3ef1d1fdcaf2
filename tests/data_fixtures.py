"""Helpers shared by the data tests (unit and end-to-end): small configs, corpora on disk, what a cache holds."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config import Config, DataConfig
from pretrain.data.corpus import stdlib_files, stdlib_root

# Small enough to prepare in about a second, large enough for a 512-piece vocabulary.
SMALL = {"max_files": 30, "vocab_size": 512, "num_proc": 1, "workers": 1, "tokenizer_sample_chars": 300_000}


def data_config(tmp_path: Path, **overrides) -> DataConfig:
    """A DataConfig for a small stdlib corpus cached under ``tmp_path/cache`` (overrides win)."""
    return DataConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **overrides})


def config(tmp_path: Path, **data_overrides) -> Config:
    return Config(data=data_config(tmp_path, **data_overrides), run_dir=str(tmp_path / "run"), stage="prepare")


def stdlib_texts(count: int, start: int = 0) -> dict[str, str]:
    """``count`` UTF-8 stdlib sources (relative path -> text), from position ``start`` of the sorted list."""
    root = stdlib_root()
    texts = {}
    for rel in stdlib_files()[start:]:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            texts[rel] = text
        if len(texts) == count:
            break
    return texts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def code_rows(count: int, start: int = 0, field: str = "text") -> list[dict]:
    """Rows ``{field: stdlib source, "path": ...}`` for jsonl/parquet corpora."""
    return [{field: text, "path": rel} for rel, text in stdlib_texts(count, start).items()]


def complete_corpora(cache_dir: Path) -> list[Path]:
    """Directories under ``cache_dir`` that look like a complete prepared corpus (they hold manifest.json)."""
    if not cache_dir.exists():
        return []
    return sorted(p.parent for p in cache_dir.glob("*/manifest.json"))


def leftovers(cache_dir: Path) -> list[Path]:
    """Build directories (kept for a resume) and temporary files left in ``cache_dir``."""
    if not cache_dir.exists():
        return []
    return sorted([*cache_dir.glob(".build-*"), *cache_dir.glob(".tmp-*")])


def corpus_files(directory: Path) -> dict[str, bytes]:
    """Every file of a prepared corpus that its manifest lists, plus the manifest's shard list: what two builds of
    the same inputs must agree on byte for byte."""
    import json

    from pretrain.data.manifest import listed_files

    manifest = json.loads((directory / "manifest.json").read_text())
    files = {name: (directory / name).read_bytes() for name in listed_files(manifest)}
    files["splits"] = json.dumps(manifest["splits"], sort_keys=True).encode()
    files["sources"] = json.dumps(manifest.get("sources"), sort_keys=True).encode()
    return files
