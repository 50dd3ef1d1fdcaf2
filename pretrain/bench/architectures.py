"""Benchmark of the architecture options: grouped-query attention's cost and savings, and each export class's greedy
tokens against ours.

    python -m pretrain.bench architectures [--model 125m] [--kv-heads 12 4 1] [--seq 512] [--batch 4] [--steps 3]
        [--prompt 512] [--new 32] [--rounds 1] [--threads N] [--sections ...] [--out PATH.json]

Randomly initialised float32 models of ``conf/model/<--model>.yaml`` on this machine's device. For each
``n_kv_head`` of ``--kv-heads``:

- ``train_step_s``: median time of a training step (forward, backward, AdamW step) on ``--batch`` sequences of
  ``--seq`` tokens, plain PyTorch (no DeepSpeed), after one warm-up step;
- ``decode_ms_per_token``: greedy decoding with our KV cache (``GPT.forward_cached``), median per new token over
  ``--new`` tokens after a ``--prompt``-token prefill; ``prefill_s``;
- ``kv_cache_bytes_per_token``: keys and values of every layer per token in 16 bits (``perf.plan``), and what our
  float32 cache held per token (``KVCache.nbytes``);
- parameters.

``greedy``: for each export class (BLOOM: the default block; MPT: ``model.bias=false
model.embedding_layernorm=false model.mlp=gelu``; Falcon: multi-query with ``model.alibi_slopes=falcon``), the
model built in transformers from our state dict (``export.fidelity.hf_model``) decodes ``--new`` tokens greedily with
``generate`` from the same prompt: whether its tokens equal ours, and the largest logit difference on the prompt.

``kernel`` (``--sections kernel``): the fused CPU kernel alone (forward and backward, ``--batch`` x ``--seq``, the
model's heads and head dim) with each ``n_kv_head``, shared against repeated key/value heads.

``fidelity`` (``--sections fidelity --run-dir RUN [--cache-dir DIR]``): a trained run's export class against our
model, perplexity at every ``--multiples`` of the training length on the default corpus's validation split (how much
Falcon's bfloat16 ALiBi bias moves the numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from pretrain.bench.options import positive_int
from pretrain.extras import optional_import

GREEDY_CASES = {
    "bloom": {},
    "mpt": dict(bias=False, embedding_layernorm=False, mlp="gelu"),
    "falcon": dict(n_kv_head=1, alibi_slopes="falcon", embedding_layernorm=False),
}


def base_config(name: str, vocab: int):
    from pretrain.bench.train_step import model_shape
    from pretrain.config import ModelConfig

    shape = model_shape(name)
    return ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model, vocab_size=vocab)


def train_step_seconds(cfg, batch: int, seq: int, steps: int) -> float:
    from pretrain.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(replace(cfg, seq_len=seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new: int):
    """Greedy tokens, prefill seconds, per-token seconds, and the cache's bytes per token."""
    from pretrain.model.kv_cache import KVCache

    cache = KVCache.for_model(model, 1)
    start = time.perf_counter()
    logits = model.forward_cached(prompt, cache, last_only=True)
    prefill = time.perf_counter() - start
    tokens, times = [], []
    for _ in range(new):
        tokens.append(int(logits[0, -1].argmax()))
        start = time.perf_counter()
        logits = model.forward_cached(torch.tensor([[tokens[-1]]]), cache)
        times.append(time.perf_counter() - start)
    per_token_bytes = cache.nbytes() / cache.capacity
    return tokens, prefill, statistics.median(times), per_token_bytes


def grouped_query_rows(args) -> list[dict]:
    """One row per ``n_kv_head``. With ``--rounds R`` the configurations are measured in turn R times (so a change in
    the machine's load reaches all of them alike) and each time is the fastest round's."""
    from pretrain.model.gpt import GPT
    from pretrain.perf.plan import kv_cache_bytes_per_token, parameter_count

    base = base_config(args.model, args.vocab)
    rows = {}
    for _ in range(args.rounds):
        for kv in args.kv_heads:
            cfg = replace(base, n_kv_head=kv)
            torch.manual_seed(0)
            model = GPT(cfg).eval()
            prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
            _, prefill, per_token, cache_bytes = decode(model, prompt, args.new)
            step = train_step_seconds(cfg, args.batch, args.seq, args.steps)
            row = rows.setdefault(
                kv,
                {
                    "model": args.model,
                    "n_head": cfg.n_head,
                    "n_kv_head": kv,
                    "parameters": parameter_count(cfg),
                    "tokens_per_step": args.batch * args.seq,
                    "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
                    "kv_cache_bytes_per_token_fp32_measured": cache_bytes,
                    "train_step_s": step,
                    "prefill_s": prefill,
                    "decode_ms_per_token": 1000 * per_token,
                },
            )
            row["train_step_s"] = min(row["train_step_s"], step)
            row["prefill_s"] = min(row["prefill_s"], prefill)
            row["decode_ms_per_token"] = min(row["decode_ms_per_token"], 1000 * per_token)
            print(json.dumps(row), flush=True)
    rows = list(rows.values())
    return rows


