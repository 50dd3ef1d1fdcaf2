"""The harness stage: EleutherAI's lm-evaluation-harness (``lm-eval``) on the export ``<run_dir>/hf/``.

``plan_harness`` runs, before any work (``pipeline.check_before_work``), every check that needs no model: lm-eval is
installed, ``harness.include_path`` is a folder, lm-eval knows every task name, the export exists or can be made,
each ``harness.compare`` run has results. ``run_harness`` then (on rank 0; the other ranks wait) exports first when
``hf/`` is missing or older than the weights, builds the tasks (their datasets load here, so one that cannot be
downloaded is one line before the model loads), loads the export with lm-eval's own ``hf`` model (transformers'
``AutoModelForCausalLM``: no code of ours in the model) and writes ``eval/harness.json``, the console table, the model
card's section and wandb's ``harness/<task>/<metric>``.

Lengths. lm-eval's ``hf`` model takes its longest input from the config (``n_positions``, ``max_position_embeddings``,
``n_ctx``), else the tokenizer's ``model_max_length``, else 2,048, and cuts longer inputs from the left (a warning in
its log; rolling perplexity tasks are windowed at that length). A BLOOM config has none of these and the export's
tokenizer says "no limit", so lm-eval would cut at 2,048. The stage passes ``max_length`` itself:
``harness.max_length``, or (null) a bound no input reaches, so every input is scored whole, ALiBi extrapolating;
the inputs longer than the training length are counted per task.

The first token of a text scored with no context (rolling perplexity) is conditioned by lm-eval on a prefix token,
``<s>`` by default; our model never saw ``<s>``: every training document follows ``</s>``, so that is the prefix.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path

from pretrain.config import Config, HarnessConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.export.run import ExportPlan, export_hf, export_refusal, export_source, plan_export
from pretrain.extras import MissingExtraError, install_hint, optional_import
from pretrain.harness.compare import compare_paths, write_comparison
from pretrain.harness.results import (
    format_table,
    input_lengths,
    length_lines,
    metric_rows,
    task_hashes,
    update_card,
    wandb_metrics,
    write_report,
    write_samples,
)
from pretrain.parallel.distributed import DistContext, run_on_main
from pretrain.run_files import RunFiles, file_sha256
from pretrain.train.weights import WEIGHTS, WEIGHTS_CHECKSUM

NEEDED_FOR = "stage=harness (EleutherAI's lm-evaluation-harness)"
# max_length handed to lm-eval when harness.max_length is null: longer than any input, so none is cut.
NO_LIMIT = 1 << 30
# Task index objects, built once per process (indexing lm-eval's ~15,000 built-in task files takes seconds).
_MANAGERS: dict[tuple[str | None, bool], object] = {}


def harness_requested(cfg: Config) -> bool:
    """``stage=harness``, or ``stage=all`` with ``harness.tasks``."""
    return cfg.stage == "harness" or (cfg.stage == "all" and bool(cfg.harness.tasks))


def plan_harness(cfg: Config) -> None:
    """Every check of the harness stage that needs no model (ConfigError, PipelineError, MissingExtraError), in
    the order of their cost; the task names last (lm-eval indexes its tasks)."""
    h = cfg.harness
    if cfg.stage == "harness" and not h.tasks and not h.compare:
        raise ConfigError(
            "stage=harness needs harness.tasks=[TASK, ...] (lm-eval task or group names, e.g. [hellaswag,arc_easy]) "
            "or harness.compare=[RUN_DIR, ...]"
        )
    compare_paths(cfg)
    if not h.tasks:
        return
    optional_import("lm_eval", NEEDED_FOR)  # light: its models load later (hf_model_class)
    if h.include_path is not None and not Path(h.include_path).expanduser().is_dir():
        raise PipelineError(
            f"harness.include_path={h.include_path!r} is not a folder; give a folder of lm-eval task YAMLs"
        )
    if cfg.stage == "all":
        reason = export_refusal(cfg)
        if reason is not None:
            raise ConfigError(f"harness.tasks scores the export, which this model cannot have: {reason}")
    else:
        export_to_make(cfg)
    hf_model_class()
    check_task_names(task_manager(h, h.tasks), h.tasks, h.include_path)


def hf_model_class():
    """lm-eval's ``HFLM``; MissingExtraError in one line when lm-eval, or a module its hf model needs, is missing."""
    optional_import("lm_eval", NEEDED_FOR)
    try:
        return optional_import("lm_eval.models.huggingface", NEEDED_FOR).HFLM
    except ModuleNotFoundError as err:  # lm-eval without its [hf] extra: transformers or accelerate is missing
        raise MissingExtraError(
            f"{NEEDED_FOR} needs {err.name}, which lm-eval's hf model imports and is not installed; it comes with the "
            f"'harness' extra: {install_hint('harness')}"
        ) from None


