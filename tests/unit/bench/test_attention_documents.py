"""The document-mask row of ``bench attention``: windows of the packed train stream, ids from the shards' offsets."""

from __future__ import annotations

import numpy as np

from pretrain.bench.attention import packed_document_ids, target_checks


def test_windows_take_their_documents_from_the_shards_offsets(tmp_path):
    (tmp_path / "train").mkdir()
    np.save(tmp_path / "train" / "shard-0.docs.npy", np.array([0, 5, 105, 106]))  # documents of 5, 100, 1 tokens
    np.save(tmp_path / "train" / "shard-1.docs.npy", np.array([0, 50, 300]))  # then 50 and 250
    ids = packed_document_ids(str(tmp_path), batch=3, length=64, seed=1)
    assert ids.shape == (3, 64) and ids.dtype.is_floating_point is False
    assert (ids[:, 0] == 0).all() and (ids.diff(dim=1) >= 0).all() and (ids.diff(dim=1) <= 1).all()
    lengths = np.array([5, 100, 1, 50, 250])
    for row in ids:  # inner documents have their real lengths
        counts = np.bincount(row.numpy())
        assert all(c in lengths for c in counts[1:-1])


def test_masks_must_not_cost_more_than_none():
    rows = [
        {"backend": "fused", "length": 2048, "status": "ok", "time_ms": 100.0, "peak_extra_mib": 1.0},
        {"backend": "fused_documents", "length": 2048, "status": "ok", "time_ms": 90.0, "peak_extra_mib": 1.0,
         "documents_per_window": 2.5},
    ]  # fmt: skip
    check = [c for c in target_checks(rows) if "document masks" in c["name"]]
    assert check[0]["status"] == "PASS" and "2.5 documents a window" in check[0]["detail"]
