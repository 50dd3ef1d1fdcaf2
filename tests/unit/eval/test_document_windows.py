"""Windows that respect documents (``eval.windows=documents``) and the boundary crossings of stream windows, on
synthetic token streams whose document boundaries are known; then through ``evaluate_model`` with a tiny model,
and the table and plot that show the new fields."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.config import EvalConfig, ModelConfig
from pretrain.errors import ConfigError
from pretrain.eval.perplexity import evaluate_model
from pretrain.eval.plots import plot_ppl_vs_length
from pretrain.eval.report import format_table
from pretrain.eval.split import EvalSplit
from pretrain.eval.windows import (
    WindowError,
    boundary_crossings,
    document_offsets,
    document_windows,
    make_windows,
    nonoverlapping_windows,
    qualifying_documents,
    sliding_windows,
)
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext, ParallelGroups

EOS = 2
SIZES = [5, 40, 17, 100, 33, 64, 1, 250, 9, 130]  # tokens per document, each ending in </s>


def synthetic_stream(sizes=SIZES, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, offsets)``: documents of ``sizes`` tokens, ids 3.. inside, each ended by EOS, concatenated."""
    rng = np.random.default_rng(seed)
    documents = [np.append(rng.integers(3, 50, size - 1), EOS) for size in sizes]
    return np.concatenate(documents), document_offsets(documents)


def document_of(offsets: np.ndarray, index: int) -> int:
    return int(np.searchsorted(offsets, index, side="right")) - 1


def test_offsets_come_from_the_documents_themselves():
    tokens, offsets = synthetic_stream()
    assert offsets[0] == 0 and offsets[-1] == len(tokens) and list(np.diff(offsets)) == SIZES
    # Every document ends with its EOS, and nothing else is an EOS.
    assert list(np.flatnonzero(tokens == EOS)) == list(offsets[1:] - 1)


@pytest.mark.parametrize("max_tokens", [None, 96, 1])
@pytest.mark.parametrize(
    "mode, length, stride",
    [("nonoverlapping", 4, None), ("nonoverlapping", 16, None), ("nonoverlapping", 64, None),
     ("nonoverlapping", 129, None), ("sliding", 16, 8), ("sliding", 32, 5), ("sliding", 64, 63), ("sliding", 8, 1)],
)  # fmt: skip
def test_document_windows_never_cross_an_eos(mode, length, stride, max_tokens):
    """Inputs and targets of every window lie in one document: no EOS among the inputs (the document's own EOS
    can only be the last target), so no prediction sees another document."""
    tokens, offsets = synthetic_stream()
    windows = document_windows(offsets, length, mode, stride, max_tokens)
    assert windows
    for w in windows:
        assert w.length == length
        span = tokens[w.start : w.start + length + 1]
        assert len(span) == length + 1
        assert EOS not in tokens[w.start : w.start + length], w
        assert document_of(offsets, w.start) == document_of(offsets, w.start + length), w
    # Each prediction is scored once, with context from its own document only.
    targets = Counter(t for w in windows for t in w.scored_targets)
    assert set(targets.values()) == {1}
    if mode == "sliding":
        assert all(w.n_scored == stride and w.score_from == length - stride for w in windows)


@pytest.mark.parametrize("length", [4, 16, 39, 40, 64, 129, 248, 249])
def test_nonoverlapping_inside_documents_scores_each_long_enough_document_from_its_start(length):
    tokens, offsets = synthetic_stream()
    windows = document_windows(offsets, length, "nonoverlapping")
    want = Counter()
    for start, size in zip(offsets[:-1], SIZES):
        if size >= length + 1:  # the window's L inputs and its last target, the EOS included
            n = (size - 1) // length
            want.update(range(start + 1, start + n * length + 1))
    assert Counter(t for w in windows for t in w.scored_targets) == want
    assert [w.start for w in windows] == sorted(w.start for w in windows)  # stream order
    assert all(w.score_from == 0 for w in windows)


def test_sliding_inside_documents_gives_every_prediction_its_own_documents_context():
    tokens, offsets = synthetic_stream()
    length, stride = 32, 8
    windows = document_windows(offsets, length, "sliding", stride)
    for w in windows:
        for t in w.scored_targets:
            assert w.context_of(t) >= length - stride + 1
            assert EOS not in tokens[w.start : t]  # the whole context belongs to the target's document
    # Per qualifying document: windows from its first token, moved by the stride while L + 1 tokens remain.
    starts = [int(s) for s, n in zip(offsets[:-1], SIZES) for s in range(s, s + n - length, stride)]
    assert [w.start for w in windows] == starts


