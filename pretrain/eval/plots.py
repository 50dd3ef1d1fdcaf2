"""The evaluation stage's figures, drawn from a ``results.json`` report (matplotlib, no display needed).

- ``ppl_vs_length.png``: perplexity against evaluation length, one solid line per model; with the windowed
  control, a dashed line of the same colour for attention limited to the training length (relative
  encodings only: alibi, rope, none); error bars: the 95% interval on ppl over the windows. Each length is
  labelled with where its windows came from
  (``eval.windows``): the share crossing a document boundary (stream), or the documents long enough for it
  (documents); a skipped length is an ``x`` on the axis with the word "skipped" (the reason is in
  results.json and the table).
- ``loss_vs_position.png``: loss by position inside the window at the longest length, one line per model
  (dashed: the windowed control).
- ``passkey.png``: passkey accuracy per (length, depth), greedy and by likelihood, one row per model.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter  # noqa: E402

from pretrain.model.positions import is_absolute  # noqa: E402

# Absolute position encodings: limiting attention to a window does not bring their positions back inside the
# trained range, so the windowed control is no reference for them and is not drawn (results.json has it).
# Bins of the loss-by-position curve with fewer predictions than this are not drawn (too noisy to read).
MIN_BIN_TOKENS = 512


def _log2_length_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths], rotation=0)
    ax.minorticks_off()


def window_source(report: dict) -> str:
    """Where the windows came from (``eval.windows``), in words: reports without the key are stream ones."""
    return "inside documents" if report.get("windows") == "documents" else "over the stream"


def plot_ppl_vs_length(report: dict, path: Path) -> Path:
    """Perplexity against length per model (solid), windowed control (dashed), training lengths (dotted); each
    point of the first model labelled with its documents or crossing share, skipped lengths marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({r["length"] for m in report["models"] for r in m["results"] + m["skipped"]})
    for i, model in enumerate(report["models"]):
        if not model["results"]:
            continue
        color = f"C{i}"
        xs = [r["length"] for r in model["results"]]
        ax.plot(xs, [r["ppl"] for r in model["results"]], "o-", color=color, label=_label(model))
        _draw_intervals(ax, model["results"], color)
        if any("windowed_ppl" in r for r in model["results"]) and not is_absolute(model["pos_encoding"]):
            ax.plot(
                xs,
                [r["windowed_ppl"] for r in model["results"]],
                "--",
                color=color,
                alpha=0.6,
                label=f"{model['name']}: attention limited to {model['train_seq_len']}",
            )
    for seq_len in sorted({m["train_seq_len"] for m in report["models"]}):
        ax.axvline(seq_len, color="grey", linestyle=":", linewidth=1)
    if lengths:
        _log2_length_axis(ax, lengths)
    ax.set_yscale("log")
    _label_points(ax, report)
    _mark_skipped(ax, report)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 10:  # less than a decade: label the minor ticks too, or the axis has no numbers
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    else:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("evaluation length (tokens); dotted: training length" + _point_note(report))
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Perplexity vs length ({report['mode']} windows {window_source(report)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _draw_intervals(ax, results: list[dict], color: str) -> None:
    """Error bars of the 95% interval on ppl (``ppl_ci95``) at the points that have one."""
    rows = [r for r in results if r.get("ppl_ci95")]
    if rows:
        ys = [r["ppl"] for r in rows]
        below = [max(0.0, r["ppl"] - r["ppl_ci95"][0]) for r in rows]
        above = [max(0.0, r["ppl_ci95"][1] - r["ppl"]) for r in rows]
        ax.errorbar([r["length"] for r in rows], ys, yerr=[below, above], fmt="none", ecolor=color, capsize=3)


def _point_note(report: dict) -> str:
    """What the labels under the points say, for the axis title (nothing without labels)."""
    results = next((m["results"] for m in report["models"] if m["results"]), [])
    if any("qualified_documents" in r for r in results):
        return "\nunder each point: the validation documents long enough for it"
    if any("crossing_share" in r for r in results):
        return "\nunder each point: the share of its windows crossing a document boundary"
    return ""


def _label_points(ax, report: dict) -> None:
    """Under each point of the first model with results: the documents long enough for the length (documents
    windows) or the share of its windows crossing a document boundary (stream windows)."""
    model = next((m for m in report["models"] if m["results"]), None)
    for r in model["results"] if model else ():
        if "qualified_documents" in r:
            n = r["qualified_documents"]
            text = f"{n:,} doc{'' if n == 1 else 's'}"
        elif "crossing_share" in r:
            text = f"{r['crossing_share']:.0%} cross"
        else:
            continue
        point = (r["length"], r["ppl"])
        ax.annotate(text, point, xytext=(0, -11), textcoords="offset points", ha="center", fontsize=6, color="dimgrey")


def _mark_skipped(ax, report: dict) -> None:
    """An ``x`` at the foot of the axis, in the model's colour, at each length a model skipped."""
    foot = ax.get_xaxis_transform()  # x in data, y in axes fractions
    marked = False
    for i, model in enumerate(report["models"]):
        for s in model["skipped"]:
            label = None if marked else "skipped length (reason in results.json)"
            ax.plot([s["length"]], [0.04 + 0.05 * i], "x", color=f"C{i}", transform=foot, clip_on=False, label=label)
            ax.text(s["length"], 0.07 + 0.05 * i, "skipped", transform=foot, ha="center", fontsize=6, color=f"C{i}")
            marked = True


def plot_loss_vs_position(report: dict, path: Path) -> Path:
    """Loss by position inside the window at the longest length: one solid line per model, the windowed
    control dashed. Neighbouring bins are merged until each holds ``MIN_BIN_TOKENS`` predictions."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = [m for m in report["models"] if m["loss_by_position"]]
    for i, model in enumerate(models):
        curve = model["loss_by_position"][-1]
        color = f"C{i}"
        bins = _merged(curve["bins"], "loss")
        ax.plot(
            [x for x, _ in bins], [y for _, y in bins], "-", color=color, label=f"{_label(model)}, L={curve['length']}"
        )
        relative = not is_absolute(model["pos_encoding"])
        if (
            relative
            and curve["bins"]
            and "windowed_loss" in curve["bins"][0]
            and curve["length"] > model["train_seq_len"]
        ):
            bins = _merged(curve["bins"], "windowed_loss")
            ax.plot([x for x, _ in bins], [y for _, y in bins], "--", color=color, alpha=0.7)
    for seq_len in sorted({m["train_seq_len"] for m in models}):
        ax.axvline(seq_len, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (= tokens of context - 1); dotted: training length")
    ax.set_ylabel("loss (nats per token)")
    dashed = "\ndashed: attention limited to the training length" if report["settings"].get("window_control") else ""
    ax.set_title(
        f"Loss by position in the window ({report['mode']} windows {window_source(report)}){dashed}", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _merged(bins: list[dict], key: str) -> list[tuple[float, float]]:
    """(position, mean loss) of runs of neighbouring bins that hold at least ``MIN_BIN_TOKENS`` predictions."""
    points, run = [], []
    for b in bins:
        run.append(b)
        tokens = sum(r["tokens"] for r in run)
        if tokens >= MIN_BIN_TOKENS or b is bins[-1]:
            start, end = run[0]["start"], run[-1]["end"]
            center = math.sqrt(max(start, 0.5) * max(end - 1, 0.5))  # the middle on a log axis
            points.append((center, sum(r[key] * r["tokens"] for r in run) / tokens))
            run = []
    return points


def plot_passkey(report: dict, path: Path) -> Path:
    """Heat maps of passkey accuracy (depth x length), greedy and likelihood, one row per model."""
    models = [m for m in report["models"] if m.get("passkey", {}).get("cells")]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 0.6 + 3.0 * len(models)), squeeze=False, layout="constrained")
    image = None
    for row, model in zip(axes, models):
        passkey = model["passkey"]
        lengths, depths = passkey["lengths"], passkey["depths"]
        for ax, score in zip(row, ("greedy", "likelihood")):
            grid = [[_cell(passkey, n, d)[score] for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            for y, values in enumerate(grid):
                for x, value in enumerate(values):
                    ax.text(
                        x, y, f"{value:.0%}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
                    )
            what = "greedy continuation" if score == "greedy" else f"likelihood vs {passkey['distractors']} keys"
            ax.set_title(f"{model['name']}: {what}", fontsize=9)
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel("key depth")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"accuracy over {models[0]['passkey']['trials']} trials")
    return _save(fig, path, tight=False)


def _cell(passkey: dict, length: int, depth: float) -> dict:
    return next(c for c in passkey["cells"] if c["length"] == length and c["depth"] == depth)


def _label(model: dict) -> str:
    return f"{model['name']} ({model['pos_encoding']}, trained at {model['train_seq_len']})"


def _save(fig, path: Path, tight: bool = True) -> Path:
    path = Path(path)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
