"""What the harness stage leaves: ``eval/harness.json``, the console table, the exported model card's section and the
wandb keys. Pure functions of lm-eval's results, except the two writers at the end.

lm-eval names a score ``"<metric>,<filter>"`` (``"acc,none"``) beside its standard error ``"<metric>_stderr,<filter>"``
in ``results[task]``; ``metric_rows`` flattens that into one row per (task, metric, filter).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from pretrain.run_files import write_atomic

# The model card's section is written between these lines and replaced whole on the next run.
CARD_BEGIN = "<!-- pretrain stage=harness: begin (replaced by every run of the stage) -->"
CARD_END = "<!-- pretrain stage=harness: end -->"
# Keys of results[task] that are not scores.
NOT_SCORES = ("alias", "name", "sample_len", "samples", " ")


def metric_rows(lm_results: dict) -> list[dict]:
    """One row per (task, metric, filter) of lm-eval's results: value, stderr (None when lm-eval gives none), the
    few-shot count, the examples scored, the task's version and whether higher is better."""
    rows = []
    n_shot = lm_results.get("n-shot", {})
    n_samples = lm_results.get("n-samples", {})
    better = lm_results.get("higher_is_better", {})
    versions = lm_results.get("versions", {})
    for task, scores in lm_results.get("results", {}).items():
        for key, value in scores.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric in NOT_SCORES or metric.endswith("_stderr"):
                continue
            stderr = scores.get(f"{metric}_stderr,{filter_name}")
            samples = n_samples.get(task, {})
            rows.append(
                {
                    "task": task,
                    "alias": str(scores.get("alias", task)).strip(),
                    "metric": metric,
                    "filter": filter_name,
                    "value": _number(value),
                    "stderr": _number(stderr),
                    "n_shot": n_shot.get(task),
                    "examples": samples.get("effective") if isinstance(samples, dict) else None,
                    "version": versions.get(task),
                    "higher_is_better": better.get(task, {}).get(metric),
                }
            )
    return rows


def _number(value) -> float | None:
    """A score as a float; None for lm-eval's "N/A" and for what is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_name(row: dict) -> str:
    """``acc``, or ``exact_match/strict-match`` when the filter is not lm-eval's ``none``."""
    return row["metric"] if row["filter"] == "none" else f"{row['metric']}/{row['filter']}"


def task_hashes(samples: dict) -> dict[str, str]:
    """lm-eval's own task hash (its ``EvaluationTracker``): SHA-256 over every scored example's document, prompt and
    target hashes, in order. Equal hashes: the same examples asked the same way."""
    out = {}
    for task, task_samples in samples.items():
        joined = "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in task_samples)
        out[task] = hashlib.sha256(joined.encode("utf-8")).hexdigest()
    return out


def request_texts(output_type: str, arguments: list) -> list[tuple[str, bool]]:
    """The texts whose tokens one example's requests feed the model: ``(text, predicts_its_last_token)`` a request.

    loglikelihood / multiple_choice: context + continuation, whose last token is predicted, not read;
    loglikelihood_rolling: the whole text after a one-token prefix (as many tokens read as the text has);
    generate_until: the context (the generated tokens come on top)."""
    out = []
    for args in arguments:
        if output_type in ("loglikelihood", "multiple_choice"):
            context, continuation = args[0], args[1]
            out.append((context + continuation, bool(context)))
        else:
            out.append((args[0], False))
    return out


def input_lengths(samples: dict, output_types: dict, count_tokens, train_len: int | None, max_length: int) -> dict:
    """Per task: ``requests``, the ``longest`` model input in tokens, ``over_train_length`` (inputs longer than the
    length the model was trained at: scored whole, ALiBi extrapolating) and ``cut`` (inputs longer than
    ``max_length``, which lm-eval shortens from the left). ``count_tokens(texts) -> [int]`` is the export's
    tokenizer (no special tokens added, as lm-eval encodes for a causal model)."""
    out = {}
    for task, task_samples in samples.items():
        texts = [
            pair
            for s in task_samples
            for pair in request_texts(output_types.get(task, "loglikelihood"), s.get("arguments", []))
        ]
        counts = count_tokens([text for text, _ in texts]) if texts else []
        lengths = [n - 1 if predicts_last else n for n, (_, predicts_last) in zip(counts, texts)]
        out[task] = {
            "requests": len(lengths),
            "longest": max(lengths, default=0),
            "over_train_length": sum(n > train_len for n in lengths) if train_len else None,
            "cut": sum(n > max_length for n in lengths),
        }
    return out