@pytest.mark.parametrize(
    "length, documents, tokens",
    [(1, 9, 648), (4, 9, 648), (8, 8, 643), (9, 7, 634), (39, 5, 584), (40, 4, 544), (99, 3, 480), (129, 2, 380),
     (130, 1, 250), (249, 1, 250), (250, 0, 0), (10_000, 0, 0)],
)  # fmt: skip
def test_qualifying_documents_hold_length_plus_one_tokens(length, documents, tokens):
    _, offsets = synthetic_stream()
    assert qualifying_documents(offsets, length) == (documents, tokens)
    if documents:
        assert {document_of(offsets, w.start) for w in document_windows(offsets, length, "nonoverlapping")} == {
            d for d, size in enumerate(SIZES) if size >= length + 1
        }


def test_a_length_no_document_holds_raises_with_the_longest_document():
    _, offsets = synthetic_stream()
    with pytest.raises(WindowError, match=r"needs a document of 251 tokens .* the longest of the 10 validation"):
        document_windows(offsets, 250, "nonoverlapping")
    with pytest.raises(WindowError, match="holds 250"):
        make_windows("sliding", int(offsets[-1]), 300, 10, None, documents=offsets)
    # The stream itself would fit it: the stream windows exist.
    assert nonoverlapping_windows(int(offsets[-1]), 250)


def test_max_tokens_spreads_whole_windows_over_all_qualifying_documents():
    # Ten documents of 1,001 tokens: 62 windows of 16 each, 620 in all.
    _, offsets = synthetic_stream([1001] * 10)
    windows = document_windows(offsets, 16, "nonoverlapping", max_tokens=16 * 20)
    assert len(windows) == 20 and sum(w.n_scored for w in windows) == 320
    per_document = Counter(document_of(offsets, w.start) for w in windows)
    assert per_document == dict.fromkeys(range(10), 2)  # evenly, not the first documents' windows
    windows = document_windows(offsets, 16, "sliding", stride=4, max_tokens=40)
    assert len(windows) == 10 and len({document_of(offsets, w.start) for w in windows}) == 10
    # A cap below one window's predictions still scores one window.
    assert len(document_windows(offsets, 16, "nonoverlapping", max_tokens=1)) == 1
    # A long document gets windows in proportion to its length.
    _, offsets = synthetic_stream([101, 901])
    windows = document_windows(offsets, 10, "nonoverlapping", max_tokens=100)
    assert Counter(document_of(offsets, w.start) for w in windows) == {0: 1, 1: 9}


def test_stream_boundary_crossings_by_hand():
    # Documents [0, 10), [10, 20), [20, 30): windows of 8 at 0, 8, 16.
    offsets = np.array([0, 10, 20, 30])
    windows = nonoverlapping_windows(30, 8)
    assert [w.start for w in windows] == [0, 8, 16]
    # Window 0 (targets 1..8) stays in document 0; window 8 predicts 10..16 with document 0 in context (7), window
    # 16 predicts 20..24 with document 1 in context (5).
    assert boundary_crossings(windows, offsets) == (2, 12)
    # A window whose last target is its document's EOS does not cross; one whose first input is an EOS does.
    assert boundary_crossings(nonoverlapping_windows(30, 9)[:1], offsets) == (0, 0)
    assert boundary_crossings(sliding_windows(30, 6, 3)[3:4], offsets) == (1, 3)  # starts at 9: the EOS
    # Sliding: only the scored predictions count (window 8 scores 13..16, all past the boundary at 10).
    assert boundary_crossings([w for w in sliding_windows(30, 8, 4) if w.start == 8], offsets) == (1, 4)
    assert boundary_crossings([], offsets) == (0, 0)


@pytest.mark.parametrize("mode, length, stride", [("nonoverlapping", 16, None), ("sliding", 24, 7)])
def test_stream_boundary_crossings_match_a_brute_force_count(mode, length, stride):
    tokens, offsets = synthetic_stream(seed=3)
    windows = make_windows(mode, len(tokens), length, stride, None)
    crossing_windows = sum(EOS in tokens[w.start : w.start + length] for w in windows)
    crossing_tokens = sum(EOS in tokens[w.start : t] for w in windows for t in w.scored_targets)
    assert boundary_crossings(windows, offsets) == (crossing_windows, crossing_tokens)
    assert 0 < crossing_windows < len(windows)
    # Windows inside documents never cross.
    assert boundary_crossings(document_windows(offsets, length, mode, stride), offsets) == (0, 0)


def test_eval_windows_is_checked_on_composition():
    assert EvalConfig().windows == "stream"
    with pytest.raises(ConfigError, match=r"^eval.windows='doc' is not allowed; choose one of: stream, documents$"):
        EvalConfig(windows="doc")


# ---------------------------------------------------------------- through evaluate_model, the table and the plot


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, vocab_size=64)
    model = GPT(cfg)
    model.eval()
    return model, cfg


