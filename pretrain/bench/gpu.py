"""The GPU acceptance run: everything about the CUDA path that a CPU cannot prove, in one command.

    python -m pretrain.bench gpu [--out docs/results/gpu-<device>.json] [--skip SECTION ...]

Sections (each recorded as rows in the JSON; one that fails records its error and the run goes on):

- ``flex``: FlexAttention's fused ALiBi (``alibi_attention(..., backend="flex")``, compiled) against a float64
  reference built from the bias's definition, forward and backward, fp32 and bf16: odd head counts, Lq != Lk,
  offsets, windows of 1, 3 and 40, lengths that are not a multiple of 128.
- ``attention``: forward+backward time and peak memory at L = 2,048 .. 32,768 (B=1, 16 heads of 64, bf16):
  ``fused`` against SDPA's flash kernel with ``is_causal=True`` and no bias (the floor; target: fused at most
  1.2x its time) and against the materialized-bias path (``sdpa``, where its bias fits in memory).
- ``train_step``: the training-step benchmark for ``model=125m`` and ``model=350m``, bf16, sequences of 2,048,
  with MFU (target: at least 40%); it runs ``python -m pretrain.bench train_step`` in its own processes.
- ``ring``: ring attention on one rank with the zigzag layout (two chunks, so blocks merge through their
  log-sum-exp), each block on the GPU kernel, against the unsplit fused kernel: output and gradients.
- ``eval``: a tiny model's perplexity windows at 2,048 .. 65,536 tokens (and the windowed control) under
  ``inference_mode``: how many kernels were compiled for all of them, and each length's peak memory.

Without CUDA the command says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

from pretrain.bench.report import machine_info, now_iso, write_report

SECTIONS = ("flex", "attention", "train_step", "ring", "eval")
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def reference_attention(q, k, v, slopes, q_offset, k_offset, window):
    """Float64 attention with the bias ``-m_h (i - j)`` written out from its definition ``[B, H, Lq, D]``."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    i = torch.arange(q.shape[2], device=q.device)[:, None] + q_offset
    j = torch.arange(k.shape[2], device=q.device)[None, :] + k_offset
    distance = (i - j).double()
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    scores = q64 @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5 - slopes.double()[:, None, None] * distance
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v64


def check_flex(say) -> list[dict]:
    from pretrain.ops.alibi import slopes
    from pretrain.ops.attention import alibi_attention

    cases = [
        dict(b=2, h=5, lq=300, lk=300, d=64, q_off=0, k_off=0, window=None),
        dict(b=1, h=12, lq=256, lk=640, d=64, q_off=384, k_off=0, window=None),
        dict(b=1, h=6, lq=1000, lk=1000, d=32, q_off=0, k_off=0, window=1),
        dict(b=1, h=6, lq=1000, lk=1000, d=32, q_off=0, k_off=0, window=3),
        dict(b=1, h=7, lq=777, lk=777, d=128, q_off=4096, k_off=4096, window=40),
    ]
    rows = []
    for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        for case in cases:
            gen = torch.Generator(device="cuda").manual_seed(0)

            def rand(length, case=case, gen=gen):
                return torch.randn(case["b"], case["h"], length, case["d"], device="cuda", generator=gen)

            q, k, v = rand(case["lq"]), rand(case["lk"]), rand(case["lk"])
            grad = rand(case["lq"])
            head_slopes = slopes(case["h"]).cuda()
            want = reference_attention(q, k, v, head_slopes, case["q_off"], case["k_off"], case["window"])
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            reference_attention(q64, k64, v64, head_slopes, case["q_off"], case["k_off"], case["window"]).backward(
                grad.double()
            )
            qs, ks, vs = (t.to(dtype).requires_grad_() for t in (q, k, v))
            out = alibi_attention(
                qs, ks, vs, head_slopes, case["q_off"], case["k_off"], backend="flex", window=case["window"]
            )
            out.backward(grad.to(dtype))
            errors = {
                "out": (out.double() - want).abs().max().item(),
                "dq": (qs.grad.double() - q64.grad).abs().max().item(),
                "dk": (ks.grad.double() - k64.grad).abs().max().item(),
                "dv": (vs.grad.double() - v64.grad).abs().max().item(),
            }
            row = {"section": "flex", "dtype": str(dtype).removeprefix("torch."), **case, "max_abs_error": errors}
            row["status"] = "ok" if max(errors.values()) <= tolerance else f"error above {tolerance}"
            say(f"flex {row['dtype']} {case}: {row['status']} ({max(errors.values()):.2e})")
            rows.append(row)
    return rows


def time_attention(say) -> list[dict]:
    from pretrain.bench.attention import AttentionBenchParams, measure

    params = AttentionBenchParams(
        lengths=(2048, 4096, 8192, 16384, 32768),
        backends=("fused", "sdpa_causal_nobias", "sdpa"),
        batch=1,
        heads=16,
        head_dim=64,
        dtype="bfloat16",
        device="cuda",
        repeats=10,
        warmup=3,
    )
    rows = []
    for length in params.lengths:
        by_backend = {}
        for backend in params.backends:
            bias_bytes = params.heads * length * length * 4
            if backend == "sdpa" and bias_bytes > 16 * 1024**3:
                row = {"length": length, "backend": backend, "status": f"skipped: its bias is {bias_bytes >> 30} GiB"}
            else:
                row = measure(params, backend, length)
                torch.cuda.empty_cache()
            by_backend[backend] = row
            rows.append({"section": "attention", **row})
        fused, floor = by_backend["fused"], by_backend["sdpa_causal_nobias"]
        if fused.get("time_ms") and floor.get("time_ms"):
            ratio = fused["time_ms"] / floor["time_ms"]
            rows[-3]["fused_over_flash"] = ratio
            say(f"attention L={length}: fused {fused['time_ms']:.2f} ms, flash (no bias) {floor['time_ms']:.2f} ms, "
                f"ratio {ratio:.2f} (target <= 1.2)")  # fmt: skip
    return rows


