"""Scoring windows: the cross-entropy of every prediction, summed per length and by position in the window.

Nothing L x L is built: attention is the fused kernel, logits are formed one chunk at a time from the final hidden
states by the training loss's own chunked cross-entropy (``ops.loss.token_cross_entropy``: a chunk is sized in bytes
for the device), and each length runs ``eval.batch_tokens // L`` windows per forward pass.
Sums are float64 and all-reduced, so the numbers do not depend on the number of ranks. With
``eval.window_control`` every length is also scored with attention limited to the training length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import EvalConfig, ModelConfig
from pretrain.eval.split import EvalSplit
from pretrain.eval.windows import (
    Window,
    WindowError,
    boundary_crossings,
    default_stride,
    make_windows,
    qualifying_documents,
    shared_region,
)
from pretrain.model.gpt import GPT
from pretrain.model.positions import max_length
from pretrain.ops.loss import perplexity, token_cross_entropy
from pretrain.parallel.distributed import DistContext, all_reduce
from pretrain.parallel.layout import SequenceLayout, sequence_parts
from pretrain.perf.memory import MIB, peak_memory_meter, reset_rss_high_water_mark


def token_losses(
    model: GPT,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of every prediction, float32 ``[B, L]``, from int64 ``inputs``/``targets`` ``[B, L]``.

    ``positions`` ``[L]``: the global positions of a sequence-parallel shard (the installed attention then
    sees the rest of the window through its group); ``window``: each query sees only its last W keys. The
    logits exist one chunk at a time (``token_cross_entropy``, the training loss's chunks): a ``[B * L, vocab]``
    tensor would dominate memory at long lengths.
    """
    hidden = model.hidden_states(inputs, positions=positions, window=window)
    return token_cross_entropy(hidden, model.word_embeddings.weight, targets)


# The two-sided 95% quantile of the normal distribution: the interval on ppl is exp(loss +- Z95 * loss_stderr).
Z95 = 1.959963984540054


@dataclass
class Scores:
    """Sums over the scored predictions of a set of windows of one length, in float64 (so a sum over ranks is
    the one-rank sum up to rounding). With ``n_windows`` also the sums of each window (by its index in the length's
    list of windows), from which the standard error of the mean loss comes."""

    length: int
    loss_sum: float = 0.0
    tokens: int = 0
    position_loss: np.ndarray = field(default=None)  # [length] loss summed by position in the window
    position_tokens: np.ndarray = field(default=None)  # [length] predictions scored at each position
    n_windows: int = 0
    window_loss: np.ndarray = field(default=None)  # [n_windows] loss summed over each window's scored predictions
    window_tokens: np.ndarray = field(default=None)  # [n_windows] predictions scored in each window

    def __post_init__(self) -> None:
        if self.position_loss is None:
            self.position_loss = np.zeros(self.length, dtype=np.float64)
        if self.position_tokens is None:
            self.position_tokens = np.zeros(self.length, dtype=np.int64)
        if self.window_loss is None:
            self.window_loss = np.zeros(self.n_windows, dtype=np.float64)
        if self.window_tokens is None:
            self.window_tokens = np.zeros(self.n_windows, dtype=np.float64)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def loss_stderr(self) -> float | None:
        """Standard error of the mean loss over the windows (None with fewer than two windows)."""
        return ratio_stderr(self.window_loss, self.window_tokens)

    def all_reduce(self, ctx: DistContext) -> Scores:
        if ctx.world_size > 1:
            packed = np.concatenate(
                [[self.loss_sum, self.tokens], self.position_loss, self.position_tokens, self.window_loss,
                 self.window_tokens]
            )  # fmt: skip
            values = all_reduce(torch.from_numpy(packed).to(torch.float64), ctx).numpy()
            self.loss_sum, self.tokens = float(values[0]), int(round(values[1]))
            at = 2 + 2 * self.length
            self.position_loss = values[2 : 2 + self.length].copy()
            self.position_tokens = np.rint(values[2 + self.length : at]).astype(np.int64)
            self.window_loss = values[at : at + self.n_windows].copy()
            self.window_tokens = np.rint(values[at + self.n_windows :])
        return self


def ratio_stderr(sums: np.ndarray, counts: np.ndarray) -> float | None:
    """Standard error of ``sum(sums) / sum(counts)``, the token-weighted mean loss, over independent windows with
    loss sums ``sums`` and prediction counts ``counts`` (the ratio estimator's: windows of equal counts give the
    standard error of the windows' mean losses). None with fewer than two windows.

    Windows are taken as independent draws: neighbouring windows of one long document are correlated, so this is
    a lower bound on the noise of choosing other regions of the same distribution.
    """
    used = counts > 0
    n = int(used.sum())
    if n < 2:
        return None
    sums, counts = sums[used], counts[used]
    mean = sums.sum() / counts.sum()
    residuals = sums - mean * counts
    return float(math.sqrt(n / (n - 1) * float((residuals**2).sum())) / counts.sum())


