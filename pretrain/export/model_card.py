"""The exported model's ``README.md``: what it is, how to load it, how it was trained, and the extrapolation
evidence of the run's evaluation (``eval/results.json``) when there is one. A pure function of what the export
stage gathered."""

from __future__ import annotations

from dataclasses import asdict

from pretrain.config import ModelConfig


def model_card(
    model_cfg: ModelConfig,
    parameters: int,
    dtype: str,
    source: str,
    training: dict | None,
    data: dict | None,
    tokenizer_check: str,
    results: dict | None,
    results_match: bool,
    plot_name: str | None,
    architecture: str = "BloomForCausalLM",
    fidelity: list[dict] | None = None,
    fidelity_note: str | None = None,
) -> str:
    """Markdown with a YAML header. ``training``: steps, tokens, losses from ``train/metrics.jsonl`` and
    ``val.jsonl``; ``data``: the prepared corpus's summary; ``results``: ``eval/results.json``;
    ``results_match``: whether that eval scored the exported weights; ``plot_name``: the copied plot;
    ``architecture``: the transformers class; ``fidelity``: ``export.fidelity.measure``'s rows for a class that
    does not compute the model exactly, with ``fidelity_note`` saying why."""
    family = architecture.removesuffix("ForCausalLM")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{family.lower()}, alibi, causal-lm, pretrain]",
        "---",
        "",
        f"# ALiBi GPT ({parameters / 1e6:.2f}M parameters), {family.upper() if family == 'Mpt' else family} layout",
        "",
        f"A causal language model trained with the `pretrain` pipeline at {model_cfg.seq_len} tokens per sequence, "
        "with ALiBi attention biases (Press et al., 2022: no position embeddings, so it reads inputs longer than "
        f"it was trained on). Exported as `{architecture}`: `transformers` loads it with no custom code.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'ids = tokenizer("def fib(n):", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))",
        "```",
        "",
        "The tokenizer adds no `<s>` in front and no `</s>` at the end: training documents were "
        "`tokens(text) + [</s>]`. `decode(ids)` gives the text back exactly (whitespace, tabs, newlines, bytes); "
        "pass `skip_special_tokens=True` to drop `</s>`.",
        "",
        "## Model",
        "",
        "| setting | value |",
        "|---|---|",
        f"| layers | {model_cfg.n_layer} |",
        f"| width (d_model) | {model_cfg.d_model} |",
        f"| heads | {model_cfg.n_head} |",
        f"| key/value heads | {model_cfg.n_kv_head} |",
        f"| MLP | {model_cfg.mlp}, {model_cfg.mlp_width} wide |",
        f"| norm | {model_cfg.norm}{'' if model_cfg.bias else ', no linear biases'} |",
        f"| vocabulary | {model_cfg.vocab_size} |",
        f"| training length | {model_cfg.seq_len} tokens |",
        "| position encoding | ALiBi (per-head slopes, BLOOM's rule"
        + (", divided by sqrt(head_dim) as Falcon applies them" if model_cfg.alibi_slopes == "falcon" else "")
        + ") |",
        f"| weights | {dtype} |",
        f"| exported from | `{source}` |",
        "",
    ]
    if fidelity:
        lines += [
            "## How closely the transformers class computes this model",
            "",
            f"{fidelity_note or ''}. Measured at export on validation tokens, float32:",
            "",
            "| tokens | max abs logit difference | same top-1 token | loss (ours) | loss (transformers) "
            "| ppl difference |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['tokens']} | {r['max_abs_logit_diff']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['loss']:.4f} | "
            f"{r['loss_hf']:.4f} | {100 * r['ppl_rel_diff']:+.3f}% |"
            for r in fidelity
        ]
        lines.append("")
    lines += [
        "## Training",
        "",
    ]
    if training:
        rows = [
            ("optimizer steps", training.get("steps")),
            ("tokens seen", f"{training['tokens']:,}" if training.get("tokens") is not None else None),
            ("final training loss", _fmt(training.get("loss"))),
            ("peak learning rate", _fmt(training.get("peak_lr"), ".3g")),
            ("final validation loss", _fmt(training.get("val_loss"))),
        ]
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    else:
        lines.append("No `train/metrics.jsonl` was found with the weights.")
    if data:
        lines += ["", f"Data: {data}."]
    lines += ["", "Model config (`pretrain` names):", "", "```json", _json(asdict(model_cfg)), "```", ""]
    lines += ["## Length extrapolation", ""]
    if results and results.get("models"):
        lines += _evaluation(results, results_match, plot_name)
    else:
        lines.append("The run has no `eval/results.json`: run `pretrain stage=eval` before exporting to add it here.")
    lines += ["", "## Tokenizer", "", tokenizer_check, ""]
    return "\n".join(lines)


def _evaluation(results: dict, results_match: bool, plot_name: str | None) -> list[str]:
    model = results["models"][0]
    seq = model["train_seq_len"]
    out = []
    if not results_match:
        out += [f"Note: this evaluation scored `{model.get('source')}`, not the exported weights.", ""]
    control = any("windowed_loss" in r for r in model["results"])
    out += [
        f"Perplexity on held-out validation text ({results.get('mode', 'nonoverlapping')} windows), at multiples "
        f"of the training length {seq}:",
        "",
    ]
    header = "| length | x train | loss | perplexity | tokens |"
    rule = "|---:|---:|---:|---:|---:|"
    if control:
        header += f" windowed loss ({seq}) | full - windowed |"
        rule += "---:|---:|"
    out += [header, rule]
    for r in model["results"]:
        row = f"| {r['length']} | {r['length'] / seq:g} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['tokens']:,} |"
        if control:
            row += f" {r.get('windowed_loss', float('nan')):.4f} | {r.get('loss_minus_windowed', float('nan')):+.4f} |"
        out.append(row)
    for s in model.get("skipped", []):
        out.append(f"| {s['length']} | skipped: {s['reason']} | | | |" + (" | |" if control else ""))
    if control:
        out += [
            "",
            f"The windowed control scores the same windows with attention limited to the last {seq} keys: a "
            "negative `full - windowed` means the model uses context beyond its training length.",
        ]
    if plot_name:
        out += ["", f"![perplexity against evaluation length]({plot_name})"]
    passkey = model.get("passkey")
    if passkey and passkey.get("cells"):
        out += [
            "",
            f"Passkey retrieval (a key hidden in filler text; {passkey['trials']} trials per cell, likelihood "
            f"against {passkey['distractors']} distractors, chance {passkey['chance']:.0%}): greedy "
            f"{passkey['greedy_accuracy']:.0%}, likelihood {passkey['likelihood_accuracy']:.0%} overall.",
            "",
            "| depth | " + " | ".join(str(n) for n in passkey["lengths"]) + " |",
            "|---:|" + "---:|" * len(passkey["lengths"]),
        ]
        for depth in passkey["depths"]:
            cells = {c["length"]: c for c in passkey["cells"] if c["depth"] == depth}
            row = [f"{cells[n]['greedy']:.0%} / {cells[n]['likelihood']:.0%}" for n in passkey["lengths"]]
            out.append(f"| {depth:g} | " + " | ".join(row) + " |")
        out.append("")
        out.append("(greedy / likelihood accuracy, by depth of the key and prompt length)")
    return out


def _fmt(value, spec: str = ".4f"):
    return None if value is None else format(value, spec)


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=2)