@torch.no_grad()
def greedy_rows(args) -> list[dict]:
    from pretrain.export.fidelity import hf_model
    from pretrain.model.gpt import GPT
    from pretrain.model.hf_formats import choose_format

    base = base_config(args.model, args.vocab)
    rows = []
    for name, overrides in GREEDY_CASES.items():
        cfg = config_with(base, overrides)
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        fmt = choose_format(cfg, name)
        hf = hf_model(fmt, fmt.config(cfg), fmt.state_dict(model.state_dict(), cfg))
        prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        ours, _, _, _ = decode(model, prompt, args.new)
        theirs = hf.generate(prompt, max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
        logit_diff = (hf(prompt).logits - model(prompt)).abs().max().item()
        row = {
            "class": fmt.architecture,
            "model": args.model,
            "overrides": overrides,
            "prompt": args.prompt,
            "new": args.new,
            "greedy_equal": ours == theirs[0, args.prompt :].tolist(),
            "max_abs_logit_diff_prompt": logit_diff,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def kernel_rows(args) -> list[dict]:
    """The fused CPU kernel alone, forward and backward at ``--seq`` tokens, with each ``--kv-heads`` against the same
    attention with the key/value heads repeated (what a kernel without grouped-query support must do)."""
    from pretrain.ops.alibi import slopes
    from pretrain.ops.attention import alibi_attention

    base = base_config(args.model, args.vocab)
    heads, dim = base.n_head, base.head_dim
    rows = []
    for kv in args.kv_heads:
        row = {"n_head": heads, "n_kv_head": kv, "seq": args.seq, "batch": args.batch}
        for mode in ("shared", "repeated"):
            times = []
            for _ in range(args.steps + 1):
                q = torch.randn(args.batch, heads, args.seq, dim, requires_grad=True)
                k = torch.randn(args.batch, kv, args.seq, dim, requires_grad=True)
                v = torch.randn(args.batch, kv, args.seq, dim, requires_grad=True)
                start = time.perf_counter()
                kk, vv = (k, v) if mode == "shared" else (t.repeat_interleave(heads // kv, 1) for t in (k, v))
                alibi_attention(q, kk, vv, slopes(heads)).sum().backward()
                times.append(time.perf_counter() - start)
            row[f"{mode}_fwd_bwd_s"] = statistics.median(times[1:])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def fidelity_rows(args) -> list[dict]:
    """The export class of a trained run (``--run-dir``) against our model: perplexity at every multiple of the
    training length on the validation split of the default corpus in ``--cache-dir``."""
    from pretrain.config import DataConfig
    from pretrain.data.prepare import load_prepared
    from pretrain.export.fidelity import hf_model, perplexity_by_length
    from pretrain.model.gpt import GPT
    from pretrain.model.hf_formats import choose_format
    from pretrain.train.weights import load_weights

    if args.run_dir is None:
        raise SystemExit("error: the fidelity section needs --run-dir RUN (a trained run)")
    cfg, state = load_weights(args.run_dir / "checkpoints")
    model = GPT(cfg)
    model.load_state_dict(state)
    fmt = choose_format(cfg)
    tensors = fmt.state_dict({k: v.float() for k, v in state.items()}, cfg)
    theirs = hf_model(fmt, fmt.config(cfg), tensors)
    val = load_prepared(DataConfig(cache_dir=args.cache_dir)).tokens("val")
    tokens = torch.as_tensor(val[: 64 * 1024].astype("int64"))  # enough for every length at 8,192 tokens
    rows = perplexity_by_length(model.eval(), theirs, tokens, [m * cfg.seq_len for m in args.multiples])
    # Greedy decoding inside the training length: half of it prompt (validation tokens), half generated.
    half = cfg.seq_len // 2
    ours, _, _, _ = decode(model, tokens[None, :half], half)
    generated = theirs.generate(tokens[None, :half], max_new_tokens=half, do_sample=False, eos_token_id=None)
    greedy = ours == generated[0, half:].tolist()
    for row in rows:
        row["class"] = fmt.architecture
        row["greedy_equal_at_1x"] = greedy
        print(json.dumps(row), flush=True)
    return rows


def config_with(base, overrides):
    from pretrain.config import ModelConfig

    values = {**base.__dict__, "n_kv_head": None, "norm": None, **overrides}
    return ModelConfig(**values)


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="125m")
    parser.add_argument("--kv-heads", type=positive_int, nargs="+", default=[12, 4, 1])
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--prompt", type=positive_int, default=512)
    parser.add_argument("--new", type=positive_int, default=32)
    parser.add_argument("--vocab", type=positive_int, default=8192)
    parser.add_argument("--rounds", type=positive_int, default=1, help="grouped_query: measure every config R times")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["grouped_query", "greedy"],
        choices=["kernel", "grouped_query", "greedy", "fidelity"],
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="fidelity: a trained run (its final weights)")
    parser.add_argument("--cache-dir", default="data", help="fidelity: data.cache_dir of the run's (default) corpus")
    parser.add_argument("--multiples", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    result["device"] = "cpu"
    result["threads"] = torch.get_num_threads()
    if "kernel" in args.sections:
        result["kernel"] = kernel_rows(args)
    if "grouped_query" in args.sections:
        result["grouped_query"] = grouped_query_rows(args)
    if "greedy" in args.sections:
        optional_import("transformers", "the greedy section of bench architectures")
        result["greedy"] = greedy_rows(args)
    if "fidelity" in args.sections:
        optional_import("transformers", "the fidelity section of bench architectures")
        result["fidelity"] = fidelity_rows(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