def export_to_make(cfg: Config) -> ExportPlan | None:
    """The export to write before scoring (raising the export's own one line when it cannot be made), or None when
    ``hf/`` is there and not older than the weights it comes from, or has no weights beside it to come from (an
    export copied here, or whose run's weights were removed: scored as it is). With ``export.checkpoint`` that
    checkpoint is always exported."""
    exported = RunFiles(cfg.run_dir).hf / "model.safetensors"
    if cfg.export.checkpoint is None and exported.is_file():
        try:
            source = export_source(cfg)
        except PipelineError:
            return None
        if exported.stat().st_mtime >= weights_mtime(source.weights_dir):
            return None
    return plan_export(cfg)


def weights_mtime(weights_dir: Path) -> float:
    """When the weights were written: their ``model.safetensors``, or the newest file of a DeepSpeed checkpoint."""
    final = Path(weights_dir) / WEIGHTS
    if final.is_file():
        return final.stat().st_mtime
    return max((p.stat().st_mtime for p in Path(weights_dir).rglob("*") if p.is_file()), default=0.0)


def task_manager(h: HarnessConfig, names: list[str], full: bool = False):
    """lm-eval's task index. When every name is a task of ``harness.include_path``, that folder alone is indexed
    (fast); otherwise lm-eval's built-in tasks too, the folder's winning over namesakes."""
    include = str(Path(h.include_path).expanduser().resolve()) if h.include_path else None
    tasks_module = optional_import("lm_eval.tasks", NEEDED_FOR)
    if include is not None and not full:
        local = _manager(tasks_module, include, defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return _manager(tasks_module, include, defaults=True)


def _manager(tasks_module, include: str | None, defaults: bool):
    key = (include, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = tasks_module.TaskManager(include_path=include, include_defaults=defaults)
    return _MANAGERS[key]


def check_task_names(manager, names: list[str], include_path: str | None) -> None:
    """PipelineError in one line naming the first task lm-eval does not know, with the closest names."""
    for name in names:
        if name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f"lm-eval {_version('lm_eval')}" + (
            f" or harness.include_path={include_path!r}" if include_path else ""
        )
        raise PipelineError(
            f"harness.tasks: {where} has no task, group or tag {name!r}; {hint}`lm-eval ls tasks` lists them "
            "(tasks of your own: harness.include_path=FOLDER of task YAMLs)"
        )


def load_tasks(h: HarnessConfig, names: list[str]) -> tuple[object, list]:
    """The tasks built (their datasets loaded) before the model is: ``(task index, [Task or Group, ...])``. A dataset
    that cannot be loaded is one line naming the task."""
    manager = task_manager(h, names)
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except KeyError:
            if manager is task_manager(h, names, full=True):
                raise
            # A local group naming built-in tasks: index those too.
            manager = task_manager(h, names, full=True)
            loaded = manager.load([name])
        except (OSError, ValueError) as err:  # datasets: ConnectionError offline, DatasetNotFoundError, bad files
            raise PipelineError(dataset_message(name, err)) from None
        group = loaded["groups"].get(name)
        built += [group] if group is not None else list(loaded["tasks"].values())
    return manager, built


def dataset_message(name: str, err: BaseException) -> str:
    detail = " ".join(str(err).split())[:300]
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true")]
    why = f" ({' and '.join(offline)} set)" if offline else ""
    return (
        f"harness task {name!r}: its dataset could not be loaded{why}: {type(err).__name__}: {detail}; download it "
        "once where the Hugging Face hub is reachable (it is cached, HF_HOME), or give a local copy as a task of "
        "harness.include_path (docs/eval.md, Downstream tasks)"
    )


def model_max_length(h: HarnessConfig, hf_config: dict) -> int:
    """The ``max_length`` lm-eval gets: ``harness.max_length``, else no limit, except an MPT export's
    ``max_seq_len``: transformers' MPT builds its ALiBi bias for that many positions and fails past it, so longer
    inputs are cut there (and counted)."""
    limits = [n for n in (h.max_length, hf_config.get("max_seq_len")) if isinstance(n, int) and n > 0]
    return min(limits, default=NO_LIMIT)


def run_harness(cfg: Config, ctx: DistContext, say=print, just_exported: bool = False) -> dict | None:
    """The stage on rank 0 while the other ranks wait (by a file: it may take hours); rank 0 returns the report.
    ``just_exported``: ``stage=all`` has just written ``hf/`` (no second export, even with ``export.checkpoint``)."""
    say = say if ctx.is_main else (lambda *args, **kwargs: None)
    files = RunFiles(cfg.run_dir)
    holder: dict = {}

    def work() -> str:
        holder["report"] = evaluate(cfg, ctx, say, just_exported)
        return "done"

    run_on_main(ctx, work, "run lm-evaluation-harness", wait_dir=files.eval_dir, waiting="lm-evaluation-harness")
    return holder.get("report")


def evaluate(cfg: Config, ctx: DistContext, say=print, just_exported: bool = False) -> dict | None:
    """Export if needed, score ``harness.tasks``, write what the stage leaves; then the comparison."""
    h = cfg.harness
    report = None
    if h.tasks:
        report = score_tasks(cfg, h.device or str(ctx.device), say, just_exported)
    write_comparison(cfg, report, say)
    return report


def score_tasks(cfg: Config, device: str, say, just_exported: bool = False) -> dict:
    h = cfg.harness
    files = RunFiles(cfg.run_dir)
    hf_cls = hf_model_class()
    plan = None if just_exported else export_to_make(cfg)
    if plan is not None:
        why = "missing" if not (files.hf / "model.safetensors").is_file() else "older than the weights"
        say(f"[harness] {files.hf} is {why}: exporting {plan.source.weights_dir} first")
        export_hf(cfg, plan, say)
    hf = files.hf.resolve()
    hf_config = json.loads((hf / "config.json").read_text())
    started = time.perf_counter()
    manager, tasks = load_tasks(h, list(h.tasks))
    names = [getattr(t, "task_name", None) or getattr(t, "name", "?") for t in tasks]
    say(f"[harness] tasks: {', '.join(names)} ({time.perf_counter() - started:.1f} s to build)")
    max_length = model_max_length(h, hf_config)
    lm = hf_cls(
        pretrained=str(hf),
        backend="causal",
        device=device,
        batch_size=h.batch_size,
        max_length=max_length,
        prefix_token_id=hf_config.get("eos_token_id"),
    )
    say(
        f"[harness] {hf} on {device}, batch size {h.batch_size}, "
        + (f"inputs cut at {max_length} tokens" if max_length < NO_LIMIT else "every input scored at its full length")
        + f" (trained at {hf_config.get('seq_length', '?')})"
    )
    limit = None if h.limit is None else (int(h.limit) if h.limit >= 1 else h.limit)
    simple_evaluate = optional_import("lm_eval.evaluator", NEEDED_FOR).simple_evaluate
    scoring = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=h.num_fewshot,
        limit=limit,
        batch_size=h.batch_size,
        device=device,
        task_manager=manager,
        log_samples=True,
        random_seed=h.seed,
        numpy_random_seed=h.seed,
        torch_random_seed=h.seed,
        fewshot_random_seed=h.seed,
    )
    seconds = time.perf_counter() - scoring
    if results is None:  # lm-eval returns results on its rank 0 only, which it also reads from LOCAL_RANK
        raise PipelineError(
            f"lm-evaluation-harness returned no results in this process (LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} "
            "in the environment makes it think it is not the first process); unset LOCAL_RANK and run again"
        )
    samples = results.pop("samples", {}) or {}
    output_types = {task: c.get("output_type") for task, c in results.get("configs", {}).items()}

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    report = {
        "model": {
            "hf": str(hf),
            "weights_sha256": file_sha256(hf / "model.safetensors"),
            "train_seq_len": hf_config.get("seq_length"),
            "parameters": results.get("config", {}).get("model_num_parameters"),
            "dtype": hf_config.get("dtype") or hf_config.get("torch_dtype"),
        },
        "checkpoint": checkpoint_evaluated(cfg, plan, hf),
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "tasks": list(h.tasks),
            "num_fewshot": h.num_fewshot,
            "limit": h.limit,
            "batch_size": h.batch_size,
            "include_path": None if h.include_path is None else str(Path(h.include_path).expanduser().resolve()),
            "device": device,
            "seed": h.seed,
            "max_length": None if max_length == NO_LIMIT else max_length,
            "prefix_token_id": hf_config.get("eos_token_id"),
        },
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("lm_eval", "lm_eval"),
                ("transformers", "transformers"),
                ("torch", "torch"),
                ("datasets", "datasets"),
                ("alibi_pretrain", "alibi-pretrain"),
            )
        },
        "task_hashes": task_hashes(samples),
        "lengths": input_lengths(samples, output_types, count_tokens, hf_config.get("seq_length"), max_length),
        "rows": [],
        "seconds": round(seconds, 3),
        "lm_eval": results,
    }
    report["rows"] = metric_rows(results)
    write_outputs(cfg, report, samples, say)
    return report


