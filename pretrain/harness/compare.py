"""``harness.compare=[RUN_DIR, ...]``: the harness results of several runs side by side, each score with its
standard error, so that a difference can be read against the noise.

A cell is marked when it was not scored like the first run's: other examples or prompts (lm-eval's task hash
differs), another few-shot count, or a limit on the examples. Such numbers do not compare.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config import Config
from pretrain.errors import PipelineError
from pretrain.harness.results import format_number, metric_name
from pretrain.run_files import RunFiles, write_atomic


def compare_paths(cfg: Config) -> list[Path]:
    """The ``harness.json`` files ``harness.compare`` names (a run directory or the file); PipelineError in one line
    for one that is missing, before any work."""
    paths = []
    for entry in cfg.harness.compare:
        path = Path(entry).expanduser()
        if path.is_dir():
            path = RunFiles(path).harness_results
        if not path.is_file():
            raise PipelineError(
                f"harness.compare: {entry!r} has no lm-evaluation-harness results ({path}); score it first: "
                f"pretrain stage=harness run_dir={entry} harness.tasks=[...]"
            )
        paths.append(path)
    return paths


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"harness.compare: {path} cannot be read ({err})") from None
    if not isinstance(report, dict) or "rows" not in report:
        raise PipelineError(f"harness.compare: {path} is not a harness.json written by pretrain stage=harness")
    return report


def run_name(path: Path) -> str:
    """A run's column name: its directory's name (``<run>/eval/harness.json``)."""
    return path.parent.parent.name if path.parent.name == "eval" else path.stem


def compare_table(reports: list[tuple[str, dict]]) -> str:
    """Markdown: one row per (task, metric), one column per run, ``value ± stderr`` in each cell, then a note per run
    on what was scored (checkpoint, few-shot, limit) and the marks' meaning."""
    names = _unique([name for name, _ in reports])
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[int, dict]] = {}
    for index, (_, report) in enumerate(reports):
        for row in report["rows"]:
            key = (row["task"], metric_name(row))
            if key not in cells:
                keys.append(key)
                cells[key] = {}
            cells[key][index] = row
    first_hash: dict[str, tuple[str | None, object]] = {}
    marked = False
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metric in keys:
        row_cells = []
        for index, (_, report) in enumerate(reports):
            row = cells[(task, metric)].get(index)
            if row is None:
                row_cells.append("")
                continue
            scored = (report.get("task_hashes", {}).get(task), row.get("n_shot"))
            first_hash.setdefault(task, scored)
            differs = scored != first_hash[task] or report.get("settings", {}).get("limit") is not None
            marked |= differs
            value = format_number(row["value"])
            stderr = "" if row["stderr"] is None else f" ± {format_number(row['stderr'])}"
            row_cells.append(f"{value}{stderr}{' †' if differs else ''}")
        better = cells[(task, metric)][min(cells[(task, metric)])].get("higher_is_better")
        arrow = "" if better is None else " ↑" if better else " ↓"
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(row_cells) + " |")
    lines.append("")
    for name, (_, report) in zip(names, reports):
        settings = report.get("settings", {})
        checkpoint = report.get("checkpoint", {}).get("weights") or report.get("model", {}).get("hf")
        shots = settings.get("num_fewshot")
        limit = settings.get("limit")
        lines.append(
            f"- {name}: `{checkpoint}`; "
            + ("each task's few-shot default" if shots is None else f"{shots}-shot")
            + (f"; limit {limit:g}" if limit is not None else "")
            + f"; lm-eval {report.get('versions', {}).get('lm_eval', '?')}; {report.get('date', '')}"
        )
    if marked:
        lines += [
            "",
            "† not scored like the first run's column: other examples or prompts (task hash), another few-shot "
            "count, or a limit on the examples; the numbers do not compare.",
        ]
    lines += [
        "",
        "± is lm-eval's standard error of each score (over its examples); two runs scored on the same examples differ "
        "beyond noise when the gap is well above the combined error, sqrt(se1² + se2²).",
    ]
    return "\n".join(lines)


def _unique(names: list[str]) -> list[str]:
    return [name if names.count(name) == 1 else f"{name} ({i + 1})" for i, name in enumerate(names)]


def write_comparison(cfg: Config, own: dict | None, say=print) -> str | None:
    """This run's results (``own``, or its ``eval/harness.json`` when it has one) and every ``harness.compare`` run:
    the table on the console and in ``eval/harness_compare.md``."""
    if not cfg.harness.compare:
        return None
    files = RunFiles(cfg.run_dir)
    reports: list[tuple[str, dict]] = []
    if own is not None:
        reports.append((files.root.resolve().name, own))
    elif files.harness_results.is_file():
        reports.append((files.root.resolve().name, read_report(files.harness_results)))
    reports += [(run_name(path.resolve()), read_report(path)) for path in compare_paths(cfg)]
    table = compare_table(reports)
    files.eval_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(files.harness_compare, table + "\n")
    say(f"[harness] {len(reports)} runs side by side ({files.harness_compare}):\n{table}")
    return table