def train_steps(say, out_dir: Path) -> list[dict]:
    import json
    import subprocess
    import sys

    rows = []
    for model in ("125m", "350m"):
        out = out_dir / f"gpu-train-step-{model}.json"
        command = [sys.executable, "-m", "pretrain.bench", "train_step", "--device", "cuda", "--impls", "ours"]
        command += ["--models", model, "--lengths", "2048", "--dtype", "bfloat16", "--out", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            rows.append({"section": "train_step", "model": model, "status": f"failed: {proc.stderr[-1500:]}"})
            continue
        for row in json.loads(out.read_text())["rows"]:
            rows.append({"section": "train_step", **row})
            say(f"train_step {model}: {row.get('tokens_per_s')} tokens/s, mfu {row.get('mfu')}")
    return rows


def ring_on_gpu(say) -> list[dict]:
    import torch.distributed as dist

    from pretrain.ops.alibi import slopes
    from pretrain.ops.attention import alibi_attention
    from pretrain.parallel.distributed import free_port
    from pretrain.parallel.ring import RingAttention

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    rows = []
    for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        length, heads = 4096, 16
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, grad = (torch.randn(1, heads, length, 64, device="cuda", generator=gen) for _ in range(4))
        head_slopes = slopes(heads).cuda()
        results = []
        for attend in (
            RingAttention(dist.group.WORLD, length, zigzag=True),
            lambda q, k, v, s: alibi_attention(q, k, v, s),
        ):
            qs, ks, vs = (t.to(dtype).requires_grad_() for t in (q, k, v))
            out = attend(qs, ks, vs, head_slopes)
            out.backward(grad.to(dtype))
            results.append([t.float() for t in (out, qs.grad, ks.grad, vs.grad)])
        errors = {name: (a - b).abs().max().item() for name, a, b in zip(("out", "dq", "dk", "dv"), *results)}
        row = {"section": "ring", "dtype": str(dtype).removeprefix("torch."), "length": length, "max_abs_error": errors}
        row["status"] = "ok" if max(errors.values()) <= tolerance else f"error above {tolerance}"
        say(f"ring {row['dtype']}: {row['status']} ({max(errors.values()):.2e})")
        rows.append(row)
    return rows


def eval_long(say) -> list[dict]:
    from torch._dynamo.utils import counters

    from pretrain.config import ModelConfig
    from pretrain.eval.perplexity import token_losses
    from pretrain.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=8192)).cuda().eval()  # model=tiny: 4 heads of 32
    before = counters["stats"]["unique_graphs"]
    rows = []
    for length in (2048, 4096, 8192, 16384, 32768, 65536):
        for window in (None, 128):
            ids = torch.randint(0, 8192, (1, length + 1), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            started = time.perf_counter()
            with torch.inference_mode():
                losses = token_losses(model, ids[:, :-1], ids[:, 1:], window=window)
            torch.cuda.synchronize()
            row = {
                "section": "eval",
                "length": length,
                "window": window,
                "loss": losses.mean().item(),
                "seconds": time.perf_counter() - started,
                "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                "compiled_graphs_so_far": counters["stats"]["unique_graphs"] - before,
                "status": "ok" if torch.isfinite(losses).all() else "non-finite loss",
            }
            say(f"eval L={length} window={window}: {row['peak_extra_mib']:.0f} MiB, {row['seconds']:.2f} s, "
                f"{row['compiled_graphs_so_far']} graphs compiled so far")  # fmt: skip
            rows.append(row)
    return rows


def main(argv: list[str], prog: str = "python -m pretrain.bench gpu") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the JSON report (default: docs/results/gpu-<device>.json)")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections not to run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{prog} needs a CUDA GPU, and this machine has none (torch {torch.__version__}); nothing was run")
        return 2
    started = now_iso()
    device = torch.cuda.get_device_name().replace(" ", "-")
    out = args.out or RESULTS / f"gpu-{device}.json"
    rows: list[dict] = []
    seconds = {}
    for section in SECTIONS:
        if section in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            if section == "flex":
                rows += check_flex(print)
            elif section == "attention":
                rows += time_attention(print)
            elif section == "train_step":
                rows += train_steps(print, out.parent)
            elif section == "ring":
                rows += ring_on_gpu(print)
            else:
                rows += eval_long(print)
        except Exception:  # one section's failure is a result too; the others still run
            rows.append({"section": section, "status": "error", "traceback": traceback.format_exc()[-3000:]})
            print(f"{section}: error\n{rows[-1]['traceback']}")
        seconds[section] = round(time.perf_counter() - t0, 1)
    failed = [r for r in rows if r.get("status", "ok") != "ok" and not str(r["status"]).startswith("skipped")]
    write_report(out, "gpu", started, machine_info("cuda"), {"skip": args.skip}, rows, seconds=seconds)
    print(f"{len(rows)} rows, {len(failed)} not ok; seconds per section: {seconds}")
    return 1 if failed else 0