def write_outputs(cfg: Config, report: dict, samples: dict, say) -> None:
    """``eval/harness.json`` (and the samples), the console table, the model card's section and wandb."""
    files = RunFiles(cfg.run_dir)
    write_report(files.harness_results, report)
    for line in length_lines(report):
        say(f"[harness] {line}")
    say(f"[harness] {report['seconds']:.1f} s of scoring\n{format_table(report)}")
    where = [str(files.harness_results)]
    if cfg.harness.log_samples:
        write_samples(files.harness_samples, samples)
        where.append(f"{files.harness_samples}/")
    if update_card(Path(report["model"]["hf"]) / "README.md", report):
        where.append(f"the model card {Path(report['model']['hf']) / 'README.md'}")
    say(f"[harness] wrote {', '.join(where)}")
    if cfg.wandb.mode != "disabled":
        from pretrain.tracking import start_wandb

        run = start_wandb(cfg.wandb, cfg.run_dir)
        try:
            metrics = wandb_metrics(report)
            run.log(metrics)
            run.summary.update(metrics)
        finally:
            run.finish()


def checkpoint_evaluated(cfg: Config, plan: ExportPlan | None, hf: Path) -> dict:
    """The weights the export came from: the ones just exported, else the card's "exported from" line (the export
    states its source there), with their SHA-256 (from the checksum file beside them) and training step."""
    weights = str(plan.source.weights_dir) if plan is not None else None
    if weights is None and (hf / "README.md").is_file():
        found = re.search(r"\| exported from \| `([^`]*)` \|", (hf / "README.md").read_text(encoding="utf-8"))
        weights = found.group(1) if found else None
    out: dict = {"weights": weights, "weights_sha256": None, "step": None, "exported": None}
    out["exported"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((hf / "model.safetensors").stat().st_mtime))
    if weights is None:
        return out
    path = Path(weights)
    checksum = path / WEIGHTS_CHECKSUM
    if checksum.is_file():
        out["weights_sha256"] = checksum.read_text().split()[0]
    step = re.fullmatch(r"step_0*(\d+)", path.name)
    if step:
        out["step"] = int(step.group(1))
    elif (path / WEIGHTS).is_file():
        metrics = path.parent / "train" / "metrics.jsonl" if path.name == "checkpoints" else None
        out["step"] = _last_step(metrics) if metrics is not None else None
    return out


def _last_step(metrics: Path) -> int | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def command_line() -> str:
    """The command as typed (its overrides, as Hydra read them)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return " ".join(["pretrain", *HydraConfig.get().overrides.task])
    except ImportError:
        pass
    return " ".join(["pretrain", *sys.argv[1:]])


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
