"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): can the model recall a key far back?

A random 5-digit key is hidden at a chosen depth of repeated filler sentences; the prompt ends with the
question, and the model should continue with the key::

    There is a pass key hidden in this text. Find it and remember it.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 40376. Remember it. 40376 is the pass key.
    ... more filler ...
    What is the pass key? The pass key is 40376

The prompt is built in token space, so prompt and answer are exactly ``length`` tokens (the model reads
``length - 1`` of them), and the key line starts at the sentence boundary of the filler nearest to
``depth * filler tokens`` (depth 0: first thing after the instruction; 1: last thing before the question).
Two scores per trial:

- greedy: the model's greedy continuation is the key. Read off one teacher-forced pass: greedy decoding
  emits the key exactly when the true next token is the arg-max at every step of it.
- likelihood: the key is more likely than each of ``n_distractors`` random wrong keys (chance:
  ``1 / (n_distractors + 1)``).

The prompts are pure functions of a tokenizer's ``encode``; ``evaluate_passkey`` runs them through a model
(trials dealt over all ranks, whole prompts on each: only their last logits are needed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import Config, EvalConfig, ModelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.eval.windows import shard
from pretrain.model.gpt import GPT
from pretrain.model.positions import max_length
from pretrain.parallel.distributed import DistContext, all_reduce
from pretrain.perf.fit import activation_bytes, available_memory, format_bytes, largest_fitting

INSTRUCTION = "There is a pass key hidden in this text. Find it and remember it.\n"
FILLER = (
    "The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5


def key_line_parts(key: str) -> list[str]:
    # The key is encoded as its own piece (" 40376") both here and as the answer, so its tokens are identical.
    return ["\nThe pass key is", f" {key}", ". Remember it.", f" {key}", " is the pass key.\n"]


def answer_text(key: str) -> str:
    return f" {key}"


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt: ``tokens`` then ``answer`` make the asked length; the key's tokens sit at ``key_position``."""

    tokens: list[int]
    answer: list[int]  # the key's tokens, the continuation the model should give
    key: str
    depth: float  # as asked
    key_line_start: int  # token index where the key line starts
    key_position: int  # token index of the key's first token inside the key line
    filler_tokens: int  # filler tokens in the prompt (before and after the key line together)
    filler_start: int  # token index where the filler starts (after the instruction)
    key_offset: int  # filler tokens before the key line: the depth as it came out


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))


def fixed_tokens(encode: Callable[[str], list[int]], key: str) -> int:
    """Tokens of a prompt with ``key`` that are not filler: instruction, key line, question and answer."""
    return sum(len(encode(part)) for part in [INSTRUCTION, *key_line_parts(key), QUESTION, answer_text(key)])


def min_length(encode: Callable[[str], list[int]]) -> int:
    """The shortest length every key's prompt fits in (with one filler token)."""
    # Only the first digit may merge with the space before it; the others are one token each (split_digits).
    return max(fixed_tokens(encode, f"{first}{'9' * (KEY_DIGITS - 1)}") for first in range(1, 10)) + 1


def make_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str) -> PasskeyPrompt:
    """The passkey prompt with ``key`` at ``depth`` (0..1) of the filler; prompt + answer are ``length`` tokens.

    ``encode`` is a tokenizer's ``str -> list[int]`` (sentencepiece's ``encode``). The model reads at most
    ``length - 1`` tokens to score the answer. Raises ValueError when ``length`` cannot hold the instruction,
    key line, question and answer with at least one filler token.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    instruction, question, answer = encode(INSTRUCTION), encode(QUESTION), encode(answer_text(key))
    key_parts = [encode(p) for p in key_line_parts(key)]
    key_line = [t for part in key_parts for t in part]
    n_filler = length - len(instruction) - len(key_line) - len(question) - len(answer)
    if n_filler < 1:
        raise ValueError(
            f"a passkey prompt of {length} tokens is too short: the instruction, key line, question and answer "
            f"alone take {length - n_filler} tokens"
        )
    # Whole sentences, cycling, until the filler is full; the last one is cut to fit.
    sentences = [encode(s) for s in FILLER]
    filler: list[int] = []
    boundaries = [0]
    i = 0
    while len(filler) < n_filler:
        filler += sentences[i % len(sentences)]
        boundaries.append(min(len(filler), n_filler))
        i += 1
    filler = filler[:n_filler]
    target = depth * n_filler
    offset = min(boundaries, key=lambda b: (abs(b - target), b))
    tokens = instruction + filler[:offset] + key_line + filler[offset:] + question
    assert len(tokens) + len(answer) == length, (len(tokens), len(answer), length)
    key_line_start = len(instruction) + offset
    return PasskeyPrompt(
        tokens=tokens,
        answer=answer,
        key=key,
        depth=depth,
        key_line_start=key_line_start,
        key_position=key_line_start + len(key_parts[0]),
        filler_tokens=n_filler,
        filler_start=len(instruction),
        key_offset=offset,
    )


def trial_rng(seed: int, length: int, depth_index: int, trial: int) -> random.Random:
    """The random source of one trial: the same key and distractors whatever the number of ranks."""
    return random.Random(f"passkey-{seed}-{length}-{depth_index}-{trial}")


def distractor_keys(encode: Callable[[str], list[int]], rng: random.Random, key: str, count: int) -> list[str]:
    """``count`` other keys whose answers have as many tokens as ``key``'s, so their likelihoods compare fairly."""
    n_tokens = len(encode(answer_text(key)))
    keys: list[str] = []
    for _ in range(1000 * count):
        candidate = random_key(rng)
        if candidate != key and candidate not in keys and len(encode(answer_text(candidate))) == n_tokens:
            keys.append(candidate)
            if len(keys) == count:
                return keys
    raise ValueError(f"could not find {count} distractor keys of {n_tokens} tokens like {key!r}")