def ppl_interval(loss: float, stderr: float | None) -> list[float] | None:
    """The 95% interval on perplexity, ``[exp(loss - 1.96 se), exp(loss + 1.96 se)]`` (None without a stderr)."""
    if stderr is None:
        return None
    return [perplexity(loss - Z95 * stderr), perplexity(loss + Z95 * stderr)]


def paired_difference(a: Scores, b: Scores) -> dict | None:
    """How model B's mean loss differs from model A's on the same windows: ``loss_diff`` (B - A), its standard error
    over the windows (paired: each window's difference), and ``differs``, whether the difference is beyond the 95%
    noise band. None when the two were not scored on the same windows."""
    if a.n_windows != b.n_windows or a.n_windows == 0 or not np.array_equal(a.window_tokens, b.window_tokens):
        return None
    diff = b.loss - a.loss
    stderr = ratio_stderr(b.window_loss - a.window_loss, a.window_tokens)
    return {
        "loss_diff": diff,
        "diff_stderr": stderr,
        "differs": None if stderr is None else bool(abs(diff) > Z95 * stderr),
    }


def score_windows(
    tokens: np.ndarray,
    windows: list[Window],
    losses_fn,
    batch_size: int,
    device="cpu",
    layout: SequenceLayout | None = None,
    indices: list[int] | None = None,
    n_windows: int | None = None,
) -> Scores:
    """Sum the scored predictions of ``windows`` over the token stream ``tokens`` ``[n]``.

    ``losses_fn(inputs, targets)`` maps int64 ``[B, L]`` to per-prediction losses ``[B, L]``; windows run
    ``batch_size`` at a time. Only positions ``window.score_from ..`` count. With a sequence-parallel
    ``layout``, ``losses_fn(inputs, targets, positions)`` gets this rank's shard of each window and only its
    predictions are summed (each at its position in the window): the group's sums add up to the whole windows'.
    ``indices``: each window's index among the ``n_windows`` of its length (default: their order here), under which
    its own sums are kept.
    """
    assert windows, "no windows to score"
    length = windows[0].length
    indices = list(range(len(windows))) if indices is None else indices
    scores = Scores(length, n_windows=len(windows) if n_windows is None else n_windows)
    positions = np.arange(length) if layout is None else layout.positions().numpy()
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        assert all(w.length == length for w in batch)
        rows = np.stack([np.asarray(tokens[w.start : w.start + length + 1], dtype=np.int64) for w in batch])
        ids = torch.from_numpy(rows)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        if layout is None:
            losses = losses_fn(inputs.to(device), targets.to(device))
        else:
            shard_positions = layout.positions(device)
            losses = losses_fn(layout.shard(inputs).to(device), layout.shard(targets).to(device), shard_positions)
        for w, index, row in zip(batch, indices[first : first + batch_size], losses.double().cpu().numpy()):
            scored = positions >= w.score_from
            scores.loss_sum += float(row[scored].sum())
            scores.tokens += int(scored.sum())
            scores.window_loss[index] += float(row[scored].sum())
            scores.window_tokens[index] += int(scored.sum())
            # Positions are distinct within a row, so this fancy-indexed add counts each once.
            scores.position_loss[positions[scored]] += row[scored]
            scores.position_tokens[positions[scored]] += 1
    return scores


def position_bins(length: int) -> list[tuple[int, int]]:
    """Half-octave bins ``[start, end)`` of window positions 0 .. length - 1 (1, 1, 2, 3, 4, 6, 8, 11, ...)."""
    edges = {0, length}
    k = 0
    while (edge := round(2 ** (k / 2))) < length:
        edges.add(edge)
        k += 1
    ordered = sorted(edges)
    return list(zip(ordered[:-1], ordered[1:]))


def binned_positions(scores: Scores) -> list[dict]:
    """Loss by position in the window, in half-octave bins (only bins with scored predictions)."""
    out = []
    for start, end in position_bins(scores.length):
        n = int(scores.position_tokens[start:end].sum())
        if n:
            out.append(
                {"start": start, "end": end, "loss": float(scores.position_loss[start:end].sum() / n), "tokens": n}
            )
    return out


