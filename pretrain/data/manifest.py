"""The manifest of a prepared corpus (``manifest.json``) and the checks of what it lists.

A prepared corpus is a folder of shards; ``manifest.json`` (written last, atomically) lists every shard of every
split (path, tokens, documents, SHA-256), the split totals, the token dtype, the vocabulary size and special ids,
the tokenizer's SHA-256 and the format version; a mixture lists each source's splits. Nothing else in the folder
is trusted: ``verify`` checks every listed file against its SHA-256 (remembering, in ``.verified.json``, the files
it has checked by their identity, so that a reuse costs a ``stat`` per file), and the tokenizer against the
vocabulary size, before a corpus is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pretrain.errors import PipelineError
from pretrain.run_files import file_sha256, write_atomic

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
VERIFIED_FILE = ".verified.json"
SPLITS = ("train", "val")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when there is none or it is not this format (not complete)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return None
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())


def split_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every split entry of the manifest: the corpus's own and, for a mixture, each source's."""
    entries = [manifest["splits"][split] for split in SPLITS if manifest["splits"].get(split)]
    for source in manifest.get("sources", ()):
        entries += [source["splits"][split] for split in SPLITS]
    return entries


def listed_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Relative path -> SHA-256 of every file the manifest vouches for (shards, their offsets, the tokenizer)."""
    files = {manifest["tokenizer"]["file"]: manifest["tokenizer"]["sha256"]}
    for entry in split_entries(manifest):
        for shard in entry["shards"]:
            files[shard["path"]] = shard["sha256"]
            files[shard["docs"]] = shard["docs_sha256"]
    return files


def split_digest(entry: dict[str, Any]) -> str:
    """The identity of a split: a SHA-256 over its shards' SHA-256s in order (what a resume compares)."""
    digest = hashlib.sha256()
    for shard in entry["shards"]:
        digest.update(f"{shard['sha256']}:{shard['tokens']};".encode())
    return digest.hexdigest()


def _identity(path: Path) -> list[int]:
    # ctime changes with every write and cannot be set back by a user, unlike mtime.
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verify(directory: Path, manifest: dict[str, Any], say=None) -> None:
    """Check every file the manifest lists against its SHA-256; a PipelineError naming the first that differs.

    Files already verified with the same identity (size, mtime, ctime, inode) are not read again."""
    verified_path = directory / VERIFIED_FILE
    try:
        verified = json.loads(verified_path.read_text())
    except (OSError, ValueError):
        verified = {}
    files = listed_files(manifest)
    fresh: dict[str, Any] = {}
    to_hash = []
    for relative, sha in sorted(files.items()):
        path = directory / relative
        if not path.is_file():
            raise PipelineError(
                f"the prepared corpus {directory} is damaged: {relative}, listed in its manifest, is missing; "
                f"delete {directory} to prepare it again"
            )
        identity = _identity(path)
        if verified.get(relative) == [*identity, sha]:
            fresh[relative] = verified[relative]
        else:
            to_hash.append((relative, sha, path, identity))
    if to_hash and say is not None:
        size = sum(identity[0] for _, _, _, identity in to_hash)
        say(f"verifying {len(to_hash)} files ({size / 1e6:,.1f} MB) of {directory.name} against its manifest")
    for relative, sha, path, identity in to_hash:
        if file_sha256(path) != sha:
            raise PipelineError(
                f"the prepared corpus {directory} is damaged: {relative} does not match the SHA-256 its manifest "
                f"records; delete {directory} to prepare it again"
            )
        fresh[relative] = [*identity, sha]
    if to_hash:
        try:
            write_atomic(verified_path, json.dumps(fresh, sort_keys=True).encode())
        except OSError:
            pass  # a read-only cache is verified again next time


def record_verified(directory: Path, manifest: dict[str, Any]) -> None:
    """Remember every listed file as verified (the caller has just written and hashed them)."""
    files = listed_files(manifest)
    record = {relative: [*_identity(directory / relative), sha] for relative, sha in sorted(files.items())}
    write_atomic(directory / VERIFIED_FILE, json.dumps(record, sort_keys=True).encode())


def check_vocabulary(directory: Path, manifest: dict[str, Any], piece_size: int) -> None:
    """The manifest's vocabulary size and largest id must fit the tokenizer's; one line naming the file if not."""
    if manifest["vocab_size"] != piece_size:
        raise PipelineError(
            f"{directory / MANIFEST_FILE} says vocab_size={manifest['vocab_size']}, but its tokenizer "
            f"{manifest['tokenizer']['file']} has {piece_size} pieces; delete {directory} to prepare it again"
        )
    for entry in split_entries(manifest):
        for shard in entry["shards"]:
            if shard["max_id"] >= piece_size:
                raise PipelineError(
                    f"{directory / shard['path']} holds token id {shard['max_id']}, outside the tokenizer's "
                    f"{piece_size} pieces; delete {directory} to prepare it again"
                )


def relative(path: Path, directory: Path) -> str:
    return os.path.relpath(path, directory).replace(os.sep, "/")
