"""The generate stage (``stage=generate``): continue prompts with a trained model and write ``generate/samples.jsonl``.

The weights are the run's final ones, or ``generate.checkpoint`` (anything ``eval.checkpoint`` accepts, resolved
by ``pretrain.eval.sources``); the tokenizer is the prepared corpus's, as for the eval stage. Prompts are encoded
as the training data was (no ``<s>`` in front: documents in the shards follow each other, each ended by ``</s>``),
decoded with the KV cache (``pretrain.generate.decode``), and a completion ends at ``</s>`` or after
``generate.max_new_tokens``. Rank 0 does the work; other ranks wait.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from pretrain.config import Config, ModelConfig
from pretrain.data.tokenizer import load_tokenizer
from pretrain.errors import PipelineError
from pretrain.eval.sources import ModelSource, checkpoint_source, load_model, resolve_sources, source_model_config
from pretrain.generate.decode import PREFILL_CHUNK, generate
from pretrain.generate.prompts import read_prompts
from pretrain.generate.sampling import Sampling
from pretrain.model.positions import max_length
from pretrain.parallel.distributed import DistContext
from pretrain.perf.fit import activation_bytes, available_memory, format_bytes, kv_cache_bytes, largest_fitting
from pretrain.run_files import RunFiles, write_atomic


def weights_source(cfg: Config) -> ModelSource:
    """The weights to decode with: ``generate.checkpoint`` (anything ``eval.checkpoint`` accepts), or the run's final
    weights; a PipelineError naming the key when there are none. The paths follow the eval stage's own rules."""
    if cfg.generate.checkpoint is not None:
        return checkpoint_source(cfg.generate.checkpoint, "generate.checkpoint")
    try:
        (source,) = resolve_sources(replace(cfg, eval=replace(cfg.eval, checkpoint=None, compare=[])))
    except PipelineError as err:  # the eval stage's message, with this stage's key
        message = str(err).replace(" or eval.compare=[RUN_DIR, ...]", "").replace("to evaluate a run", "to use a run")
        raise PipelineError(message.replace("eval.checkpoint", "generate.checkpoint")) from None
    return source


def check_tokenizer(source: ModelSource, tokenizer_path: Path) -> None:
    """The weights' own run must have been trained with the tokenizer these data.* settings give (when that run's
    tokenizer is known): the same vocabulary size alone would decode other pieces."""
    candidates = [source.run_dir] if source.run_dir is not None else []
    candidates += list(Path(source.weights_dir).resolve().parents)[:3]
    for directory in candidates:
        theirs = RunFiles(directory).tokenizer
        if theirs.is_file():
            if theirs.read_bytes() != Path(tokenizer_path).read_bytes():
                raise PipelineError(
                    f"{source.key}: the weights in {source.weights_dir} were trained with {theirs}, another tokenizer "
                    "than these data.* settings give; run stage=generate with the data.* settings they were "
                    "trained with"
                )
            return


def plan_generate(cfg: Config) -> tuple[list[str], ModelSource, ModelConfig]:
    """The prompts, the weights and their model config, checked from the files alone (ConfigError, PipelineError):
    the pipeline calls it before any work, ``run_generate`` again when it starts."""
    prompts = read_prompts(cfg.generate)
    source = weights_source(cfg)
    model_cfg = source_model_config(source)
    check_length(model_cfg, 1, cfg.generate.max_new_tokens)
    check_fits(model_cfg, cfg.generate, [1] * len(prompts))  # the prompts' lengths are known once encoded
    return prompts, source, model_cfg


def decode_bytes(model_cfg: ModelConfig, gcfg, prompt_lengths: list[int], max_new_tokens: int) -> int:
    """The memory decoding these prompts takes at least: the weights, a batch's KV cache (the whole prompt and
    completion, or the window and one prefill chunk) and the activations of its prefill pass."""
    rows = min(gcfg.batch_size, len(prompt_lengths))
    longest = max(prompt_lengths)
    if gcfg.window is None:
        cache_tokens, prefill = longest + max_new_tokens, longest
    else:
        prefill = min(PREFILL_CHUNK, longest)
        cache_tokens = gcfg.window - 1 + prefill
    d, layers = model_cfg.d_model, model_cfg.n_layer
    weights = (12 * layers * d * d + model_cfg.vocab_size * d) * 4
    return weights + kv_cache_bytes(model_cfg, rows, cache_tokens) + activation_bytes(model_cfg, rows, prefill)