def score_length(
    model: GPT,
    tokens,
    windows,
    length: int,
    batch_size: int,
    window: int | None,
    ctx,
    layout=None,
    indices: list[int] | None = None,
    n_windows: int | None = None,
) -> Scores:
    """This rank's windows of one length scored (attention limited to ``window`` keys when set), summed over ranks.

    Under sequence parallelism (``layout``) this rank scores its shard of each window; the sum over all ranks
    is still each window scored once. ``indices``: the windows' indices among the ``n_windows`` of the length.
    """
    device = next(model.parameters()).device

    def losses_fn(inputs, targets, positions=None):
        return token_losses(model, inputs, targets, positions, window)

    with torch.inference_mode():
        if windows:
            local = score_windows(tokens, windows, losses_fn, batch_size, device, layout, indices, n_windows)
        else:
            local = Scores(length, n_windows=n_windows or 0)
    return local.all_reduce(ctx)


def evaluate_model(
    model: GPT,
    model_cfg: ModelConfig,
    tokens: np.ndarray,
    ecfg: EvalConfig,
    lengths,
    ctx,
    say,
    split: EvalSplit,
    documents: np.ndarray | None = None,
    scores_out: dict | None = None,
):
    """Score one model at every length: ``(results, skipped, loss_by_position)`` as results.json holds them.

    Each result carries ``loss_stderr`` (the standard error of the mean loss over its windows) and ``ppl_ci95``
    (the 95% interval on ppl). ``scores_out``, when given, receives each length's full-context ``Scores`` (with
    the per-window sums that ``paired_difference`` compares models on).

    ``documents``: the validation documents' offsets in ``tokens`` (``windows.document_offsets``). Needed for
    ``eval.windows=documents`` (windows inside one document; each length reports the documents and tokens long
    enough for it, and a length no document fits is skipped); with ``stream`` windows it adds the share of
    windows (and of scored predictions) that cross a document boundary.
    """
    results, skipped, by_position = [], [], []
    inside = getattr(ecfg, "windows", "stream") == "documents"
    if inside and documents is None:
        raise ValueError("eval.windows=documents needs the validation documents' offsets: pass documents=...")
    limit = max_length(model_cfg)
    _warm_up(model, split, limit)
    # Under eval.max_tokens, regions of the longest length: every length scores the same tokens (stream windows).
    region = None if inside else shared_region(lengths, len(tokens))
    for length in lengths:
        if limit is not None and length > limit:
            reason = (
                f"model.pos_encoding=learned has {limit} position rows (model.max_positions); it cannot read "
                f"{length} tokens"
            )
            skipped.append({"length": length, "reason": reason})
            say(f"  length {length:>6}: skipped: {reason}")
            continue
        stride = (ecfg.stride or default_stride(length)) if ecfg.mode == "sliding" else None
        qualified = qualifying_documents(documents, length) if inside else None
        try:
            windows = make_windows(
                ecfg.mode, len(tokens), length, stride, ecfg.max_tokens, region, documents if inside else None
            )
        except WindowError as err:
            if inside:
                reason = f"no validation document is long enough: {err}"
                hint = "eval.windows=stream scores it across documents, or lower eval.lengths"
                skipped.append({"length": length, "reason": reason, "qualified_documents": 0, "qualified_tokens": 0})
            else:
                reason = f"the validation split is too short: {err}"
                hint = "raise data.val_fraction or lower eval.lengths"
                skipped.append({"length": length, "reason": reason})
            say(f"  warning: length {length} skipped: {reason} ({hint})")
            continue
        batch_size = split.batch_size(ecfg.batch_tokens, length)
        mine = split.windows(windows)
        indices = split.windows(list(range(len(windows))))
        started = time.perf_counter()
        meter = _memory_meter(model)
        with split.layout(model, length) as layout:
            full, windowed = _score_both(
                model, model_cfg, tokens, mine, length, batch_size, ecfg, ctx, layout, indices, len(windows)
            )
        if scores_out is not None:
            scores_out[length] = full
        entry = {
            "length": length,
            "loss": full.loss,
            "loss_stderr": full.loss_stderr,
            "ppl": perplexity(full.loss),
            "ppl_ci95": ppl_interval(full.loss, full.loss_stderr),
            "tokens": full.tokens,
            "windows": len(windows),
            "min_context": length - windows[0].n_scored + 1,
        }
        if stride is not None:
            entry["stride"] = stride
        entry.update(_document_fields(windows, documents, qualified))
        entry["peak_mib"] = _peak_mib(meter, ctx)
        curve = {"length": length, "bins": binned_positions(full)}
        if windowed is not None:
            entry.update(
                windowed_loss=windowed.loss,
                windowed_loss_stderr=windowed.loss_stderr,
                windowed_ppl=perplexity(windowed.loss),
                loss_minus_windowed=full.loss - windowed.loss,
            )
            for item, wbin in zip(curve["bins"], binned_positions(windowed)):
                item["windowed_loss"] = wbin["loss"]
        seconds = time.perf_counter() - started
        entry["seconds"] = round(seconds, 3)
        results.append(entry)
        by_position.append(curve)
        note = f", windowed {entry['windowed_loss']:.4f}" if ecfg.window_control else ""
        if inside:
            where = (
                f" inside {entry['scored_documents']} of the {entry['qualified_documents']} documents "
                f"({entry['qualified_tokens']:,} tokens) that hold {length + 1} tokens"
            )
        elif "crossing_share" in entry:
            where = f" ({entry['crossing_share']:.0%} of them across a document boundary)"
        else:
            where = ""
        interval = entry["ppl_ci95"]
        ci = "" if interval is None else f", 95% {interval[0]:.2f}..{interval[1]:.2f}"
        say(
            f"  length {length:>6}: loss {full.loss:.4f} (ppl {perplexity(full.loss):.2f}{ci}{note}), "
            f"{full.tokens:,} tokens in {len(windows)} windows{where}, {seconds:.1f} s"
        )
    return results, skipped, by_position


