"""The evaluation stage (``stage=eval``): how well trained models extrapolate past their training length.

For each model (the run's final weights, or ``eval.checkpoint``, plus every ``eval.compare`` run) and each
length in ``eval.lengths``, the validation split is cut into windows (``pretrain.eval.windows``: non-overlapping
or sliding; over the concatenated stream, or with ``eval.windows=documents`` only inside one validation document,
from the boundaries in ``val_docs.npy``) and every scored prediction's cross-entropy is summed. Reported per
length: loss, perplexity, tokens scored, the documents that qualified (documents) or the share of windows crossing a
document boundary (stream); with ``eval.window_control`` also the loss of the same predictions with attention limited to
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

import time
from dataclasses import replace

from pretrain.config import Config
from pretrain.data.tokenizer import load_tokenizer
from pretrain.errors import PipelineError
from pretrain.eval.passkey import check_passkey_fits, evaluate_passkey, passkey_lengths
from pretrain.eval.perplexity import evaluate_model, paired_difference
from pretrain.eval.report import write_outputs
from pretrain.eval.sources import ModelSource, load_model, resolve_sources, source_model_config
from pretrain.eval.split import check_eval_split, make_split
from pretrain.eval.windows import eval_lengths
from pretrain.parallel.distributed import DistContext


def plan_eval(cfg: Config, world_size: int) -> tuple[Config, list[ModelSource], list[int]]:
    """The models and lengths to evaluate, every path and split checked (PipelineError, ConfigError) from the
    files alone: the pipeline calls it before any work, ``run_eval`` again when it starts. The returned config
    has the (first) evaluated model's training length: the default lengths follow it, not ``model.*``."""
    sources = resolve_sources(cfg)
    primary_cfg = source_model_config(sources[0])
    cfg = _with_seq_len(cfg, primary_cfg.seq_len)
    lengths = eval_lengths(cfg)
    heads = {f"{s.name} ({s.key})": source_model_config(s).n_head for s in sources}
    check_eval_split(lengths, bool(cfg.eval.lengths), primary_cfg.seq_len, heads, cfg.parallel, world_size)
    for source in sources:  # each model runs the passkey trials
        check_passkey_fits(source_model_config(source), cfg.eval)
    return cfg, sources, lengths


def run_eval(cfg: Config, ctx: DistContext, corpus) -> dict:
    """Evaluate the run's model (and ``eval.compare`` runs) on the validation split; rank 0 writes ``eval/``."""

    say = print if ctx.is_main else (lambda *args, **kwargs: None)
    ecfg = cfg.eval
    cfg, sources, lengths = plan_eval(cfg, ctx.world_size)
    split = make_split(cfg.parallel, ctx)
    sp = load_tokenizer(corpus.tokenizer_path)
    encode = sp.encode
    if ecfg.passkey:
        pk_lengths, pk_too_short = passkey_lengths(cfg, encode)
    tokens = corpus.tokens("val")
    documents = validation_offsets(corpus, len(tokens), required=ecfg.windows == "documents")
    started = time.perf_counter()
    stride_note = f", stride {ecfg.stride or 'L/2'}" if ecfg.mode == "sliding" else ""
    where = " inside one document each" if ecfg.windows == "documents" else " over the stream"
    n_documents = "" if documents is None else f" ({len(documents) - 1:,} documents)"
    cap = "all" if ecfg.max_tokens is None else f"at most {ecfg.max_tokens:,}"
    say(
        f"[eval] {len(sources)} model(s) at lengths {', '.join(map(str, lengths))}; {ecfg.mode} windows{where}"
        f"{stride_note}; {cap} of the {len(tokens):,} validation tokens{n_documents} scored per length"
        + ("; windowed control on" if ecfg.window_control else "")
    )
    if split.sequence_parallel:
        groups = split.groups
        say(
            f"[eval] each window split over {groups.sp_size} ranks ({split.mode}"
            + (", zigzag" if split.describe()["zigzag"] else "")
            + f"), windows dealt over {groups.dp_size} group(s); passkey prompts stay whole on each rank"
        )
    models, model_scores = [], []
    for source in sources:
        model, model_cfg = load_model(source, corpus, ctx.device)
        say(
            f"[eval] {source.name}: {model_cfg.pos_encoding} positions, trained at seq_len {model_cfg.seq_len}, "
            f"{model.num_parameters() / 1e6:.2f}M parameters ({source.weights_dir})"
        )
        scores: dict = {}
        results, skipped, by_position = evaluate_model(
            model, model_cfg, tokens, ecfg, lengths, ctx, say, split, documents=documents, scores_out=scores
        )
        model_scores.append(scores)
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
    for model_entry, scores in zip(models[1:], model_scores[1:]):
        model_entry["versus"] = versus(models[0]["name"], model_scores[0], scores)
    primary = models[0]
    report = {
        "train_seq_len": primary["train_seq_len"],
        "mode": ecfg.mode,
        "windows": ecfg.windows,
        "results": primary["results"],
        "skipped": primary["skipped"],
        "model": primary["name"],
        "models": models,
        "settings": {
            "lengths": lengths,
            "stride": ecfg.stride,
            "windows": ecfg.windows,
            "max_tokens": ecfg.max_tokens,
            "batch_tokens": ecfg.batch_tokens,
            "window_control": ecfg.window_control,
            "world_size": ctx.world_size,
            "sequence_parallel": split.describe(),
        },
        "validation_tokens": len(tokens),
        "validation_documents": None if documents is None else len(documents) - 1,
        "corpus": str(corpus.directory),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if "passkey" in primary:
        report["passkey"] = primary["passkey"]
    if ctx.is_main:
        write_outputs(cfg, report, say)
    ctx.barrier()
    return report


def versus(primary: str, mine: dict, theirs: dict) -> dict:
    """``eval.compare``'s verdict for one compared model against the primary, per length both scored: its loss minus
    the primary's on the same windows, the standard error of that difference (paired over the windows) and whether
    it is beyond the 95% noise band (``differs``)."""
    rows = []
    for length in sorted(set(mine) & set(theirs)):
        difference = paired_difference(mine[length], theirs[length])
        if difference is not None:
            rows.append({"length": length, **difference})
    return {"model": primary, "rows": rows}


def validation_offsets(corpus, n_tokens: int, required: bool):
    """The validation documents' offsets in the validation stream (the shards' ``.docs.npy``), or None when the
    corpus gives none that match the stream; PipelineError then when ``eval.windows=documents`` needs them."""
    try:
        offsets = corpus.val.document_offsets()
    except (AttributeError, OSError, ValueError) as err:
        offsets, problem = None, f"they cannot be read ({err})"
    else:
        problem = f"they cover {offsets[-1]:,} tokens, the split holds {n_tokens:,}"
        if offsets[-1] != n_tokens:
            offsets = None
    if offsets is None and required:
        raise PipelineError(
            f"eval.windows=documents needs the validation documents' boundaries in {corpus.directory}, and {problem}; "
            "prepare the corpus again (delete that directory) or use eval.windows=stream"
        )
    return offsets


def _with_seq_len(cfg: Config, seq_len: int) -> Config:

    return replace(cfg, model=replace(cfg.model, seq_len=seq_len))
