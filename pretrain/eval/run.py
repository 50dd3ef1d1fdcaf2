"""The evaluation stage (``stage=eval``): how well trained models extrapolate past their training length.

For each model (the run's final weights, or ``eval.checkpoint``, plus every ``eval.compare`` run) and each
length in ``eval.lengths``, the validation split is cut into windows (``pretrain.eval.windows``: non-overlapping
or sliding) and every scored prediction's cross-entropy is summed. Reported per length: loss, perplexity,
tokens scored; with ``eval.window_control`` also the loss of the same predictions with attention limited to
the model's training length, and the difference (does the model use context beyond what it was trained
on?); and the loss by position inside the window. Then passkey retrieval (``pretrain.eval.passkey``).

Nothing L x L is built: attention is the fused kernel, logits are formed a few thousand rows at a time from
the final hidden states, and each length runs ``eval.batch_tokens // L`` windows per forward pass. Under
several ranks the windows and passkey trials are dealt out round-robin and the sums all-reduced, so the
numbers do not depend on the number of ranks. With ``parallel.sp_size=P > 1`` each window is split over the P
ranks of a sequence-parallel group instead (Ulysses or ring attention, global positions, as in training):
every rank scores the predictions of its shard, the windows are dealt out over the world / P groups, and the
same sums are all-reduced, so a length too long for one rank's memory can be scored on P. Passkey prompts stay
whole on one rank (dealt over all ranks): only their last logits are needed. Rank 0 writes
``<run_dir>/eval/``: ``results.json``, ``ppl_vs_length.png``, ``loss_vs_position.png``, ``passkey.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.config import Config, EvalConfig, ModelConfig, ParallelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.eval.windows import Window, WindowError, default_stride, make_windows, shard, shared_region
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext, ParallelGroups, build_parallel_groups
from pretrain.parallel.sequence_parallel import (
    SequenceLayout,
    check_world_split,
    sequence_parallel_attention,
    sequence_parts,
)
from pretrain.perf.memory import MIB, peak_memory_meter, reset_rss_high_water_mark
from pretrain.train.checkpoint import (
    MODEL_CONFIG,
    WEIGHTS,
    checkpoint_model_config,
    complete_tags,
    is_checkpoint,
    load_weights,
    model_config,
)

EVAL_DIR = "eval"
RESULTS_FILE = "results.json"
# eval.lengths=null: these multiples of the training length; eval.passkey_lengths=null: these.
LENGTH_MULTIPLES = (1, 2, 4, 8, 16, 32)
PASSKEY_MULTIPLES = (1, 2, 4, 8)
# Rows of logits formed at once from the hidden states: [4096, vocab] float32 is 128 MiB at vocab 8192.
LOGIT_ROWS = 4096


# ---------------------------------------------------------------- which models


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
        path = Path(ecfg.checkpoint).expanduser()
        if not path.exists():
            raise PipelineError(f"eval.checkpoint={ecfg.checkpoint!r}: no such file or directory")
        found = _weights_dir(path)
        if found is None:
            raise PipelineError(
                f"eval.checkpoint={ecfg.checkpoint!r} holds no {WEIGHTS}: give a run directory, its checkpoints/ "
                f"directory, the {WEIGHTS} file the train stage writes at its end, or one checkpoint "
                f"(checkpoints/step_NNNNNNNN){_newest_checkpoint(path)}"
            )
        if is_checkpoint(found):  # an unfinished save, or one without its model config, fails here: before any work
            checkpoint_model_config(found, f"eval.checkpoint={ecfg.checkpoint!r}")
        elif not (found / MODEL_CONFIG).is_file():
            raise PipelineError(f"eval.checkpoint={ecfg.checkpoint!r}: {found / MODEL_CONFIG} is missing")
        owner = found.parent if found.name == "checkpoints" else None
        sources.append(ModelSource(_name(owner or found), found, owner, "eval.checkpoint"))
    else:
        found = _weights_dir(run_dir / "checkpoints")
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


def _newest_checkpoint(path: Path) -> str:
    """A hint naming the newest complete checkpoint of a run (or checkpoints directory) without final weights yet."""
    for candidate in (path, path / "checkpoints"):
        if tags := complete_tags(candidate):
            return f"; to evaluate a run still training, give a checkpoint: eval.checkpoint={candidate / tags[-1]}"
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
        tokenizer = source.run_dir / "tokenizer" / "spm.model"
        if tokenizer.is_file() and tokenizer.read_bytes() != Path(corpus.tokenizer_path).read_bytes():
            raise PipelineError(
                f"{where} was trained with another tokenizer ({tokenizer}) than these data.* settings give: "
                "runs compared on the same windows must share one prepared corpus"
            )
    model = GPT(model_cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), model_cfg


# ---------------------------------------------------------------- scoring windows


def token_losses(
    model: GPT, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of every prediction, float32 ``[B, L]``, from int64 ``inputs``/``targets`` ``[B, L]``.

    ``positions`` ``[L]``: the global positions of a sequence-parallel shard (the installed attention then
    sees the rest of the window through its group). The logits are formed ``LOGIT_ROWS`` rows at a time: a
    ``[B * L, vocab]`` tensor would dominate memory at long lengths.
    """
    hidden = model.hidden_states(inputs, positions=positions)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], LOGIT_ROWS):
        end = start + LOGIT_ROWS
        logits = F.linear(rows[start:end], model.word_embeddings.weight).float()  # the tied head
        out[start:end] = F.cross_entropy(logits, flat_targets[start:end], reduction="none")
    return out.view(targets.shape)