def run_model(tiny_model, windows: str, lengths, **eval_args):
    model, cfg = tiny_model
    tokens, offsets = synthetic_stream()
    ecfg = EvalConfig(windows=windows, passkey=False, batch_tokens=256, **eval_args)
    messages = []
    split = EvalSplit(ParallelGroups(dp_rank=0, dp_size=1))
    out = evaluate_model(model, cfg, tokens, ecfg, lengths, DistContext(), messages.append, split, documents=offsets)
    return out, messages


def report_of(windows: str, results, skipped, by_position, mode="nonoverlapping") -> dict:
    model = {"name": "m", "pos_encoding": "alibi", "train_seq_len": 8, "results": results, "skipped": skipped,
             "loss_by_position": by_position}  # fmt: skip
    return {"mode": mode, "windows": windows, "models": [model], "settings": {"window_control": True}}


@pytest.mark.parametrize("mode", ["nonoverlapping", "sliding"])
def test_documents_mode_reports_qualified_counts_and_skips_a_length_no_document_holds(tiny_model, tmp_path, mode):
    (results, skipped, by_position), messages = run_model(tiny_model, "documents", [8, 32, 128, 300], mode=mode)
    assert [r["length"] for r in results] == [8, 32, 128]
    for r in results:
        assert (r["qualified_documents"], r["qualified_tokens"]) == qualifying_documents(
            synthetic_stream()[1], r["length"]
        )
        assert 1 <= r["scored_documents"] <= r["qualified_documents"]
        assert np.isfinite(r["loss"]) and np.isfinite(r["windowed_loss"])
        assert "crossing_share" not in r
    assert results[2]["qualified_documents"] == 2 and results[2]["scored_documents"] == 2
    [skip] = skipped
    assert skip["length"] == 300 and (skip["qualified_documents"], skip["qualified_tokens"]) == (0, 0)
    assert "no validation document is long enough" in skip["reason"] and "holds 250" in skip["reason"]
    assert any("warning: length 300 skipped" in m and "eval.windows=stream" in m for m in messages)
    table = format_table(report_of("documents", results, skipped, by_position, mode))
    assert f"{mode} windows inside documents" in table
    assert "documents doc tokens" in table and "crossing" not in table
    assert "    300  skipped: no validation document is long enough" in table
    row = next(line for line in table.splitlines() if line.startswith("    128 "))
    assert row.endswith("        2        380")
    path = plot_ppl_vs_length(report_of("documents", results, skipped, by_position, mode), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stream_mode_reports_the_share_of_windows_crossing_a_boundary(tiny_model, tmp_path):
    (results, skipped, by_position), messages = run_model(tiny_model, "stream", [8, 32, 128], max_tokens=None)
    tokens, offsets = synthetic_stream()
    assert not skipped
    for r in results:
        windows = nonoverlapping_windows(len(tokens), r["length"])
        crossing_windows, crossing_tokens = boundary_crossings(windows, offsets)
        assert r["crossing_share"] == crossing_windows / len(windows)
        assert r["crossing_token_share"] == crossing_tokens / r["tokens"]
        assert "qualified_documents" not in r
    # Longer windows cross more often: every window of 128 does here.
    shares = [r["crossing_share"] for r in results]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert any("of them across a document boundary" in m for m in messages)
    table = format_table(report_of("stream", results, skipped, by_position))
    assert "nonoverlapping windows over the stream" in table and " crossing" in table
    assert next(line for line in table.splitlines() if line.startswith("    128 ")).endswith("    100%")
    assert plot_ppl_vs_length(report_of("stream", results, skipped, by_position), tmp_path / "p.png").exists()


def test_the_same_predictions_score_the_same_loss_inside_documents_and_over_the_stream(tiny_model):
    """A document window is an ordinary window: scored the same whichever way it was chosen."""
    model, cfg = tiny_model
    tokens, offsets = synthetic_stream()
    (results, _, _), _ = run_model(tiny_model, "documents", [16], max_tokens=None, window_control=False)
    windows = document_windows(offsets, 16, "nonoverlapping")
    ids = torch.from_numpy(np.stack([tokens[w.start : w.start + 17] for w in windows]).astype(np.int64))
    with torch.no_grad():
        want = model(ids[:, :-1], ids[:, 1:]).item()
    assert results[0]["tokens"] == 16 * len(windows) and results[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_documents_mode_without_offsets_is_refused(tiny_model):
    model, cfg = tiny_model
    tokens, _ = synthetic_stream()
    split = EvalSplit(ParallelGroups(dp_rank=0, dp_size=1))
    with pytest.raises(ValueError, match="eval.windows=documents needs the validation documents' offsets"):
        evaluate_model(model, cfg, tokens, EvalConfig(windows="documents"), [8], DistContext(), print, split)
