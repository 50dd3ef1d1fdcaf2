"""The ALiBi paper's headline from finished runs: does a model trained short match baselines trained long?

``launch/train_short_test_long.sh`` trains ALiBi at L and the baselines at L, 2L, ... with equal tokens, evaluates
them all on the same validation windows (``eval.compare``), then runs

    python -m pretrain.bench train_short_test_long --results OUT/compare/eval/results.json \\
        --timings OUT/timings.tsv --out OUT/headline

which joins each model's perplexity at every length with its training wall-clock and peak memory (its run's
``train/metrics.jsonl``) and answers Press et al. (2022)'s claim for every longer training length kL: is ALiBi
trained at L, evaluated at kL, at least as good as each baseline trained at kL (within ``--tolerance``), while
training faster with less memory? Writes ``headline.json``, ``headline.md`` (the table and the answers) and
``headline.png`` (perplexity against length, training time and peak memory), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from pretrain.bench.report import machine_info, now_iso

REFERENCE = "alibi"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_timings(path: Path | None) -> dict[str, tuple[float, float | None]]:
    """``run_dir<TAB>wall s[<TAB>CPU s]`` lines (the launch script's timing of each training command) as
    ``{resolved run_dir: (wall, cpu or None)}``; the last line of a run wins."""
    if path is None or not path.is_file():
        return {}
    timings = {}
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            cpu = float(fields[2]) if len(fields) > 2 else None
            timings[str(Path(fields[0]).resolve())] = (float(fields[1]), cpu)
    return timings


def run_dir_of(source: str) -> Path:
    """The run directory of an evaluated model: results.json names its weights (``<run>/checkpoints`` or a file or
    checkpoint inside it)."""
    path = Path(source)
    while path.name and path.name != "checkpoints":
        path = path.parent
    return path.parent if path.name == "checkpoints" else Path(source)


def model_rows(report: dict, timings: dict[str, tuple[float, float | None]]) -> list[dict]:
    """One row per evaluated model: encoding, training length, tokens, time, memory, perplexity per length."""
    rows = []
    for model in report["models"]:
        run_dir = run_dir_of(model["source"])
        steps = read_metrics(run_dir)
        step_times = [m["step_time_s"] for m in steps if m.get("step_time_s") is not None]
        peaks = [m["peak_memory_mib"] for m in steps if m.get("peak_memory_mib") is not None]
        wall, cpu = timings.get(str(run_dir.resolve()), (None, None))
        rows.append(
            {
                "name": model["name"],
                "run_dir": str(run_dir),
                "pos_encoding": model["pos_encoding"],
                "train_seq_len": model["train_seq_len"],
                "steps": steps[-1]["step"] if steps else None,
                "tokens": steps[-1]["tokens"] if steps else None,
                # One step's loss is one batch's: the mean of the last 20 steps.
                "final_loss": statistics.mean(m["loss"] for m in steps[-20:]) if steps else None,
                # The optimizer steps alone (forward, backward, update), without start-up, validation, checkpoints.
                "train_step_seconds": sum(step_times) if step_times else None,
                # The median step: on a machine shared with other work, far steadier than the sum.
                "median_step_seconds": statistics.median(step_times) if step_times else None,
                # The whole training command, as the launch script timed it (null when the run was reused).
                "train_command_seconds": wall,
                # The CPU time that command used (user + system): what the training cost, even on a shared machine.
                "train_command_cpu_seconds": cpu,
                "peak_memory_mib": max(peaks) if peaks else None,
                "ppl": {str(r["length"]): r["ppl"] for r in model["results"]},
                "skipped": [r["length"] for r in model.get("skipped", [])],
            }
        )
    return rows


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def claims(rows: list[dict], tolerance: float) -> list[dict]:
    """Press et al.'s claim, checked for every baseline trained longer than the shortest ALiBi model: ALiBi trained
    at L and evaluated at the baseline's training length kL, against the baseline at kL."""
    alibi = sorted((r for r in rows if r["pos_encoding"] == REFERENCE), key=lambda r: r["train_seq_len"])
    if not alibi:
        return []
    short = alibi[0]
    answers = []
    for row in rows:
        if row["pos_encoding"] == REFERENCE or row["train_seq_len"] <= short["train_seq_len"]:
            continue
        length = str(row["train_seq_len"])
        ours, theirs = short["ppl"].get(length), row["ppl"].get(length)
        if ours is None or theirs is None:
            continue
        ppl_ratio = ours / theirs
        # The CPU time of the training commands when the script measured it (other work on the machine changes it
        # far less than wall-clock); else the median step (equal steps), steadier than the sum.
        key = (
            "train_command_cpu_seconds"
            if short["train_command_cpu_seconds"] and row["train_command_cpu_seconds"]
            else "median_step_seconds"
        )
        time_ratio = _ratio(short[key], row[key])
        memory_ratio = _ratio(short["peak_memory_mib"], row["peak_memory_mib"])
        answers.append(
            {
                "alibi": short["name"],
                "baseline": row["name"],
                "pos_encoding": row["pos_encoding"],
                "alibi_train_seq_len": short["train_seq_len"],
                "baseline_train_seq_len": row["train_seq_len"],
                "length": row["train_seq_len"],
                "alibi_ppl": ours,
                "baseline_ppl": theirs,
                "ppl_ratio": ppl_ratio,
                "matches_or_beats": ppl_ratio <= 1 + tolerance,
                "train_time_ratio": time_ratio,
                "train_time_measure": key,
                "faster": None if time_ratio is None else time_ratio < 1,
                "memory_ratio": memory_ratio,
                "less_memory": None if memory_ratio is None else memory_ratio < 1,
            }
        )
    return answers


def _num(value, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ppl(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


def _verdict(answer: dict) -> str:
    quality = "matches or beats" if answer["matches_or_beats"] else "is worse than"
    speed = {True: "faster", False: "slower", None: "time unknown"}[answer["faster"]]
    memory = {True: "less memory", False: "more memory", None: "memory unknown"}[answer["less_memory"]]
    return (
        f"at {answer['length']}, ALiBi trained at {answer['alibi_train_seq_len']} ({_ppl(answer['alibi_ppl'])}) "
        f"{quality} {answer['pos_encoding']} trained at {answer['baseline_train_seq_len']} "
        f"({_ppl(answer['baseline_ppl'])}, ratio {answer['ppl_ratio']:.3f}); it trained "
        f"{_num(answer['train_time_ratio'], '{:.2f}')}x the "
        f"{'CPU time' if answer['train_time_measure'] == 'train_command_cpu_seconds' else 'median step time'} "
        f"({speed}) with "
        f"{_num(answer['memory_ratio'], '{:.2f}')}x the peak memory ({memory})"
    )


def markdown(rows: list[dict], answers: list[dict], lengths: list[int], tolerance: float) -> str:
    head = ["model", "trained at", "tokens", "loss (last 20 steps)", "median step s", "train s (steps)"]
    head += ["train s (command)", "train CPU s", "peak MiB"]
    head += [f"ppl @ {n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in sorted(rows, key=lambda r: (r["pos_encoding"] != REFERENCE, r["pos_encoding"], r["train_seq_len"])):
        cells = [
            row["pos_encoding"],
            str(row["train_seq_len"]),
            _num(row["tokens"], "{:,}"),
            _num(row["final_loss"], "{:.3f}"),
            _num(row["median_step_seconds"], "{:.3f}"),
            _num(row["train_step_seconds"], "{:,.0f}"),
            _num(row["train_command_seconds"], "{:,.0f}"),
            _num(row["train_command_cpu_seconds"], "{:,.0f}"),
            _num(row["peak_memory_mib"], "{:,.0f}"),
        ]
        for n in lengths:
            cell = _ppl(row["ppl"].get(str(n)))
            cells.append(f"**{cell}**" if n == row["train_seq_len"] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Bold: each model at its own training length. Matching means a perplexity ratio <= {1 + tolerance:g}."
    )
    lines.append("")
    if not answers:
        lines.append("No baseline was trained longer than ALiBi: nothing to compare.")
    for answer in answers:
        lines.append(f"- {_verdict(answer)}.")
    if answers:
        holds = all(a["matches_or_beats"] and a["faster"] and a["less_memory"] for a in answers)
        quality = all(a["matches_or_beats"] for a in answers)
        lines.append("")
        lines.append(
            "**The claim "
            + ("holds" if holds else "holds for perplexity only" if quality else "does not hold")
            + "** on these runs: ALiBi trained short "
            + ("matches or beats" if quality else "does not match")
            + " every baseline trained long at the baseline's length"
            + ("" if holds else (", but not always faster with less memory" if quality else ""))
            + "."
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], lengths: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax, ax_time, ax_mem) = plt.subplots(1, 3, figsize=(14, 4.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    colours = {"alibi": "tab:blue", "sinusoidal": "tab:red", "rope": "tab:green", "learned": "tab:purple"}
    styles = ["-", "--", ":", "-."]
    ordered = sorted(rows, key=lambda r: (r["pos_encoding"] != REFERENCE, r["pos_encoding"], r["train_seq_len"]))
    shortest = min(r["train_seq_len"] for r in rows)
    labels = []
    cpu = all(row["train_command_cpu_seconds"] for row in rows)
    time_measure = (
        ("train_command_cpu_seconds", "training CPU time (s)")
        if cpu
        else ("median_step_seconds", "median training step (s)")
    )
    for row in ordered:
        label = f"{row['pos_encoding']} L={row['train_seq_len']}"
        labels.append(label)
        style = styles[int(round(math.log2(row["train_seq_len"] / shortest))) % len(styles)]
        points = sorted((int(n), p) for n, p in row["ppl"].items())
        colour = colours.get(row["pos_encoding"], "tab:gray")
        ax.plot([n for n, _ in points], [p for _, p in points], style, marker="o", color=colour, label=label)
        ax.plot(
            [row["train_seq_len"]],
            [row["ppl"].get(str(row["train_seq_len"]), math.nan)],
            "s",
            color=colour,
            markersize=9,
            markerfacecolor="none",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("perplexity against length (square: training length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for axis, key, title in (
        (ax_time, *time_measure),
        (ax_mem, "peak_memory_mib", "training peak memory (MiB)"),
    ):
        values = [row[key] or 0.0 for row in ordered]
        bars = axis.barh(labels, values, color=[colours.get(r["pos_encoding"], "tab:gray") for r in ordered])
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build(
    results: Path, out: Path, timings: Path | None = None, tolerance: float = 0.02, script_seconds: float | None = None
) -> dict:
    report = json.loads(Path(results).read_text())
    rows = model_rows(report, read_timings(timings))
    lengths = sorted({int(n) for row in rows for n in row["ppl"]})
    answers = claims(rows, tolerance)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, answers, lengths, tolerance)
    (out / "headline.md").write_text(text)
    plot(rows, lengths, out / "headline.png")
    summary = {
        "date": now_iso(),
        "machine": machine_info("cpu"),
        "results": str(results),
        "eval_mode": report.get("mode"),
        "eval_settings": report.get("settings"),
        "lengths": lengths,
        "tolerance": tolerance,
        "script_seconds": script_seconds,
        "models": rows,
        "claims": answers,
    }
    (out / "headline.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="eval/results.json of the eval.compare run")
    parser.add_argument("--out", type=Path, required=True, help="directory for headline.json, .md and .png")
    parser.add_argument("--timings", type=Path, help="run_dir<TAB>seconds lines: each training command's wall time")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="ALiBi matches a baseline when its perplexity is at most (1 + this) times the baseline's",
    )
    parser.add_argument("--script-seconds", type=float, help="the whole script's wall time, recorded in the JSON")
    ns = parser.parse_args(argv)
    if not ns.results.is_file():
        parser.error(f"{ns.results} does not exist: run the eval.compare evaluation first")
    summary = build(ns.results, ns.out, ns.timings, ns.tolerance, ns.script_seconds)
    print((ns.out / "headline.md").read_text(), end="")
    print(f"wrote {ns.out / 'headline.json'}, {ns.out / 'headline.md'}, {ns.out / 'headline.png'}")
    return 0 if summary["models"] else 1
