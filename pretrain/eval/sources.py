"""Which models the evaluation stage scores, and loading them: the run's final weights or ``eval.checkpoint``
(a run directory, its ``checkpoints/``, the weights file, or one DeepSpeed checkpoint of a run still
training), then every ``eval.compare`` run. Every path is checked before any work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import Config, ModelConfig, select_multiple
from pretrain.errors import PipelineError
from pretrain.model.gpt import GPT
from pretrain.run_files import RunFiles
from pretrain.train.checkpoint import complete_tags
from pretrain.train.weights import (
    MODEL_CONFIG,
    WEIGHTS,
    checkpoint_model_config,
    is_checkpoint,
    load_weights,
    model_config,
)


@dataclass(frozen=True)
class ModelSource:
    """Where one evaluated model's weights are, and the config key that named them (for messages)."""

    name: str
    weights_dir: Path  # holds model.safetensors and model_config.json, or is one DeepSpeed checkpoint (step_*)
    run_dir: Path | None  # the run the weights belong to, when known
    key: str


def _weights_dir(path: Path) -> Path | None:
    """The directory holding the final weights for a run directory, a checkpoints directory or the file; or
    ``path`` itself when it is one DeepSpeed checkpoint (of a run still training, or stopped early)."""
    if is_checkpoint(path):
        return path
    if path.is_file() and path.name == WEIGHTS:
        return path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    return None


def resolve_sources(cfg: Config) -> list[ModelSource]:
    """The models to evaluate, in order: ``eval.checkpoint`` or the run's own weights, then ``eval.compare``.

    Every path is checked before any work; a missing one raises a PipelineError that names its key.
    """
    ecfg = cfg.eval
    run_dir = Path(cfg.run_dir)
    sources: list[ModelSource] = []
    if ecfg.checkpoint is not None:
        sources.append(checkpoint_source(ecfg.checkpoint, "eval.checkpoint"))
    elif (multiple := select_multiple(ecfg.select)) is not None:
        best = best_checkpoint(run_dir, multiple)
        sources.append(ModelSource(_name(best), best, run_dir, "eval.select"))
    else:
        found = _weights_dir(RunFiles(run_dir).checkpoints)
        if found is not None:
            sources.append(ModelSource(_name(run_dir), found, run_dir, "run_dir"))
        elif not ecfg.compare:
            raise PipelineError(
                f"no trained weights in {run_dir / 'checkpoints' / WEIGHTS}: train first (stage=train or stage=all "
                f"with this run_dir), or give eval.checkpoint=PATH or eval.compare=[RUN_DIR, ...]"
                f"{_newest_checkpoint(run_dir)}"
            )
    for entry in ecfg.compare:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise PipelineError(f"eval.compare: {entry!r} is not a directory (give run directories)")
        found = _weights_dir(path)
        if found is None or not (found / MODEL_CONFIG).is_file():
            raise PipelineError(
                f"eval.compare: {entry!r} has no trained weights ({path / 'checkpoints' / WEIGHTS} and "
                f"{MODEL_CONFIG}); train it first: pretrain stage=train run_dir={entry}"
            )
        owner = found.parent if found.name == "checkpoints" else path
        sources.append(ModelSource(_name(owner), found, owner, "eval.compare"))
    return _unique_names(sources)


def best_checkpoint(run_dir: Path, multiple: int) -> Path:
    """The kept checkpoint of ``run_dir`` with the lowest validation perplexity at ``multiple`` x the training length
    (``ppl@{multiple}x`` in ``train/val.jsonl``, logged at that checkpoint's step); PipelineError when there is none."""
    files = RunFiles(run_dir)
    key = f"ppl@{multiple}x"
    scored = {}
    if files.validation.is_file():
        for line in files.validation.read_text().splitlines():
            row = json.loads(line)
            if key in row:
                scored[row["step"]] = row[key]
    candidates = [
        (scored[int(tag.removeprefix("step_"))], tag)
        for tag in complete_tags(files.checkpoints)
        if int(tag.removeprefix("step_")) in scored
    ]
    if not candidates:
        raise PipelineError(
            f"eval.select=best_at:{multiple}: no kept checkpoint of {run_dir} has {key} in {files.validation} (train "
            f"with train.eval_lengths holding {multiple}, and train.ckpt_every a multiple of train.eval_every; "
            "train.keep_last checkpoints are kept)"
        )
    _, tag = min(candidates)
    best = files.checkpoints / tag
    checkpoint_model_config(best, f"eval.select=best_at:{multiple}")
    return best