@dataclass
class Scores:
    """Sums over the scored predictions of a set of windows of one length, in float64 (so a sum over ranks is
    the one-rank sum up to rounding)."""

    length: int
    loss_sum: float = 0.0
    tokens: int = 0
    position_loss: np.ndarray = field(default=None)  # [length] loss summed by position in the window
    position_tokens: np.ndarray = field(default=None)  # [length] predictions scored at each position

    def __post_init__(self) -> None:
        if self.position_loss is None:
            self.position_loss = np.zeros(self.length, dtype=np.float64)
        if self.position_tokens is None:
            self.position_tokens = np.zeros(self.length, dtype=np.int64)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    def all_reduce(self, ctx: DistContext) -> Scores:
        if ctx.world_size > 1:
            packed = torch.from_numpy(
                np.concatenate([[self.loss_sum, self.tokens], self.position_loss, self.position_tokens])
            ).to(ctx.device, torch.float64)  # NCCL reduces only device tensors
            dist.all_reduce(packed)
            values = packed.cpu().numpy()
            self.loss_sum, self.tokens = float(values[0]), int(round(values[1]))
            self.position_loss = values[2 : 2 + self.length].copy()
            self.position_tokens = np.rint(values[2 + self.length :]).astype(np.int64)
        return self


def score_windows(
    tokens: np.ndarray,
    windows: list[Window],
    losses_fn,
    batch_size: int,
    device="cpu",
    layout: SequenceLayout | None = None,
) -> Scores:
    """Sum the scored predictions of ``windows`` over the token stream ``tokens`` ``[n]``.

    ``losses_fn(inputs, targets)`` maps int64 ``[B, L]`` to per-prediction losses ``[B, L]``; windows run
    ``batch_size`` at a time. Only positions ``window.score_from ..`` count. With a sequence-parallel
    ``layout``, ``losses_fn(inputs, targets, positions)`` gets this rank's shard of each window and only its
    predictions are summed (each at its position in the window): the group's sums add up to the whole windows'.
    """
    assert windows, "no windows to score"
    length = windows[0].length
    scores = Scores(length)
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
        for w, row in zip(batch, losses.double().cpu().numpy()):
            scored = positions >= w.score_from
            scores.loss_sum += float(row[scored].sum())
            scores.tokens += int(scored.sum())
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


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# ---------------------------------------------------------------- how the ranks share the work


