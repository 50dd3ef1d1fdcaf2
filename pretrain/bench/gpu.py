"""The GPU acceptance run: everything about the CUDA path that a CPU cannot prove, in one command.

    python -m pretrain.bench gpu [--rehearse] [--peak-flops X] [--out docs/results/gpu-<device>.json]
        [--skip SECTION ...]

Sections (each recorded as rows in the JSON; one that fails records its error and the run goes on):

- ``flex``: FlexAttention's fused ALiBi (``alibi_attention(..., backend="flex")``, compiled) against a float64
  reference built from the bias's definition, forward and backward, fp32 and bf16: odd head counts, Lq != Lk,
  offsets, windows of 1, 3 and 40, lengths that are not a multiple of 128.
- ``attention``: forward+backward time and peak memory at L = 2,048 .. 16,384 (B=1, 16 heads of 64, bf16;
  ``--long`` adds 32,768): ``fused`` against SDPA's flash kernel with ``is_causal=True`` and no bias (the
  floor) and against the materialized-bias path (``sdpa``, where its bias fits in memory).
- ``train_step``: the training-step benchmark for ``model=125m`` and ``model=350m``, bf16, sequences of 2,048,
  8 of them a step (16,384 tokens: one sequence a step leaves the GPU waiting on launches and per-parameter
  loops; the row says ``tokens_per_step``), with MFU against the device's dense
  peak (``pretrain.perf.flops.device_peak_flops``, or ``--peak-flops``); it runs
  ``python -m pretrain.bench train_step`` in its own processes.
- ``ring``: ring attention on one rank with the zigzag layout (two chunks, so blocks merge through their
  log-sum-exp), each block on the GPU kernel, against the unsplit fused kernel: output and gradients, each
  run on its own leaf tensors.
- ``eval``: a tiny model's perplexity windows at 2,048 .. 32,768 tokens (``--long``: 65,536) and the windowed
  control under ``inference_mode``: each length's peak memory.

Every section records how many kernels torch compiled in it (``torch._dynamo``'s count of compiled graphs):
``kernels`` in the report, per section and in all, checked against ``flex.BENCH_KERNELS``.

Targets, each a row of section ``target`` with its own status: ``fused / flash <= 1.2x`` at each attention
length, and ``MFU >= 40%`` for 125m and 350m bf16 at seq 2048.

``--rehearse``: the same sections, calls, rows and exit logic on CPU at small sizes, so that whatever a CPU can
catch fails here and not on the GPU: FlexAttention compiled on CPU (forward only: torch has no compiled
FlexAttention backward on CPU, so where the GPU run takes gradients the rehearsal runs under ``no_grad``, and
its static-shape kernels, see ``flex.dynamic_shapes``); the ring on a one-rank gloo process group with the CPU
block kernel (forward and backward); one tiny training step in its own process; the tiny model's eval at
256 .. 2,048 tokens, its attention through FlexAttention. Target rows are computed but not judged
(``rehearsed``).

Time on one H200, estimated from the kernel count (no GPU has run this version): about 20 FlexAttention
kernels at 10-25 s of compile each, two ``train_step`` processes of about a minute each, and the timings: 6 to 9
minutes. ``--long`` adds the longest lengths; ``--skip`` leaves sections out of a rerun.

Exit status: 0 when every row is ok and every target met (or rehearsed); 1 when every row is ok but a target
was missed; 2 when anything erred (a section raised, a correctness check failed, more kernels than the bound,
or no CUDA without ``--rehearse``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pretrain.bench.report import machine_info, now_iso, write_report

SECTIONS = ("flex", "attention", "train_step", "ring", "eval")
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
EXIT_OK, EXIT_MISSED, EXIT_ERROR = 0, 1, 2
ATTENTION_RATIO_TARGET = 1.2  # fused / flash (causal, no bias) time, at most
MFU_TARGET = 0.40
# Row statuses that are not errors: a target met or missed, a target not judged, a row skipped on purpose.
TARGET_STATUSES = ("pass", "miss", "rehearsed", "not measured")

FLEX_CASES = (
    dict(b=2, h=5, lq=300, lk=300, d=64, q_off=0, k_off=0, window=None),
    dict(b=1, h=12, lq=256, lk=640, d=64, q_off=384, k_off=0, window=None),
    dict(b=1, h=6, lq=1000, lk=1000, d=32, q_off=0, k_off=0, window=1),
    dict(b=1, h=6, lq=1000, lk=1000, d=32, q_off=0, k_off=0, window=3),
    dict(b=1, h=7, lq=777, lk=777, d=128, q_off=4096, k_off=4096, window=40),
)


@dataclass(frozen=True)
class Plan:
    """Sizes and modes of one run: ``gpu_plan()`` on CUDA, ``rehearsal_plan()`` on CPU. The same code runs both."""

    device: str
    rehearsal: bool
    backward: bool  # gradients where the GPU run takes them (False: the rehearsal's forward-only FlexAttention)
    flex_cases: tuple = FLEX_CASES
    attention_lengths: tuple = (2048, 4096, 8192, 16384)
    attention_fused: str = "fused"  # the backend timed against the flash floor
    attention_heads: int = 16
    attention_repeats: int = 10
    attention_warmup: int = 3
    sdpa_bias_limit_bytes: int = 16 * 1024**3
    train_models: tuple = ("125m", "350m")
    train_length: int = 2048
    train_micro_batch: int = 8
    train_dtype: str = "bfloat16"
    train_steps: tuple = ("--steps", "10", "--warmup", "3")
    ring_length: int = 4096
    ring_heads: int = 16
    ring_backend: str = "nccl"
    eval_lengths: tuple = (2048, 4096, 8192, 16384, 32768)
    eval_window: int = 128
    peak_flops: float | None = None
    notes: tuple = field(default_factory=tuple)


def gpu_plan(long: bool = False, peak_flops: float | None = None) -> Plan:
    plan = Plan(device="cuda", rehearsal=False, backward=True, peak_flops=peak_flops)
    if long:
        plan = replace(
            plan, attention_lengths=plan.attention_lengths + (32768,), eval_lengths=plan.eval_lengths + (65536,)
        )
    return plan


def rehearsal_plan(peak_flops: float | None = None) -> Plan:
    return Plan(
        device="cpu",
        rehearsal=True,
        backward=False,
        attention_lengths=(256, 512),
        attention_fused="flex",
        attention_repeats=2,
        attention_warmup=1,
        train_models=("tiny",),
        train_length=128,
        train_micro_batch=2,
        train_dtype="float32",
        train_steps=("--steps", "1", "--warmup", "1", "--min-time", "0", "--threads", "1"),
        ring_length=512,
        ring_backend="gloo",
        eval_lengths=(256, 512, 1024, 2048),
        peak_flops=peak_flops,
        notes=(
            "rehearsal on CPU: FlexAttention forward only (no compiled backward on CPU in this torch), static-shape "
            "kernels (see flex.dynamic_shapes); the ring's blocks run the CPU kernel; targets are not judged",
        ),
    )


def status_of(errors: dict, tolerance: float) -> str:
    worst = max(errors.values())
    return "ok" if worst <= tolerance else f"error: {worst:.2e} above {tolerance}"


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


def check_flex(plan: Plan, say) -> list[dict]:
    from pretrain.ops.alibi import slopes
    from pretrain.ops.attention import alibi_attention

    rows = []
    for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        for case in plan.flex_cases:
            gen = torch.Generator(device=plan.device).manual_seed(0)

            def rand(length, case=case, gen=gen):
                return torch.randn(case["b"], case["h"], length, case["d"], device=plan.device, generator=gen)

            q, k, v = rand(case["lq"]), rand(case["lk"]), rand(case["lk"])
            grad = rand(case["lq"])
            head_slopes = slopes(case["h"]).to(plan.device)
            args = (head_slopes, case["q_off"], case["k_off"])
            want = reference_attention(q, k, v, *args, case["window"])
            qs, ks, vs = (t.to(dtype).detach().clone().requires_grad_(plan.backward) for t in (q, k, v))
            with torch.enable_grad() if plan.backward else torch.no_grad():
                out = alibi_attention(qs, ks, vs, *args, backend="flex", window=case["window"])
            errors = {"out": (out.double() - want).abs().max().item()}
            if plan.backward:
                q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
                reference_attention(q64, k64, v64, *args, case["window"]).backward(grad.double())
                out.backward(grad.to(dtype))
                for name, ours, theirs in (("dq", qs, q64), ("dk", ks, k64), ("dv", vs, v64)):
                    errors[name] = (ours.grad.double() - theirs.grad).abs().max().item()
            row = {"section": "flex", "dtype": str(dtype).removeprefix("torch."), **case, "max_abs_error": errors}
            row["backward"] = plan.backward
            row["status"] = status_of(errors, tolerance)
            say(f"flex {row['dtype']} {case}: {row['status']} ({max(errors.values()):.2e})")
            rows.append(row)
    return rows


def time_backend(plan: Plan, backend: str, length: int) -> dict:
    """Median time and peak extra memory of one backend at one length: forward+backward on the GPU (``measure``
    of the attention benchmark), forward only in the rehearsal."""
    from pretrain.bench.attention import AttentionBenchParams, attention_call, make_inputs, measure
    from pretrain.ops.alibi import slopes
    from pretrain.perf.memory import MIB, peak_memory_meter

    params = AttentionBenchParams(
        lengths=(length,),
        backends=(backend,),
        batch=1,
        heads=plan.attention_heads,
        head_dim=64,
        dtype="bfloat16",
        device=plan.device,
        repeats=plan.attention_repeats,
        warmup=plan.attention_warmup,
    )
    if plan.backward:
        return measure(params, backend, length)
    q, k, v = (t.detach() for t in make_inputs(params, length)[:3])
    head_slopes = slopes(plan.attention_heads)
    attend = attention_call(backend)
    with torch.no_grad():
        for _ in range(params.warmup):
            attend(q, k, v, head_slopes)
        meter = peak_memory_meter(torch.device(plan.device))
        meter.start()
        times_ms = []
        for _ in range(params.repeats):
            t0 = time.perf_counter()
            attend(q, k, v, head_slopes)
            times_ms.append((time.perf_counter() - t0) * 1000)
    times_ms.sort()
    return {
        "length": length,
        "backend": backend,
        "status": "ok",
        "time_ms": times_ms[len(times_ms) // 2],
        "times_ms": times_ms,
        "peak_extra_mib": meter.peak_extra_bytes() / MIB,
        "memory_method": meter.method,
        "forward_only": True,
    }


def time_attention(plan: Plan, say) -> list[dict]:
    backends = (plan.attention_fused, "sdpa_causal_nobias", "sdpa")
    rows = []
    for length in plan.attention_lengths:
        by_backend = {}
        for backend in backends:
            bias_bytes = plan.attention_heads * length * length * 4
            if backend == "sdpa" and bias_bytes > plan.sdpa_bias_limit_bytes:
                row = {"length": length, "backend": backend, "status": f"skipped: its bias is {bias_bytes >> 30} GiB"}
            else:
                row = time_backend(plan, backend, length)
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
            by_backend[backend] = row
            rows.append({"section": "attention", **row})
        fused, floor = by_backend[plan.attention_fused], by_backend["sdpa_causal_nobias"]
        if fused.get("time_ms") and floor.get("time_ms"):
            ratio = fused["time_ms"] / floor["time_ms"]
            rows[-3]["fused_over_flash"] = ratio
            say(f"attention L={length}: fused {fused['time_ms']:.2f} ms, flash (no bias) {floor['time_ms']:.2f} ms, "
                f"ratio {ratio:.2f} (target <= {ATTENTION_RATIO_TARGET})")  # fmt: skip
    return rows


def device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device == "cuda" else machine_info("cpu")["device_name"]


def add_mfu(row: dict, plan: Plan, peak: float | None) -> None:
    """Add ``tokens_per_step``, ``flops_per_token``, ``peak_flops`` and ``mfu`` (None without a peak) to a row."""
    from pretrain.bench.train_step import model_shape
    from pretrain.config import ModelConfig
    from pretrain.perf.flops import flops_per_token, mfu

    shape = model_shape(row["model"])
    cfg = ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model, seq_len=row["seq"])
    per_token = flops_per_token(cfg, row["n_params"], row["seq"])
    row.update(tokens_per_step=plan.train_micro_batch * row["seq"], flops_per_token=per_token, peak_flops=peak)
    row["mfu"] = mfu(row["tokens_per_s"], per_token, peak) if row.get("tokens_per_s") else None


def train_steps(plan: Plan, say, out_dir: Path) -> list[dict]:
    from pretrain.perf.flops import device_peak_flops

    precision = "bf16" if plan.train_dtype == "bfloat16" else "fp32"
    peak = plan.peak_flops or device_peak_flops(device_name(plan), precision)
    rows = []
    if peak is None:
        say(f"train_step: no dense peak known for {device_name(plan)} ({precision}); MFU omitted (--peak-flops X)")
    for model in plan.train_models:
        out = out_dir / f"gpu-train-step-{model}{'-rehearsal' if plan.rehearsal else ''}.json"
        command = [sys.executable, "-m", "pretrain.bench", "train_step", "--device", plan.device, "--impls", "ours"]
        command += ["--models", model, "--lengths", str(plan.train_length), "--dtype", plan.train_dtype]
        command += ["--micro-batch", str(plan.train_micro_batch), *plan.train_steps, "--out", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            rows.append({"section": "train_step", "model": model, "status": f"error: {proc.stderr[-1500:]}"})
            continue
        for row in json.loads(out.read_text())["rows"]:
            row = {"section": "train_step", **row}
            if row.get("status") == "ok":
                add_mfu(row, plan, peak)
            rows.append(row)
            mfu_text = "omitted" if row.get("mfu") is None else f"{row['mfu']:.1%}"
            say(f"train_step {model}: {row.get('tokens_per_step')} tokens a step, {row.get('tokens_per_s')} tokens/s, "
                f"mfu {mfu_text}")  # fmt: skip
    return rows


def compare_ring(plan: Plan, dtype, ring_attend, reference_attend) -> dict:
    """Ring against the unsplit kernel at one dtype: output and gradients, each run on its own leaf tensors.

    ``t.to(dtype)`` of a tensor already in ``dtype`` is that tensor: the two runs must not share leaves (and so
    one ``.grad``), or the comparison is of a gradient with itself.
    """
    from pretrain.ops.alibi import slopes

    tolerance = 2e-3 if dtype == torch.float32 else 5e-2
    length, heads = plan.ring_length, plan.ring_heads
    gen = torch.Generator(device=plan.device).manual_seed(0)
    q, k, v, grad = (torch.randn(1, heads, length, 64, device=plan.device, generator=gen) for _ in range(4))
    head_slopes = slopes(heads).to(plan.device)
    results = []
    for attend in (ring_attend, reference_attend):
        qs, ks, vs = (t.to(dtype).detach().clone().requires_grad_() for t in (q, k, v))
        out = attend(qs, ks, vs, head_slopes)
        out.backward(grad.to(dtype))
        results.append([t.float() for t in (out, qs.grad, ks.grad, vs.grad)])
    errors = {name: (a - b).abs().max().item() for name, a, b in zip(("out", "dq", "dk", "dv"), *results)}
    row = {"section": "ring", "dtype": str(dtype).removeprefix("torch."), "length": length, "max_abs_error": errors}
    row["status"] = status_of(errors, tolerance)
    return row


def ring_on_gpu(plan: Plan, say) -> list[dict]:
    import torch.distributed as dist

    from pretrain.ops.attention import alibi_attention
    from pretrain.parallel.distributed import free_port
    from pretrain.parallel.ring import RingAttention

    if not dist.is_initialized():
        url = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(plan.ring_backend, init_method=url, rank=0, world_size=1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ring = RingAttention(dist.group.WORLD, plan.ring_length, zigzag=True)
        row = compare_ring(plan, dtype, ring, lambda q, k, v, s: alibi_attention(q, k, v, s))
        say(f"ring {row['dtype']}: {row['status']} ({max(row['max_abs_error'].values()):.2e})")
        rows.append(row)
    return rows


def eval_long(plan: Plan, say) -> list[dict]:
    from pretrain.config import ModelConfig
    from pretrain.eval.perplexity import token_losses
    from pretrain.model.gpt import GPT
    from pretrain.perf.memory import MIB, peak_memory_meter

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=8192)).to(plan.device).eval()  # model=tiny: 4 heads of 32
    if plan.device == "cpu":  # the GPU's kernel: "fused" on CPU is the blockwise one
        for block in model.h:
            block.self_attention.backend = "flex"
    rows = []
    for length in plan.eval_lengths:
        for window in (None, plan.eval_window):
            ids = torch.randint(0, 8192, (1, length + 1), device=plan.device)
            meter = peak_memory_meter(torch.device(plan.device))
            meter.start()
            started = time.perf_counter()
            with torch.inference_mode():
                losses = token_losses(model, ids[:, :-1], ids[:, 1:], window=window)
            if plan.device == "cuda":
                torch.cuda.synchronize()
            row = {
                "section": "eval",
                "length": length,
                "window": window,
                "loss": losses.mean().item(),
                "seconds": time.perf_counter() - started,
                "peak_extra_mib": meter.peak_extra_bytes() / MIB,
                "status": "ok" if torch.isfinite(losses).all() else "error: non-finite loss",
            }
            say(f"eval L={length} window={window}: {row['peak_extra_mib']:.0f} MiB, {row['seconds']:.2f} s")
            rows.append(row)
    return rows


def target_rows(plan: Plan, rows: list[dict]) -> list[dict]:
    """One row per target: ``pass``/``miss`` on the GPU, ``rehearsed`` in the rehearsal (computed, not judged),
    ``not measured`` where the row it reads is missing (that row's own status says why)."""

    def judged(value, met: bool) -> str:
        if value is None:
            return "not measured"
        return "rehearsed" if plan.rehearsal else ("pass" if met else "miss")

    targets = []
    fused = {r["length"]: r for r in rows if r["section"] == "attention" and r.get("backend") == plan.attention_fused}
    for length in plan.attention_lengths:
        ratio = fused.get(length, {}).get("fused_over_flash")
        targets.append({
            "section": "target", "name": f"fused / flash <= {ATTENTION_RATIO_TARGET}x at L={length}",
            "value": ratio, "status": judged(ratio, ratio is not None and ratio <= ATTENTION_RATIO_TARGET),
        })  # fmt: skip
    steps = {r["model"]: r for r in rows if r["section"] == "train_step" and r.get("status") == "ok"}
    for model in plan.train_models:
        value = steps.get(model, {}).get("mfu")
        targets.append({
            "section": "target",
            "name": f"MFU >= {MFU_TARGET:.0%} for {model} {plan.train_dtype} at seq {plan.train_length}",
            "value": value, "status": judged(value, value is not None and value >= MFU_TARGET),
        })  # fmt: skip
    return targets


def exit_status(rows: list[dict]) -> int:
    """2 when a row erred, else 1 when a target was missed, else 0 (see the module docstring)."""
    statuses = [str(r.get("status", "ok")) for r in rows]
    if any(s != "ok" and s not in TARGET_STATUSES and not s.startswith("skipped") for s in statuses):
        return EXIT_ERROR
    return EXIT_MISSED if "miss" in statuses else EXIT_OK


def compiled_kernels() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run(plan: Plan, skip, out_dir: Path, say=print) -> tuple[list[dict], dict, dict]:
    """Every section not skipped, in order: ``(rows, seconds per section, kernels compiled per section)``."""
    import pretrain.ops.attention.flex as flex

    sections = {"flex": check_flex, "attention": time_attention, "ring": ring_on_gpu, "eval": eval_long}
    rows: list[dict] = []
    seconds, kernels = {}, {}
    dynamic = flex.dynamic_shapes
    flex.dynamic_shapes = not plan.rehearsal  # see flex.dynamic_shapes: CPU needs static kernels
    try:
        for section in SECTIONS:
            if section in skip:
                continue
            t0, before = time.perf_counter(), compiled_kernels()
            try:
                if section == "train_step":
                    rows += train_steps(plan, say, out_dir)
                else:
                    rows += sections[section](plan, say)
            except Exception:  # one section's failure is a result too; the others still run
                rows.append({"section": section, "status": "error", "traceback": traceback.format_exc()[-3000:]})
                say(f"{section}: error\n{rows[-1]['traceback']}")
            seconds[section] = round(time.perf_counter() - t0, 1)
            kernels[section] = compiled_kernels() - before
    finally:
        flex.dynamic_shapes = dynamic
    total = sum(kernels.values())
    kernels["total"] = total
    bound = flex.BENCH_KERNELS
    status = "ok" if total <= bound else f"error: {total} kernels, above the bound {bound} (flex.BENCH_KERNELS)"
    rows.append({"section": "kernels", "compiled": kernels, "bound": bound, "status": status})
    rows += target_rows(plan, rows)
    return rows, seconds, kernels


def main(argv: list[str], prog: str = "python -m pretrain.bench gpu") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the JSON report (default: docs/results/gpu-<device>.json)")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections not to run")
    parser.add_argument("--rehearse", action="store_true", help="the same run on CPU at small sizes (see above)")
    parser.add_argument("--long", action="store_true", help="add L=32768 attention and 65,536-token eval")
    parser.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s for MFU (default: its data sheet)")
    args = parser.parse_args(argv)
    if args.rehearse:
        plan = rehearsal_plan(args.peak_flops)
    elif not torch.cuda.is_available():
        print(f"{prog} needs a CUDA GPU, and this machine has none (torch {torch.__version__}); nothing was run "
              "(--rehearse runs it on CPU)")  # fmt: skip
        return EXIT_ERROR
    else:
        plan = gpu_plan(args.long, args.peak_flops)
    started = now_iso()
    device = device_name(plan).replace(" ", "-")
    out = args.out or RESULTS / (f"gpu-rehearsal-{device}.json" if plan.rehearsal else f"gpu-{device}.json")
    for note in plan.notes:
        print(note)
    rows, seconds, kernels = run(plan, args.skip, out.parent)
    status = exit_status(rows)
    params = {"skip": args.skip, "plan": asdict(plan)}
    write_report(out, "gpu", started, machine_info(plan.device), params, rows, seconds=seconds, kernels=kernels)
    for row in rows:
        if row["section"] == "target":
            value = "-" if row["value"] is None else f"{row['value']:.3g}"
            print(f"{row['status']}: {row['name']} ({value})")
    failed = [r for r in rows if exit_status([r]) == EXIT_ERROR]
    print(f"{len(rows)} rows, {len(failed)} erred; kernels compiled per section: {kernels}; "
          f"seconds per section: {seconds}; exit {status}")  # fmt: skip
    return status