def check_fits(model_cfg: ModelConfig, gcfg, prompt_lengths: list[int]) -> None:
    """One line, before any decoding, when the prompts and ``generate.max_new_tokens`` cannot fit in memory."""
    budget, where = available_memory()
    need = decode_bytes(model_cfg, gcfg, prompt_lengths, gcfg.max_new_tokens)
    if need <= budget:
        return
    rows, longest = min(gcfg.batch_size, len(prompt_lengths)), max(prompt_lengths)
    fit = largest_fitting(lambda n: decode_bytes(model_cfg, gcfg, prompt_lengths, n), gcfg.max_new_tokens, budget)
    prompts = f"{rows} prompt(s) of up to {longest:,} tokens" if longest > 1 else f"{rows} prompt(s)"
    fixes = [f"lower generate.max_new_tokens to at most {fit:,}" if fit >= 1 else "shorten the prompts"]
    if gcfg.window is None:
        fixes.append("set generate.window=W (a cache of constant size)")
    if rows > 1:
        fixes.append(f"lower generate.batch_size={gcfg.batch_size}")
    raise PipelineError(
        f"generate.max_new_tokens={gcfg.max_new_tokens:,} cannot fit: decoding {prompts} with it needs at least "
        f"{format_bytes(need)} (a KV cache of {model_cfg.n_layer} layers x d_model {model_cfg.d_model} per position "
        f"and prompt), and {where}; {', or '.join(fixes)}"
    )


def check_prompt_lengths(prompts: list[str], encoded: list[list[int]], max_prompt_tokens: int) -> None:
    """One line for the first prompt longer than ``generate.max_prompt_tokens`` (or encoding to no tokens)."""
    for i, (prompt, ids) in enumerate(zip(prompts, encoded), start=1):
        if not ids:
            raise PipelineError(f"the prompt {prompt!r} encodes to no tokens; give some text to continue")
        if len(ids) > max_prompt_tokens:
            raise PipelineError(
                f"prompt {i} of {len(prompts)} ({prompt[:40]!r}...) has {len(ids):,} tokens, more than "
                f"generate.max_prompt_tokens={max_prompt_tokens:,}; shorten it, or raise generate.max_prompt_tokens"
            )


def check_length(model_cfg: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> None:
    """A learned position table cannot go past its rows: refuse a prompt plus completion that would need more."""
    limit = max_length(model_cfg)
    needed = prompt_tokens + max_new_tokens - 1  # the last new token is never fed back
    if limit is None or needed <= limit:
        return
    prompt = f"a prompt of {prompt_tokens} tokens plus " if prompt_tokens > 1 else ""
    fix = (
        f"lower generate.max_new_tokens to {limit - prompt_tokens + 1}"
        if prompt_tokens <= limit
        else "shorten the prompt"
    )
    raise PipelineError(
        f"model.pos_encoding=learned reads at most {limit} positions (its table, model.max_positions): "
        f"{prompt}generate.max_new_tokens={max_new_tokens} needs {needed}; {fix} "
        "(alibi, rope, sinusoidal and none decode at any length)"
    )


def run_generate(cfg: Config, ctx: DistContext, corpus) -> list[dict] | None:
    """Continue every prompt; rank 0 prints the completions and writes ``generate/samples.jsonl``, and returns
    the samples (other ranks None)."""
    prompts, source, _ = plan_generate(cfg)
    gcfg = cfg.generate
    # Every rank checks (and fails) alike, so that none waits at the barrier for a rank that stopped.
    check_tokenizer(source, corpus.tokenizer_path)
    sp = load_tokenizer(corpus.tokenizer_path)
    encoded = [sp.encode(prompt) for prompt in prompts]
    check_prompt_lengths(prompts, encoded, gcfg.max_prompt_tokens)  # before the weights are loaded
    check_length(source_model_config(source), max(len(ids) for ids in encoded), gcfg.max_new_tokens)
    check_fits(source_model_config(source), gcfg, [len(ids) for ids in encoded])
    model, model_cfg = load_model(source, corpus, ctx.device)
    if not ctx.is_main:
        ctx.barrier()
        return None
    sampling = Sampling(temperature=gcfg.temperature, top_k=gcfg.top_k, top_p=gcfg.top_p, seed=gcfg.seed)
    how = "greedy" if sampling.greedy else f"temperature {gcfg.temperature}, top_k {gcfg.top_k}, top_p {gcfg.top_p}"
    window = f", cache window {gcfg.window}" if gcfg.window is not None else ""
    print(
        f"[generate] {len(prompts)} prompt(s) ({', '.join(str(len(ids)) for ids in encoded)} tokens), up to "
        f"{gcfg.max_new_tokens} new tokens each, {how}{window}; {source.key}: {source.weights_dir} "
        f"(trained at seq_len {model_cfg.seq_len})"
    )
    samples: list[dict] = []

    def show(first: int, completions: list[list[int]]) -> None:
        for i, ids in enumerate(completions, start=first):
            sample = {"prompt": prompts[i], "text": sp.decode(ids), "token_ids": ids}
            samples.append(sample)
            print(f"--- {i + 1}/{len(prompts)}: {prompts[i]!r} -> {len(ids)} new tokens ---")
            print(sample["text"], flush=True)

    started = time.perf_counter()
    completions = generate(
        model,
        encoded,
        gcfg.max_new_tokens,
        sampling,
        eos_id=sp.eos_id(),
        window=gcfg.window,
        batch_size=gcfg.batch_size,
        on_batch=show,
    )
    seconds = time.perf_counter() - started
    out = RunFiles(cfg.run_dir).generate_samples
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    tokens = sum(len(ids) for ids in completions)
    print(f"[generate] {tokens} new tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.1f} tokens/s) -> {out}")
    ctx.barrier()
    return samples
