"""Benchmark of decoding: tokens/s with our KV cache, against re-running the full prefix and against transformers.

    python -m pretrain.bench generate [--models tiny] [--prompt 2048] [--new 64] [--full-new 8] [--vocab 8192]
        [--window W] [--impls cache full transformers] [--threads N] [--repeats 1] [--out PATH.json]

One randomly initialised model per shape (``conf/model/<name>.yaml``), float32, greedy decoding of one prompt of
``--prompt`` random tokens. Rows:

- ``cache``: ``pretrain.generate.decode.generate`` (``GPT.forward_cached``): the prompt's prefill, then
  ``--new`` tokens one pass each. ``tokens/s`` counts the decoding passes only; the prefill is its own column.
- ``full``: no cache: every new token runs the model over the whole prefix (``GPT.hidden_states``, then the logits
  of the last position only), for ``--full-new`` tokens (each costs a full forward).
- ``transformers``: the same weights as ``BloomForCausalLM`` (``pretrain.model.bloom``), ``generate`` greedy with
  its own cache: decoding tokens/s from the difference of ``max_new_tokens=--new`` and ``max_new_tokens=1``
  (which is its prefill and first token), and whether its tokens equal ours.

``cache / full`` is expected >= 5x at a 2,048-token prompt on CPU (``checks`` in the JSON); no assertion is made
on timings anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.bench.options import positive_int
from pretrain.extras import optional_import

IMPLS = ("cache", "full", "transformers")
TRANSFORMERS_USE = "the transformers row of bench generate (--impls cache full skips it)"
TARGET_SPEEDUP = 5.0
TARGET_PROMPT = 2048


@dataclass(frozen=True)
class GenerateBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    models: tuple[str, ...]
    prompt: int
    new: int
    full_new: int
    vocab: int
    window: int | None
    impls: tuple[str, ...]
    threads: int | None
    repeats: int


def build_model(name: str, params: GenerateBenchParams):
    from pretrain.bench.train_step import model_shape
    from pretrain.config import ModelConfig
    from pretrain.model.gpt import GPT

    shape = model_shape(name)
    cfg = ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model, vocab_size=params.vocab)
    torch.manual_seed(0)
    return GPT(cfg).eval(), shape


def bloom_of(model):
    """The same weights as ``transformers.BloomForCausalLM``."""
    transformers = optional_import("transformers", TRANSFORMERS_USE)
    from pretrain.model.bloom import bloom_config, to_bloom_state_dict

    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(**bloom_config(model.cfg))).eval()
    missing, unexpected = bloom.load_state_dict(to_bloom_state_dict(model.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # the head is tied
    return bloom


def _median(values):
    return statistics.median(values)


@torch.no_grad()
def measure_cache(model, prompt: list[int], params: GenerateBenchParams) -> dict:
    from pretrain.generate.decode import generate
    from pretrain.model.kv_cache import KVCache

    generate(model, [prompt[:16]], 4, window=params.window)  # warm-up
    prefill, decode, completion = [], [], None
    for _ in range(params.repeats):
        if params.window is None:
            cache = KVCache.for_model(model, 1, capacity=len(prompt) + params.new)
        else:
            cache = KVCache.for_model(model, 1, window=params.window, chunk=min(512, len(prompt)))
        t0 = time.perf_counter()
        logits = model.forward_cached(torch.tensor([prompt]), cache, last_only=True)[:, -1]
        t1 = time.perf_counter()
        tokens = []
        for _ in range(params.new):
            tokens.append(int(logits.argmax()))
            if len(tokens) == params.new:
                break
            logits = model.forward_cached(torch.tensor([[tokens[-1]]]), cache)[:, -1]
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(t2 - t1)
        completion = tokens
    # The loop above is generate()'s own, timed by phase; generate() must give the same tokens.
    assert generate(model, [prompt], params.new, window=params.window)[0] == completion
    # The last token's argmax needs no pass: new - 1 passes decode new - 1 tokens after the prefill's first.
    passes = max(1, params.new - 1)
    return {
        "prefill_s": _median(prefill),
        "decode_s": _median(decode),
        "tokens_per_s": passes / _median(decode),
        "end_to_end_tokens_per_s": params.new / (_median(prefill) + _median(decode)),
        "cache_mib": cache.nbytes() / 2**20,
        "tokens": completion,
    }


@torch.no_grad()
def measure_full(model, prompt: list[int], params: GenerateBenchParams) -> dict:
    def next_token(ids):
        hidden = model.hidden_states(torch.tensor([ids]), window=params.window)
        return int(model.logits(hidden[:, -1]).argmax())

    next_token(prompt[:16])  # warm-up
    times, tokens = [], None
    for _ in range(params.repeats):
        ids = list(prompt)
        t0 = time.perf_counter()
        for _ in range(params.full_new):
            ids.append(next_token(ids))
        times.append(time.perf_counter() - t0)
        tokens = ids[len(prompt) :]
    return {"decode_s": _median(times), "tokens_per_s": params.full_new / _median(times), "tokens": tokens}


@torch.no_grad()
def measure_transformers(model, prompt: list[int], params: GenerateBenchParams) -> dict:
    bloom = bloom_of(model)
    ids = torch.tensor([prompt])

    def run(new: int):
        t0 = time.perf_counter()
        out = bloom.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        return time.perf_counter() - t0, out[0, len(prompt) :].tolist()

    bloom.generate(ids[:, :16], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm-up
    first, whole, tokens = [], [], None
    for _ in range(params.repeats):
        first.append(run(1)[0])
        seconds, tokens = run(params.new)
        whole.append(seconds)
    decode = max(_median(whole) - _median(first), 1e-9)
    return {
        "prefill_s": _median(first),
        "decode_s": decode,
        "tokens_per_s": max(1, params.new - 1) / decode,
        "end_to_end_tokens_per_s": params.new / _median(whole),
        "tokens": tokens,
    }


MEASURE = {"cache": measure_cache, "full": measure_full, "transformers": measure_transformers}


def run_rows(params: GenerateBenchParams, say=print) -> list[dict]:
    rows = []
    for name in params.models:
        model, shape = build_model(name, params)
        prompt = torch.randint(0, params.vocab, (params.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        measured = {}
        for impl in params.impls:
            say(f"  {name} {impl} ...", flush=True)
            measured[impl] = MEASURE[impl](model, prompt, params)
        ours = measured.get("cache")
        for impl, result in measured.items():
            row = {"model": name, "impl": impl, "prompt": params.prompt, "window": params.window}
            row.update({k: v for k, v in result.items() if k != "tokens"})
            row["new_tokens"] = params.full_new if impl == "full" else params.new
            if ours is not None:
                # The same greedy tokens as the cache (as far as both went): a check, not a timing.
                n = min(len(ours["tokens"]), len(result["tokens"]))
                row["same_tokens_as_cache"] = ours["tokens"][:n] == result["tokens"][:n]
                row["cache_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
            rows.append(row)
    return rows


def target_checks(rows: list[dict]) -> list[dict]:
    """The cache against the full prefix at a 2,048-token prompt or longer: >= 5x (PASS/FAIL), else SKIP."""
    checks = []
    for row in rows:
        if row["impl"] != "full":
            continue
        target = f"{row['model']}: cache >= {TARGET_SPEEDUP:g}x the full prefix at prompt >= {TARGET_PROMPT}"
        if row["prompt"] < TARGET_PROMPT or "cache_speedup" not in row:
            checks.append({"check": target, "status": "SKIP", "value": row.get("cache_speedup")})
        else:
            status = "PASS" if row["cache_speedup"] >= TARGET_SPEEDUP else "FAIL"
            checks.append({"check": target, "status": status, "value": row["cache_speedup"]})
    return checks


def format_table(rows: list[dict]) -> str:
    def num(value, digits=1):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"{'model':<8}{'impl':<14}{'prompt':>7}{'new':>5}{'prefill s':>11}{'tokens/s':>11}{'cache x':>9}"
        f"{'end-to-end tok/s':>18}{'same tokens':>13}"
    ]
    for r in rows:
        same = r.get("same_tokens_as_cache")
        lines.append(
            f"{r['model']:<8}{r['impl']:<14}{r['prompt']:>7}{r['new_tokens']:>5}{num(r.get('prefill_s'), 3):>11}"
            f"{num(r['tokens_per_s']):>11}{num(r.get('cache_speedup'), 2):>9}"
            f"{num(r.get('end_to_end_tokens_per_s')):>18}{'-' if same is None else ('yes' if same else 'NO'):>13}"
        )
    return "\n".join(lines)


def parse_params(argv: list[str], prog: str) -> tuple[GenerateBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], help="shapes from conf/model (default tiny)")
    parser.add_argument("--prompt", type=positive_int, default=TARGET_PROMPT, help="prompt tokens (default 2048)")
    parser.add_argument("--new", type=positive_int, default=64, help="new tokens with a cache (default 64)")
    parser.add_argument("--full-new", type=positive_int, default=8, help="new tokens without a cache (default 8)")
    parser.add_argument("--vocab", type=positive_int, default=8192, help="vocabulary (default 8192)")
    parser.add_argument("--window", type=positive_int, help="a windowed cache of this many keys (and full forwards)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="rows to measure")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs per row; medians are reported")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    params = GenerateBenchParams(
        models=tuple(args.models),
        prompt=args.prompt,
        new=args.new,
        full_new=args.full_new,
        vocab=args.vocab,
        window=args.window,
        impls=tuple(dict.fromkeys(args.impls)),
        threads=args.threads,
        repeats=args.repeats,
    )
    from pretrain.__main__ import CONF_DIR

    for name in params.models:
        if not (Path(CONF_DIR) / "model" / f"{name}.yaml").is_file():
            parser.error(f"--models {name}: no conf/model/{name}.yaml")
    return params, args


def main(argv: list[str], prog: str = "python -m pretrain.bench generate") -> int:
    params, args = parse_params(argv, prog)
    from pretrain.bench.report import machine_info, now_iso, write_report

    if params.threads is not None:
        torch.set_num_threads(params.threads)
    started = now_iso()
    machine = machine_info("cpu")
    if "transformers" in params.impls:
        machine["transformers"] = optional_import("transformers", TRANSFORMERS_USE).__version__
    window = f", cache window {params.window}" if params.window else ""
    print(
        f"generate benchmark on {machine['device_name']} (cpu, {torch.get_num_threads()} torch threads): greedy, "
        f"prompt {params.prompt} tokens, {params.new} new ({params.full_new} without a cache), vocab {params.vocab}"
        f"{window}, float32",
        flush=True,
    )
    rows = run_rows(params)
    print(format_table(rows))
    checks = target_checks(rows)
    for check in checks:
        value = "-" if check["value"] is None else f"{check['value']:.1f}x"
        print(f"{check['status']:<5} {check['check']}: {value}")
    write_report(args.out, "generate", started, machine, params, rows, checks=checks)
    return 0