def _document_fields(windows: list[Window], documents: np.ndarray | None, qualified: tuple[int, int] | None) -> dict:
    """What results.json says of the documents behind one length's windows: inside documents, how many documents
    (and their tokens) are long enough and how many the scored windows came from; over the stream, the share of
    windows, and of scored predictions, whose context crosses a document boundary. Nothing without offsets."""
    if documents is None:
        return {}
    if qualified is not None:
        starts = np.fromiter((w.start for w in windows), dtype=np.int64, count=len(windows))
        scored = np.unique(np.searchsorted(documents, starts, side="right"))
        return {"qualified_documents": qualified[0], "qualified_tokens": qualified[1], "scored_documents": len(scored)}
    crossing_windows, crossing_tokens = boundary_crossings(windows, documents)
    return {
        "crossing_share": crossing_windows / len(windows),
        "crossing_token_share": crossing_tokens / sum(w.n_scored for w in windows),
    }


def _warm_up(model: GPT, split: EvalSplit, limit: int | None) -> None:
    """One tiny forward pass through the same path (kernels, communication) before any length is measured, so
    the first length's ``peak_mib`` is its windows' memory, not one-off set-up (thread pools, comm buffers)."""
    device = next(model.parameters()).device
    length = 8 * sequence_parts(split.groups.sp_size, split.mode, split.zigzag)
    if limit is not None and length > limit:  # a learned table too short for it: no warm-up
        return
    ids = torch.zeros(1, length, dtype=torch.long)
    with split.layout(model, length) as layout, torch.inference_mode():
        if layout is None:
            token_losses(model, ids.to(device), ids.to(device))
        else:
            token_losses(model, layout.shard(ids).to(device), layout.shard(ids).to(device), layout.positions(device))


def _memory_meter(model: GPT):
    """A started peak-memory meter for this rank (None where the CPU's RSS high-water mark cannot be reset)."""
    device = next(model.parameters()).device
    if device.type != "cuda" and not reset_rss_high_water_mark():
        return None
    meter = peak_memory_meter(device)
    meter.start()
    return meter


def _peak_mib(meter, ctx: DistContext) -> float | None:
    """The largest peak over ranks of the memory that scoring one length added (activations, logits): with
    each window split over P ranks its part that grows with the length shrinks about P-fold."""
    peak = torch.tensor([-1.0 if meter is None else meter.peak_extra_bytes() / MIB], dtype=torch.float64)
    peak = all_reduce(peak, ctx, op=dist.ReduceOp.MAX)
    return None if peak.item() < 0 else round(peak.item(), 1)


def _score_both(model, model_cfg, tokens, windows, length, batch_size, ecfg, ctx, layout, indices, n_windows):
    """The full-context scores of one length and, with ``eval.window_control``, the windowed ones (else None)."""
    where = dict(indices=indices, n_windows=n_windows)
    full = score_length(model, tokens, windows, length, batch_size, None, ctx, layout, **where)
    if not ecfg.window_control:
        return full, None
    # Within the training length the window changes nothing: the same numbers, not computed twice.
    if length <= model_cfg.seq_len:
        return full, full
    return full, score_length(model, tokens, windows, length, batch_size, model_cfg.seq_len, ctx, layout, **where)
