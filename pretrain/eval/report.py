"""What the evaluation stage leaves: ``results.json``, the plots, the console table and the wandb run's table.
Rank 0 only."""

from __future__ import annotations

import json

from pretrain.config import Config
from pretrain.eval.plots import plot_loss_vs_position, plot_passkey, plot_ppl_vs_length, window_source
from pretrain.run_files import RunFiles, write_atomic
from pretrain.tracking import start_wandb


def write_outputs(cfg: Config, report: dict, say) -> None:
    """``results.json``, the plots, the console table and (when enabled) wandb. Rank 0 only."""
    files = RunFiles(cfg.run_dir)
    out_dir = files.eval_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = files.eval_results
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    plots = {
        "ppl_vs_length": plot_ppl_vs_length(report, out_dir / "ppl_vs_length.png"),
        "loss_vs_position": plot_loss_vs_position(report, out_dir / "loss_vs_position.png"),
    }
    if any(m.get("passkey", {}).get("cells") for m in report["models"]):
        plots["passkey"] = plot_passkey(report, out_dir / "passkey.png")
    say(format_table(report))
    say(f"[eval] wrote {path} and {', '.join(p.name for p in plots.values())} in {out_dir}")
    if cfg.wandb.mode != "disabled":
        log_to_wandb(cfg, report, plots)


def format_table(report: dict) -> str:
    """The console table: one block per model, one row per length."""
    lines = []
    inside = report.get("windows") == "documents"
    for model in report["models"]:
        control = any("windowed_loss" in r for r in model["results"])
        crossing = not inside and any("crossing_share" in r for r in model["results"])
        lines.append(f"\n{_label(model)}, {report['mode']} windows {window_source(report)}")
        header = f"{'length':>7} {'x train':>7} {'loss':>7} {'+-se':>6} {'ppl':>9} {'95% interval':>17} {'tokens':>9}"
        if control:
            header += f" {'windowed':>9} {'full-windowed':>14}"
        if inside:
            header += f" {'documents':>9} {'doc tokens':>10}"
        if crossing:
            header += f" {'crossing':>8}"
        lines += [header, "-" * len(header)]
        for r in model["results"]:
            stderr, interval = r.get("loss_stderr"), r.get("ppl_ci95")
            se = f"{stderr:>6.4f}" if stderr is not None else f"{'-':>6}"
            ci = f"{interval[0]:>8.2f}..{interval[1]:<7.2f}" if interval else f"{'-':>17}"
            row = (
                f"{r['length']:>7} {r['length'] / model['train_seq_len']:>7.3g} {r['loss']:>7.4f} {se} "
                f"{r['ppl']:>9.2f} {ci} {r['tokens']:>9,}"
            )
            if control:
                row += f" {r['windowed_loss']:>9.4f} {r['loss_minus_windowed']:>+14.4f}"
            if inside:
                row += f" {r['qualified_documents']:>9,} {r['qualified_tokens']:>10,}"
            if crossing:
                row += f" {r['crossing_share']:>8.0%}"
            lines.append(row)
        for s in model["skipped"]:
            lines.append(f"{s['length']:>7}  skipped: {s['reason']}")
        lines.append(
            "+-se: standard error of the mean loss over the windows; 95% interval: exp(loss +- 1.96 se), the noise of "
            "which windows were scored"
        )
        lines += _versus_lines(model)
        if inside:
            lines.append(
                "documents, doc tokens: the validation documents long enough for the length (L + 1 tokens with "
                "their </s>) and the tokens they hold; every window lies inside one of them"
            )
        elif crossing:
            lines.append("crossing: the share of the length's windows that hold tokens of two documents (across </s>)")
        passkey = model.get("passkey")
        for s in (passkey or {}).get("skipped", []):
            lines.append(f"passkey at {s['length']} skipped: {s['reason']}")
        if passkey and passkey["cells"]:
            lines.append(
                f"passkey retrieval (accuracy greedy / likelihood vs {passkey['distractors']} distractors, chance "
                f"{passkey['chance']:.0%}; {passkey['trials']} trials per cell):"
            )
            lines.append(f"{'depth':>7} " + " ".join(f"{n:>11}" for n in passkey["lengths"]))
            for depth in passkey["depths"]:
                row = [c for c in passkey["cells"] if c["depth"] == depth]
                lines.append(f"{depth:>7.2f} " + " ".join(f"{c['greedy']:>5.0%}/{c['likelihood']:<5.0%}" for c in row))
    return "\n".join(lines)


def _versus_lines(model: dict) -> list[str]:
    """eval.compare's verdict for a compared model: per length, its loss minus the first model's on the same
    windows, that difference's standard error, and whether it is more than the noise."""
    versus = model.get("versus")
    if not versus or not versus["rows"]:
        return []
    lines = [f"against {versus['model']} on the same windows (loss difference, paired standard error):"]
    for row in versus["rows"]:
        se = row["diff_stderr"]
        if row["differs"] is None:
            verdict = "one window: no noise estimate"
        else:
            verdict = "differs (beyond 1.96 se)" if row["differs"] else "within the noise"
        se_text = "-" if se is None else f"{se:.4f}"
        lines.append(f"{row['length']:>7} {row['loss_diff']:>+9.4f} +- {se_text:<7} {verdict}")
    return lines


def _label(model: dict) -> str:
    return f"{model['name']} ({model['pos_encoding']}, trained at {model['train_seq_len']})"


def log_to_wandb(cfg: Config, report: dict, plots: dict) -> None:
    """A table and the plots under the trained model's wandb run (its id is in ``<run_dir>/train/wandb_id``)."""
    import wandb

    run = start_wandb(cfg.wandb, cfg.run_dir)
    try:
        columns = [
            "model", "pos_encoding", "windows", "length", "loss", "loss_stderr", "ppl", "tokens", "windowed_loss",
            "loss_minus_windowed", "qualified_documents", "qualified_tokens", "crossing_share", "skipped",
        ]  # fmt: skip
        table = wandb.Table(columns=columns)
        windows = report.get("windows", "stream")
        for model in report["models"]:
            rows = [(r["length"], r, None) for r in model["results"]]
            rows += [(s["length"], s, s["reason"]) for s in model["skipped"]]
            for length, r, skipped in sorted(rows, key=lambda row: row[0]):
                table.add_data(
                    model["name"],
                    model["pos_encoding"],
                    windows,
                    length,
                    r.get("loss"),
                    r.get("loss_stderr"),
                    r.get("ppl"),
                    r.get("tokens"),
                    r.get("windowed_loss"),
                    r.get("loss_minus_windowed"),
                    r.get("qualified_documents"),
                    r.get("qualified_tokens"),
                    r.get("crossing_share"),
                    skipped,
                )
        logged = {"eval/results": table, **{f"eval/{k}": wandb.Image(str(v)) for k, v in plots.items()}}
        passkey = report.get("passkey")
        if passkey and passkey["cells"]:
            cells = wandb.Table(columns=["length", "depth", "greedy", "likelihood", "trials"])
            for c in passkey["cells"]:
                cells.add_data(c["length"], c["depth"], c["greedy"], c["likelihood"], c["trials"])
            logged["eval/passkey"] = cells
        run.log(logged)
        run.summary.update({f"eval/ppl@{r['length']}": r["ppl"] for r in report["results"]})
        summary = {"eval/windows": windows}
        for r in report["results"]:
            for key in ("crossing_share", "qualified_documents", "qualified_tokens"):
                if key in r:
                    summary[f"eval/{key}@{r['length']}"] = r[key]
        run.summary.update(summary)
    finally:
        run.finish()