def checkpoint_source(value: str, key: str) -> ModelSource:
    """The weights a setting ``key`` (``eval.checkpoint``, ``export.checkpoint``, ...) names: a run directory, its
    checkpoints/ directory, the weights file or one DeepSpeed checkpoint. Checked before any work; a PipelineError
    that names ``key`` when they cannot be used."""
    path = Path(value).expanduser()
    if not path.exists():
        raise PipelineError(f"{key}={value!r}: no such file or directory")
    found = _weights_dir(path)
    if found is None:
        raise PipelineError(
            f"{key}={value!r} holds no {WEIGHTS}: give a run directory, its checkpoints/ "
            f"directory, the {WEIGHTS} file the train stage writes at its end, or one checkpoint "
            f"(checkpoints/step_NNNNNNNN){_newest_checkpoint(path, key)}"
        )
    if is_checkpoint(found):  # an unfinished save, or one without its model config, fails here: before any work
        checkpoint_model_config(found, f"{key}={value!r}")
    elif not (found / MODEL_CONFIG).is_file():
        raise PipelineError(f"{key}={value!r}: {found / MODEL_CONFIG} is missing")
    owner = found.parent if found.name == "checkpoints" else None
    return ModelSource(_name(owner or found), found, owner, key)


def _newest_checkpoint(path: Path, key: str = "eval.checkpoint") -> str:
    """A hint naming the newest complete checkpoint of a run (or checkpoints directory) without final weights yet."""
    for candidate in (path, path / "checkpoints"):
        if tags := complete_tags(candidate):
            verb = {"eval.checkpoint": "evaluate", "export.checkpoint": "export"}.get(key, "use")
            return f"; to {verb} a run still training, give a checkpoint: {key}={candidate / tags[-1]}"
    return ""


def _name(path: Path) -> str:
    if is_checkpoint(path) and path.parent.name == "checkpoints":  # which run, and which step of it
        return f"{_name(path.parent.parent)}/{path.name}"
    return path.resolve().name or str(path)


def _unique_names(sources: list[ModelSource]) -> list[ModelSource]:
    seen: dict[str, int] = {}
    out = []
    for source in sources:
        count = seen.get(source.name, 0)
        seen[source.name] = count + 1
        name = source.name if count == 0 else f"{source.name}-{count + 1}"
        out.append(ModelSource(name, source.weights_dir, source.run_dir, source.key))
    return out


def load_model(source: ModelSource, corpus, device: torch.device) -> tuple[GPT, ModelConfig]:
    """The model of ``source`` in eval mode on ``device``; its vocabulary and tokenizer must be the corpus's."""
    model_cfg, state = load_weights(source.weights_dir)
    where = f"{source.key}: {source.weights_dir}"
    if model_cfg.vocab_size != corpus.vocab_size:
        raise PipelineError(
            f"{where} holds a model of vocabulary {model_cfg.vocab_size}, but these data.* settings give a "
            f"tokenizer of {corpus.vocab_size}: evaluate it with the data.* settings it was trained with"
        )
    if source.key == "eval.compare" and source.run_dir is not None:
        tokenizer = RunFiles(source.run_dir).tokenizer
        if tokenizer.is_file() and tokenizer.read_bytes() != Path(corpus.tokenizer_path).read_bytes():
            raise PipelineError(
                f"{where} was trained with another tokenizer ({tokenizer}) than these data.* settings give: "
                "runs compared on the same windows must share one prepared corpus"
            )
    model = GPT(model_cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), model_cfg


def source_model_config(source: ModelSource) -> ModelConfig:
    """The model config of ``source`` without loading its weights."""
    return model_config(source.weights_dir)