@torch.no_grad()
def score_candidates(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], prompt: list[int], answers: list[list[int]], device="cpu"
) -> tuple[torch.Tensor, bool]:
    """Log-likelihood of each answer after ``prompt`` (float64 ``[len(answers)]``, answers of equal length), and
    whether the greedy continuation of ``prompt`` is ``answers[0]``.

    ``logits_fn`` maps token ids ``[B, T]`` to the logits of the last ``n`` positions ``[B, n, V]``, where
    ``n`` is the answers' length.
    """
    n = len(answers[0])
    assert all(len(a) == n for a in answers), "answers must have equal token counts"
    ids = torch.tensor([prompt + a[:-1] for a in answers], dtype=torch.long, device=device)
    logits = logits_fn(ids)  # [B, n, V]: the predictions of answer tokens 0 .. n - 1
    assert logits.shape[:2] == (len(answers), n), logits.shape
    targets = torch.tensor(answers, dtype=torch.long, device=logits.device)
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    greedy = bool((logits[0].argmax(dim=-1) == targets[0]).all())
    return logprobs.double().sum(dim=-1).cpu(), greedy


PASSKEY_MULTIPLES = (1, 2, 4, 8)


def passkey_lengths(cfg: Config, encode) -> tuple[list[int], list[dict]]:
    """The passkey lengths to run and those skipped (too short for the prompt); explicit ones must all fit."""
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


def check_passkey_fits(model_cfg: ModelConfig, ecfg: EvalConfig) -> None:
    """One line, before any work, for a passkey length whose trial cannot fit in memory: each trial runs the prompt
    with its true and ``eval.passkey_distractors`` wrong answers through the model at once."""
    if not ecfg.passkey:
        return
    lengths = ecfg.passkey_lengths or [model_cfg.seq_len * m for m in PASSKEY_MULTIPLES]
    rows = ecfg.passkey_distractors + 1
    budget, where = available_memory()
    weights = (12 * model_cfg.n_layer * model_cfg.d_model**2 + model_cfg.vocab_size * model_cfg.d_model) * 4

    def need(length: int) -> int:
        return weights + activation_bytes(model_cfg, rows, length)

    longest = max(lengths)
    if need(longest) <= budget:
        return
    fit = largest_fitting(need, longest, budget)
    raise ConfigError(
        f"eval.passkey_lengths holds {longest:,}: a trial of that length runs {rows} prompts (eval.passkey_distractors"
        f" + 1) of {longest:,} tokens through the model at once, at least {format_bytes(need(longest))}, and {where}; "
        f"give lengths of at most {fit:,} tokens (or fewer eval.passkey_distractors)"
    )


def evaluate_passkey(
    model: GPT, model_cfg: ModelConfig, encode, lengths, too_short, ecfg: EvalConfig, ctx: DistContext, say
):
    """Accuracy per (length, depth) over ``eval.passkey_trials`` seeded trials, greedy and by likelihood."""
    device = next(model.parameters()).device
    limit = max_length(model_cfg)
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
            return model.logits(model.hidden_states(ids)[:, -n:])

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
    counts = all_reduce(counts, ctx)
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