def length_lines(report: dict) -> list[str]:
    """One line per task with inputs longer than the training length (or cut to the max_length lm-eval got)."""
    train_len = report["model"].get("train_seq_len")
    max_length = report["settings"].get("max_length")
    lines = []
    for task, n in report.get("lengths", {}).items():
        over, cut = n.get("over_train_length") or 0, n.get("cut") or 0
        if not over and not cut:
            continue
        text = (
            f"{task}: {over:,} of {n['requests']:,} inputs are longer than the training length {train_len} "
            f"(longest {n['longest']:,} tokens)"
        )
        if cut:
            text += f"; {cut:,} were cut from the left to {max_length} tokens (max_length)"
        elif over:
            text += ", scored at their full length (ALiBi)"
        lines.append(text)
    return lines


def format_table(report: dict) -> str:
    """The console table: one line per task and metric, with lm-eval's standard error."""
    rows = report["rows"]
    header = ("task", "n-shot", "metric", "value", "± stderr", "examples")
    body = [
        (
            row["alias"],
            "" if row["n_shot"] is None else str(row["n_shot"]),
            metric_name(row) + ("" if row["higher_is_better"] is None else " ↑" if row["higher_is_better"] else " ↓"),
            format_number(row["value"]),
            format_number(row["stderr"]),
            "" if row["examples"] is None else f"{row['examples']:,}",
        )
        for row in rows
    ]
    widths = [max(len(str(cells[i])) for cells in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [header, *body]]  # fmt: skip
    limit = report["settings"].get("limit")
    if limit is not None:
        lines.append(f"limit: {limit:g} examples per task (not comparable with published numbers)")
    return "\n".join(lines)


def format_number(value: float | None) -> str:
    """A score as the tables show it: 4 decimals, thousands separated past 1,000 (perplexities)."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def card_section(report: dict) -> str:
    """The model card's "Downstream tasks" section, between ``CARD_BEGIN`` and ``CARD_END``."""
    settings = report["settings"]
    shots = settings.get("num_fewshot")
    limit = settings.get("limit")
    lines = [
        CARD_BEGIN,
        "## Downstream tasks",
        "",
        f"Scored with EleutherAI's lm-evaluation-harness {report['versions'].get('lm_eval', '')} (its `hf` model: this "
        f"directory as transformers loads it), {report['date']}; "
        + ("each task's own few-shot count" if shots is None else f"{shots}-shot")
        + f", seed {settings.get('seed')}"
        + (f", **limit {limit:g} examples per task** (not comparable with published numbers)" if limit else "")
        + (
            ". Inputs longer than the training length are scored whole (ALiBi), none truncated."
            if settings.get("max_length") is None
            else f". Inputs are scored whole up to {settings['max_length']} tokens; longer ones lose tokens from the "
            "left (counted below)."
        ),
        "",
        "| task | n-shot | metric | value | ± stderr | examples |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        examples = "" if row["examples"] is None else f"{row['examples']:,}"
        shots_cell = "" if row["n_shot"] is None else row["n_shot"]
        lines.append(
            f"| {row['alias']} | {shots_cell} | {metric_name(row)} | {format_number(row['value'])} "
            f"| {format_number(row['stderr'])} | {examples} |"
        )
    lengths = length_lines(report)
    if lengths:
        lines += [""] + [f"- {line}" for line in lengths]
    lines += ["", "The full results, task hashes and versions: `eval/harness.json` of the run.", CARD_END]
    return "\n".join(lines)


def with_card_section(card: str, section: str) -> str:
    """``card`` with its harness section replaced by ``section`` (appended when it has none)."""
    pattern = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END), re.DOTALL)
    if pattern.search(card):
        return pattern.sub(lambda _: section, card, count=1)
    return card.rstrip("\n") + "\n\n" + section + "\n"


def wandb_metrics(report: dict) -> dict[str, float]:
    """``harness/<task>/<metric>`` (and ``.../<metric>_stderr``) for every score with a value."""
    out = {}
    for row in report["rows"]:
        key = f"harness/{row['task']}/{metric_name(row)}"
        if row["value"] is not None:
            out[key] = row["value"]
        if row["stderr"] is not None:
            out[f"{key}_stderr"] = row["stderr"]
    return out


def write_report(path: Path, report: dict) -> None:
    """``eval/harness.json``, written whole through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def write_samples(folder: Path, samples: dict) -> list[Path]:
    """``harness.log_samples``: every scored request of each task, ``<task>.jsonl``, as lm-eval logs them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, task_samples in samples.items():
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.jsonl"
        lines = [json.dumps(s, default=_json_default, ensure_ascii=False) for s in task_samples]
        write_atomic(path, "".join(line + "\n" for line in lines))
        paths.append(path)
    return paths


def update_card(readme: Path, report: dict) -> bool:
    """Write the section into the export's ``README.md``; False when there is no card to update."""
    if not readme.is_file():
        return False
    write_atomic(readme, with_card_section(readme.read_text(encoding="utf-8"), card_section(report)).encode("utf-8"))
    return True


def _json_default(value):
    """lm-eval's results hold a few objects JSON cannot (dtypes, functions in configs): their text."""
    return str(value)