@dataclass(frozen=True)
class EvalSplit:
    """Windows dealt round-robin over the data-parallel groups; with ``sp_size > 1`` each window's tokens split
    over the ranks of a sequence-parallel group (``parallel.sp_mode``, ``parallel.zigzag``)."""

    groups: ParallelGroups
    mode: str = "ulysses"
    zigzag: bool = False

    @property
    def sequence_parallel(self) -> bool:
        return self.groups.sp_size > 1

    def windows(self, windows: list[Window]) -> list[Window]:
        """This rank's windows: every rank of a sequence-parallel group gets the same ones."""
        return shard(windows, self.groups.dp_rank, self.groups.dp_size)

    def batch_size(self, batch_tokens: int, length: int) -> int:
        """Windows per forward pass: each rank holds ``length / sp_size`` tokens of each, at most ``batch_tokens``
        in all (and at least one window)."""
        return max(1, batch_tokens * self.groups.sp_size // length)

    @contextmanager
    def layout(self, model: GPT, length: int) -> Iterator[SequenceLayout | None]:
        """The sequence-parallel attention installed for windows of ``length`` (None without sequence parallelism)."""
        if not self.sequence_parallel:
            yield None
            return
        with sequence_parallel_attention(model, self.groups.sp_group, self.mode, length, self.zigzag) as layout:
            yield layout

    def describe(self) -> dict:
        return {
            "sp_size": self.groups.sp_size,
            "sp_mode": self.mode if self.sequence_parallel else None,
            "zigzag": self.sequence_parallel and self.mode == "ring" and self.zigzag,
            "data_parallel_groups": self.groups.dp_size,
        }


def check_eval_split(lengths: list[int], explicit: bool, seq_len: int, heads: dict[str, int], pcfg, world_size: int):
    """Raise ConfigError, before any work, when ``parallel.*`` cannot split the eval windows.

    Every length must cut into equal chunks (a multiple of ``sp_size``, or ``2 * sp_size`` for the zigzag ring);
    a length that cannot is an error, not a skip: the user asked for it, and a curve silently missing a point
    reads as a result. ``heads`` maps each evaluated model's name to its head count (Ulysses splits heads).
    """
    if pcfg.sp_size == 1:
        return
    parts = sequence_parts(pcfg.sp_size, pcfg.sp_mode, pcfg.zigzag)
    bad = [length for length in lengths if length % parts]
    if bad:
        if parts == pcfg.sp_size:
            rule = f"a multiple of parallel.sp_size={pcfg.sp_size} ({pcfg.sp_mode}: one equal chunk per rank)"
        else:
            rule = f"a multiple of 2 * parallel.sp_size = {parts} (zigzag ring: two equal chunks per rank)"
        multiples = ", ".join(map(str, LENGTH_MULTIPLES))
        where = (
            "eval.lengths holds"
            if explicit
            else f"the default eval lengths (model.seq_len={seq_len} x {multiples}) hold"
        )
        near = " or ".join(str(n) for n in (bad[0] // parts * parts, -(-bad[0] // parts) * parts) if n > 0)
        listed = ", ".join(map(str, bad))
        raise ConfigError(
            f"{where} {listed}: with each window split over {pcfg.sp_size} ranks every eval length must be {rule}; "
            f"for {bad[0]} use {near} (or parallel=none to score whole windows on each rank)"
        )
    if pcfg.sp_mode == "ulysses":
        for name, n_head in heads.items():
            if n_head % pcfg.sp_size:
                raise ConfigError(
                    f"{name} has model.n_head={n_head}, not divisible by parallel.sp_size={pcfg.sp_size}; Ulysses "
                    "gives each rank n_head / sp_size whole heads (use parallel.sp_mode=ring, or another sp_size)"
                )
    check_world_split(world_size, pcfg.sp_size)


def make_split(pcfg: ParallelConfig, ctx: DistContext) -> EvalSplit:
    """The process groups of ``parallel.*`` (the train stage's, when it ran in this process)."""
    return EvalSplit(build_parallel_groups(ctx, pcfg.sp_size), pcfg.sp_mode, pcfg.zigzag)


# ---------------------------------------------------------------- one model, every length


def eval_lengths(cfg: Config) -> list[int]:
    """``eval.lengths``, or the training length times 1, 2, 4, 8, 16, 32; the sliding stride checked against each."""
    lengths = sorted(set(cfg.eval.lengths or [cfg.model.seq_len * m for m in LENGTH_MULTIPLES]))
    if cfg.eval.mode == "sliding" and cfg.eval.stride is not None:
        short = [length for length in lengths if cfg.eval.stride >= length]
        if short:
            raise ConfigError(
                f"eval.stride={cfg.eval.stride} is not allowed: it must be smaller than every eval length, and "
                f"the lengths include {short[0]} (eval.lengths=null: model.seq_len={cfg.model.seq_len} times "
                f"{', '.join(map(str, LENGTH_MULTIPLES))})"
            )
    return lengths


def max_positions(model_cfg: ModelConfig) -> int | None:
    """The longest input a model can read: a learned table has its rows; other encodings have no limit."""
    return (model_cfg.max_positions or model_cfg.seq_len) if model_cfg.pos_encoding == "learned" else None


def score_length(
    model: GPT, tokens, windows, length: int, batch_size: int, window: int | None, ctx, layout=None
) -> Scores:
    """This rank's windows of one length scored (attention limited to ``window`` keys when set), summed over ranks.

    Under sequence parallelism (``layout``) this rank scores its shard of each window; the sum over all ranks
    is still each window scored once.
    """
    device = next(model.parameters()).device
    model.set_attention_window(window)
    try:
        with torch.inference_mode():
            losses_fn = partial(token_losses, model)
            local = score_windows(tokens, windows, losses_fn, batch_size, device, layout) if windows else Scores(length)
    finally:
        model.set_attention_window(None)
    return local.all_reduce(ctx)


def evaluate_model(
    model: GPT, model_cfg: ModelConfig, tokens: np.ndarray, ecfg: EvalConfig, lengths, ctx, say, split: EvalSplit
):
    """Score one model at every length: ``(results, skipped, loss_by_position)`` as results.json holds them."""
    results, skipped, by_position = [], [], []
    limit = max_positions(model_cfg)
    _warm_up(model, split, limit)
    # Under eval.max_tokens, regions of the longest length: every length scores the same tokens.
    region = shared_region(lengths, len(tokens))
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
        try:
            windows = make_windows(ecfg.mode, len(tokens), length, stride, ecfg.max_tokens, region)
        except WindowError as err:
            reason = f"the validation split is too short: {err}"
            skipped.append({"length": length, "reason": reason})
            say(f"  warning: length {length} skipped: {reason} (raise data.val_fraction or lower eval.lengths)")
            continue
        batch_size = split.batch_size(ecfg.batch_tokens, length)
        mine = split.windows(windows)
        started = time.perf_counter()
        meter = _memory_meter(model)
        with split.layout(model, length) as layout:
            full, windowed = _score_both(model, model_cfg, tokens, mine, length, batch_size, ecfg, ctx, layout)
        entry = {
            "length": length,
            "loss": full.loss,
            "ppl": ppl(full.loss),
            "tokens": full.tokens,
            "windows": len(windows),
            "min_context": length - windows[0].n_scored + 1,
        }
        if stride is not None:
            entry["stride"] = stride
        entry["peak_mib"] = _peak_mib(meter, ctx)
        curve = {"length": length, "bins": binned_positions(full)}
        if windowed is not None:
            entry.update(
                windowed_loss=windowed.loss,
                windowed_ppl=ppl(windowed.loss),
                loss_minus_windowed=full.loss - windowed.loss,
            )
            for item, wbin in zip(curve["bins"], binned_positions(windowed)):
                item["windowed_loss"] = wbin["loss"]
        seconds = time.perf_counter() - started
        entry["seconds"] = round(seconds, 3)
        results.append(entry)
        by_position.append(curve)
        note = f", windowed {entry['windowed_loss']:.4f}" if ecfg.window_control else ""
        say(
            f"  length {length:>6}: loss {full.loss:.4f} (ppl {ppl(full.loss):.2f}{note}), {full.tokens:,} tokens "
            f"in {len(windows)} windows, {seconds:.1f} s"
        )
    return results, skipped, by_position


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
    if ctx.world_size > 1:
        peak = peak.to(ctx.device)  # NCCL reduces only device tensors
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return None if peak.item() < 0 else round(peak.item(), 1)


def _score_both(model, model_cfg, tokens, windows, length, batch_size, ecfg, ctx, layout):
    """The full-context scores of one length and, with ``eval.window_control``, the windowed ones (else None)."""
    full = score_length(model, tokens, windows, length, batch_size, None, ctx, layout)
    if not ecfg.window_control:
        return full, None
    # Within the training length the window changes nothing: the same numbers, not computed twice.
    if length <= model_cfg.seq_len:
        return full, full
    return full, score_length(model, tokens, windows, length, batch_size, model_cfg.seq_len, ctx, layout)


# ---------------------------------------------------------------- passkey


def passkey_lengths(cfg: Config, encode) -> tuple[list[int], list[dict]]:
    """The passkey lengths to run and those skipped (too short for the prompt); explicit ones must all fit."""
    from pretrain.eval.passkey import min_length

    shortest = min_length(encode)
    if cfg.eval.passkey_lengths:
        lengths = sorted(set(cfg.eval.passkey_lengths))
        if lengths[0] < shortest:
            raise ConfigError(
                f"eval.passkey_lengths holds {lengths[0]}: a passkey prompt needs at least {shortest} tokens with "
                "this tokenizer (instruction, key line, question, answer)"
            )
        return lengths, []
    lengths = [cfg.model.seq_len * m for m in PASSKEY_MULTIPLES]
    skipped = [
        {"length": n, "reason": f"a passkey prompt needs at least {shortest} tokens with this tokenizer"}
        for n in lengths
        if n < shortest
    ]
    return [n for n in lengths if n >= shortest], skipped


def evaluate_passkey(model: GPT, model_cfg: ModelConfig, encode, lengths, too_short, ecfg: EvalConfig, ctx, say):
    """Accuracy per (length, depth) over ``eval.passkey_trials`` seeded trials, greedy and by likelihood."""
    from pretrain.eval.passkey import answer_text, distractor_keys, make_prompt, random_key, score_candidates, trial_rng

    device = next(model.parameters()).device
    limit = max_positions(model_cfg)
    depths = list(ecfg.passkey_depths)
    skipped = list(too_short)
    run = []
    for length in lengths:
        if limit is not None and length > limit:
            skipped.append({"length": length, "reason": f"model.pos_encoding=learned has {limit} position rows"})
        else:
            run.append(length)
    jobs = [(li, di, t) for li in range(len(run)) for di in range(len(depths)) for t in range(ecfg.passkey_trials)]
    counts = torch.zeros(len(run), len(depths), 3, dtype=torch.float64)  # greedy, likelihood, key depth
    started = time.perf_counter()

    def logits_fn(n):
        def last_logits(ids):
            hidden = model.hidden_states(ids)[:, -n:]
            return F.linear(hidden, model.word_embeddings.weight)

        return last_logits

    with torch.inference_mode():
        for li, di, t in shard(jobs, ctx.rank, ctx.world_size):
            length, depth = run[li], depths[di]
            rng = trial_rng(ecfg.seed, length, di, t)
            key = random_key(rng)
            try:
                prompt = make_prompt(encode, length, depth, key)
                wrong = distractor_keys(encode, rng, key, ecfg.passkey_distractors)
            except ValueError as err:
                raise PipelineError(f"passkey retrieval at eval.passkey_lengths {length}: {err}") from None
            answers = [prompt.answer] + [encode(answer_text(k)) for k in wrong]
            scores, greedy = score_candidates(logits_fn(len(prompt.answer)), prompt.tokens, answers, device)
            counts[li, di, 0] += float(greedy)
            counts[li, di, 1] += float(scores[0] > scores[1:].max())
            counts[li, di, 2] += prompt.key_offset / prompt.filler_tokens
    if ctx.world_size > 1:
        counts = counts.to(ctx.device)  # NCCL reduces only device tensors
        dist.all_reduce(counts)
        counts = counts.cpu()
    trials = ecfg.passkey_trials
    cells = [
        {
            "length": length,
            "depth": depth,
            "greedy": counts[li, di, 0].item() / trials,
            "likelihood": counts[li, di, 1].item() / trials,
            "key_depth": counts[li, di, 2].item() / trials,
            "trials": trials,
        }
        for li, length in enumerate(run)
        for di, depth in enumerate(depths)
    ]
    total = max(1, len(cells) * trials)
    out = {
        "lengths": run,
        "depths": depths,
        "trials": trials,
        "distractors": ecfg.passkey_distractors,
        "chance": 1.0 / (ecfg.passkey_distractors + 1),
        "greedy_accuracy": counts[..., 0].sum().item() / total,
        "likelihood_accuracy": counts[..., 1].sum().item() / total,
        "cells": cells,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    say(
        f"  passkey: greedy {out['greedy_accuracy']:.0%}, likelihood {out['likelihood_accuracy']:.0%} "
        f"(chance {out['chance']:.0%}) over {len(cells)} cells x {trials} trials, {out['seconds']:.1f} s"
    )
    return out


# ---------------------------------------------------------------- the stage


def run_eval(cfg: Config, ctx: DistContext, corpus) -> dict:
    """Evaluate the run's model (and ``eval.compare`` runs) on the validation split; rank 0 writes ``eval/``."""
    from pretrain.data.tokenizer import load_tokenizer

    say = print if ctx.is_main else (lambda *args, **kwargs: None)
    ecfg = cfg.eval
    sources = resolve_sources(cfg)  # every path checked before any work
    primary_cfg = _model_config(sources[0])
    # The lengths follow the (first) evaluated model's training length, not the command line's model.*.
    cfg = _with_seq_len(cfg, primary_cfg.seq_len)
    lengths = eval_lengths(cfg)
    heads = {f"{s.name} ({s.key})": _model_config(s).n_head for s in sources}
    check_eval_split(lengths, bool(ecfg.lengths), primary_cfg.seq_len, heads, cfg.parallel, ctx.world_size)
    split = make_split(cfg.parallel, ctx)
    sp = load_tokenizer(corpus.tokenizer_path)
    encode = sp.encode
    if ecfg.passkey:
        pk_lengths, pk_too_short = passkey_lengths(cfg, encode)
    tokens = corpus.tokens("val")
    started = time.perf_counter()
    stride_note = f", stride {ecfg.stride or 'L/2'}" if ecfg.mode == "sliding" else ""
    cap = "all" if ecfg.max_tokens is None else f"at most {ecfg.max_tokens:,}"
    say(
        f"[eval] {len(sources)} model(s) at lengths {', '.join(map(str, lengths))}; {ecfg.mode} windows{stride_note}; "
        f"{cap} of the {len(tokens):,} validation tokens scored per length"
        + ("; windowed control on" if ecfg.window_control else "")
    )
    if split.sequence_parallel:
        groups = split.groups
        say(
            f"[eval] each window split over {groups.sp_size} ranks ({split.mode}"
            + (", zigzag" if split.describe()["zigzag"] else "")
            + f"), windows dealt over {groups.dp_size} group(s); passkey prompts stay whole on each rank"
        )
    models = []
    for source in sources:
        model, model_cfg = load_model(source, corpus, ctx.device)
        say(
            f"[eval] {source.name}: {model_cfg.pos_encoding} positions, trained at seq_len {model_cfg.seq_len}, "
            f"{model.num_parameters() / 1e6:.2f}M parameters ({source.weights_dir})"
        )
        results, skipped, by_position = evaluate_model(model, model_cfg, tokens, ecfg, lengths, ctx, say, split)
        entry = {
            "name": source.name,
            "source": str(source.weights_dir),
            "pos_encoding": model_cfg.pos_encoding,
            "train_seq_len": model_cfg.seq_len,
            "parameters": model.num_parameters(),
            "results": results,
            "skipped": skipped,
            "loss_by_position": by_position,
        }
        if ecfg.passkey:
            entry["passkey"] = evaluate_passkey(model, model_cfg, encode, pk_lengths, pk_too_short, ecfg, ctx, say)
        models.append(entry)
        del model
    if not any(m["results"] for m in models):
        reasons = sorted({s["reason"] for m in models for s in m["skipped"]})
        raise PipelineError(f"no eval length could be scored: {'; '.join(reasons[:3])}; check eval.lengths")
    primary = models[0]
    report = {
        "train_seq_len": primary["train_seq_len"],
        "mode": ecfg.mode,
        "results": primary["results"],
        "skipped": primary["skipped"],
        "model": primary["name"],
        "models": models,
        "settings": {
            "lengths": lengths,
            "stride": ecfg.stride,
            "max_tokens": ecfg.max_tokens,
            "batch_tokens": ecfg.batch_tokens,
            "window_control": ecfg.window_control,
            "world_size": ctx.world_size,
            "sequence_parallel": split.describe(),
        },
        "validation_tokens": len(tokens),
        "corpus": str(corpus.directory),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if "passkey" in primary:
        report["passkey"] = primary["passkey"]
    if ctx.is_main:
        write_outputs(cfg, report, say)
    ctx.barrier()
    return report


def _model_config(source: ModelSource) -> ModelConfig:
    return model_config(source.weights_dir)


def _with_seq_len(cfg: Config, seq_len: int) -> Config:
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, seq_len=seq_len))


def write_outputs(cfg: Config, report: dict, say) -> None:
    """``results.json``, the plots, the console table and (when enabled) wandb. Rank 0 only."""
    from pretrain.eval.plots import plot_loss_vs_position, plot_passkey, plot_ppl_vs_length

    out_dir = Path(cfg.run_dir) / EVAL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    partial = path.with_name(f".{RESULTS_FILE}.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)
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
    for model in report["models"]:
        control = any("windowed_loss" in r for r in model["results"])
        lines.append(f"\n{_label(model)}, {report['mode']} windows")
        header = f"{'length':>7} {'x train':>7} {'loss':>7} {'ppl':>9} {'tokens':>9}"
        if control:
            header += f" {'windowed':>9} {'full-windowed':>14}"
        lines += [header, "-" * len(header)]
        for r in model["results"]:
            row = (
                f"{r['length']:>7} {r['length'] / model['train_seq_len']:>7.3g} {r['loss']:>7.4f} {r['ppl']:>9.2f} "
                f"{r['tokens']:>9,}"
            )
            if control:
                row += f" {r['windowed_loss']:>9.4f} {r['loss_minus_windowed']:>+14.4f}"
            lines.append(row)
        for s in model["skipped"]:
            lines.append(f"{s['length']:>7}  skipped: {s['reason']}")
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


def _label(model: dict) -> str:
    return f"{model['name']} ({model['pos_encoding']}, trained at {model['train_seq_len']})"


def log_to_wandb(cfg: Config, report: dict, plots: dict) -> None:
    """A table and the plots under the trained model's wandb run (its id is in ``<run_dir>/train/wandb_id``)."""
    import wandb

    from pretrain.train.monitor import WANDB_ID_FILE

    run_dir = Path(cfg.run_dir)
    id_file = run_dir / "train" / WANDB_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:  # evaluated without a wandb train run: start one, and keep its id for later stages
        run_id = uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        id=run_id,
        resume="allow",
        mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.name or run_dir.name,
        tags=list(cfg.wandb.tags),
        dir=str(run_dir),
    )
    try:
        columns = ["model", "pos_encoding", "length", "loss", "ppl", "tokens", "windowed_loss", "loss_minus_windowed"]
        table = wandb.Table(columns=columns)
        for model in report["models"]:
            for r in model["results"]:
                table.add_data(
                    model["name"],
                    model["pos_encoding"],
                    r["length"],
                    r["loss"],
                    r["ppl"],
                    r["tokens"],
                    r.get("windowed_loss"),
                    r.get("loss_minus_windowed"),
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
    finally:
        run.finish()
