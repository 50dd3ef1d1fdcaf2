"""Benchmark of a training step: our GPT through the DeepSpeed engine against Hugging Face's BLOOM of the same shape.

    python -m pretrain.bench train_step [--models tiny 125m] [--lengths 512 2048 8192] [--micro-batch 1]
        [--vocab 8192] [--steps N] [--warmup N] [--dtype float32|bfloat16] [--device cpu|cuda]
        [--max-seconds S] [--max-memory-gib G] [--impls ours bloom] [--threads N] [--out PATH.json]

- ``ours``: the real training path. ``GPT`` (ALiBi, fused attention) under ``deepspeed.initialize`` with our
  optimizer and schedule (``optim.build_optimizer``) and the generated config (``deepspeed_config``: ZeRO-0,
  gradient clipping 1.0; fp32 on CPU, bf16 on CUDA); a step is ``train.forward_loss``, ``engine.backward``,
  the ZeRO-0 gradient norm the training loop logs, and ``engine.step``.
- ``bloom``: ``transformers.BloomForCausalLM`` of exactly the same shape (``BloomConfig(vocab_size,
  hidden_size, n_layer, n_head, hidden_dropout=0, attention_dropout=0)``) in a plain PyTorch loop, what a
  user would pick instead: forward with ``labels`` (``use_cache=False``), ``backward``,
  ``clip_grad_norm_(1.0)``, ``AdamW.step``, ``zero_grad``; fp32 on CPU, ``torch.autocast`` bf16 on CUDA.

Both see the same random tokens: one batch of ``--micro-batch`` sequences of ``L`` tokens (ours predicts the
``L`` next tokens, BLOOM shifts its labels inside and predicts ``L - 1``); tokens/s counts ``batch x L``.

Alternation: for each (model, length) each implementation runs in its own fresh process, both alive at
once; this process tells them one step at a time (ours, BLOOM, ours, BLOOM, ...) so that a change in the
machine's load falls on both. The time of a row is the median of its timed steps, after ``--warmup`` untimed
ones: ``--steps`` of them, or more while either implementation has had less than ``--min-time`` seconds of
them (CUDA steps are synchronized). On a small CPU shared with other work, two OpenMP
threads per worker wait on each other whenever the machine takes one core away; ``--threads 1`` trades
absolute speed for repeatable ratios.

Memory (``pretrain.perf.memory``): ``peak MiB`` is a step's peak beyond what the process held after the warm-up
(model, optimizer state): activations, gradients, temporaries. On CPU that is the RSS high-water mark of the
fresh process, reset after the warm-up and a ``malloc_trim``; it counts whole pages, an upper bound of live
bytes. On CUDA the caching allocator's peak. ``total MiB`` is the peak beyond the process's memory before the
model was built (after the imports), so it adds the weights, the optimizer state and whatever the framework
allocates at set-up.

Skips, never fake numbers: a row whose rough memory estimate (``estimate_step_bytes``) exceeds
``--max-memory-gib``, or whose last warm-up step shows that its steps would take longer than ``--max-seconds``,
is recorded as skipped with the reason (and, for the latter, the ``total MiB`` of its set-up and warm-up).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.bench.options import positive_float, positive_int
from pretrain.extras import optional_import
from pretrain.perf.memory import MIB

IMPLS = ("ours", "bloom")
MODELS = ("tiny", "125m", "350m")  # shapes read from conf/model/<name>.yaml, the one home of them
DEFAULT_MODELS = ("tiny", "125m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per device: lengths, timed steps, warm-up steps, dtype, seconds of timed steps a row gets at least.
DEFAULTS = {
    "cpu": ((512, 2048, 8192), 3, 1, "float32", 10.0),
    "cuda": ((512, 2048, 8192), 20, 3, "bfloat16", 2.0),
}
MAX_ROUNDS = 500  # timed steps per row at most, however short they are
RESULT_PREFIX = "BENCH_STEP "  # how a worker answers, on one stdout line (DeepSpeed logs go there too)
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layer: int
    d_model: int
    n_head: int


@dataclass(frozen=True)
class TrainStepBenchParams:
    """What one run measures; written to the JSON as ``params``."""

    models: tuple[str, ...]
    lengths: tuple[int, ...]
    impls: tuple[str, ...]
    micro_batch: int
    vocab: int
    steps: int
    warmup: int
    dtype: str
    device: str
    min_time: float
    max_seconds: float
    max_memory_gib: float
    threads: int | None


def model_shape(name: str) -> ModelShape:
    """``n_layer``, ``d_model``, ``n_head`` of ``model=<name>``, from its YAML in ``conf/model``."""
    from omegaconf import OmegaConf

    from pretrain.__main__ import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    return ModelShape(name, int(cfg.n_layer), int(cfg.d_model), int(cfg.n_head))


def estimate_step_bytes(impl: str, shape: ModelShape, length: int, batch: int, vocab: int) -> int:
    """A rough upper estimate of a training process's memory, only to skip rows that cannot fit.

    fp32 model states (weights, gradients, AdamW's two moments: 16 bytes a parameter); about 16 values of
    ``d_model`` per token and layer saved for backward (input and attention LayerNorms, q/k/v, attention
    output, the two 4·d MLP activations); the logits, their log-softmax and both gradients. BLOOM adds its
    float32 ``[batch, heads, L, L]`` attention probabilities, saved in every layer, plus about three more of
    that size at once (scores, the masked scores and, in backward, their gradient) and the ``[L, L]`` mask.
    """
    d, n_layer = shape.d_model, shape.n_layer
    params = vocab * d + n_layer * (12 * d * d + 13 * d) + 4 * d
    tokens = batch * length
    total = 16 * params + 4 * 16 * tokens * d * n_layer + 4 * 4 * tokens * vocab
    if impl == "bloom":
        total += 4 * batch * shape.n_head * length * length * (n_layer + 3)
    return total


def available_memory_bytes(device: str) -> int:
    """Memory a new process may use: ``MemAvailable`` on CPU, the device's free memory on CUDA."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 8 * GIB


# --- the worker: one implementation, one model, one length, in its own process ------------------------------


class OursStep:
    """Our GPT under the DeepSpeed engine, configured as ``train.run_train`` configures it."""

    def __init__(self, shape: ModelShape, length: int, params: TrainStepBenchParams):
        import deepspeed

        from pretrain.config import ModelConfig, TrainConfig
        from pretrain.model.gpt import GPT
        from pretrain.parallel.deepspeed_config import deepspeed_config
        from pretrain.train.loop import skip_lone_allreduce
        from pretrain.train.optim import build_optimizer

        self.tcfg = TrainConfig(
            max_steps=params.warmup + params.steps,
            micro_batch_size=params.micro_batch,
            zero_stage=0,
            precision="bf16" if params.dtype == "bfloat16" else "fp32",
        )
        model_cfg = ModelConfig(
            n_layer=shape.n_layer, n_head=shape.n_head, d_model=shape.d_model, seq_len=length, vocab_size=params.vocab
        )
        torch.manual_seed(0)
        model = GPT(model_cfg)
        self.n_params = model.num_parameters()
        optimizer, scheduler = build_optimizer(model, self.tcfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.tcfg, 1, n_params=self.n_params),
        )
        skip_lone_allreduce(self.engine, 1, 0)

    def __call__(self, tokens: torch.Tensor) -> float:
        from pretrain.train.loop import forward_loss, grad_norm_stage0

        loss = forward_loss(self.engine, tokens[:, :-1], tokens[:, 1:], None)
        self.engine.backward(loss)
        grad_norm_stage0(self.engine.module)  # the training loop logs it for ZeRO-0 (DeepSpeed reports it above)
        self.engine.step()
        return loss.item()


class BloomStep:
    """Hugging Face's BLOOM of the same shape, in a plain PyTorch AdamW loop."""

    def __init__(self, shape: ModelShape, length: int, params: TrainStepBenchParams):
        transformers = optional_import("transformers", "the bloom baseline of bench train_step (--impls ours skips it)")
        BloomConfig, BloomForCausalLM = transformers.BloomConfig, transformers.BloomForCausalLM

        self.device = torch.device(params.device)
        self.autocast = params.dtype == "bfloat16"
        config = BloomConfig(
            vocab_size=params.vocab,
            hidden_size=shape.d_model,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        torch.manual_seed(0)
        self.model = BloomForCausalLM(config).to(self.device).train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def __call__(self, tokens: torch.Tensor) -> float:
        input_ids = tokens[:, :-1].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def answer(message: dict) -> None:
    print(RESULT_PREFIX + json.dumps(message), flush=True)


def worker(params: TrainStepBenchParams, impl: str, model: str, length: int) -> None:
    """Build one implementation, then serve the parent's commands on stdin (``step``, ``meter``, ``report``)."""
    from pretrain.perf.memory import peak_memory_meter

    device = torch.device(params.device)
    if params.threads is not None:
        torch.set_num_threads(params.threads)
    # Framework code the first step or optimizer would import lazily belongs to the baseline, not the model.
    importlib.import_module("torch._dynamo")
    if impl == "ours":
        from pretrain.parallel.distributed import DistContext, ensure_process_group

        ensure_process_group(DistContext())
    else:
        optional_import("transformers.models.bloom.modeling_bloom", "the bloom baseline of bench train_step")

    shape = model_shape(model)
    total_meter = peak_memory_meter(device)
    total_meter.start()
    started = time.perf_counter()
    step = (OursStep if impl == "ours" else BloomStep)(shape, length, params)
    tokens = torch.randint(
        0, params.vocab, (params.micro_batch, length + 1), generator=torch.Generator().manual_seed(1)
    )
    answer({"event": "ready", "n_params": step.n_params, "setup_s": time.perf_counter() - started})

    step_meter, setup_peak = None, 0
    for command in sys.stdin:
        command = command.strip()
        if command == "step":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            try:
                loss = step(tokens)
            except torch.OutOfMemoryError:
                answer({"error": "out of memory"})
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            answer({"time_s": time.perf_counter() - t0, "loss": loss})
        elif command == "meter":
            setup_peak = total_meter.peak_extra_bytes()  # set-up and warm-up, before the step meter resets the mark
            step_meter = peak_memory_meter(device)
            step_meter.start()
            answer({"method": step_meter.method})
        elif command == "report":
            # Without a step meter (a row stopped after its first step) only the total is known.
            answer(
                {
                    "peak_mib": None if step_meter is None else step_meter.peak_extra_bytes() / MIB,
                    "total_mib": max(setup_peak, total_meter.peak_extra_bytes()) / MIB,
                    "memory_method": (step_meter or total_meter).method,
                }
            )
            return
        elif command == "quit":
            return


# --- the parent: drives the workers in turn -----------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker died, timed out or reported an error; the message becomes the row's status."""


class WorkerProcess:
    """A running worker and the lines it answers with (read by a thread, so a wait can time out)."""

    def __init__(self, params: TrainStepBenchParams, impl: str, model: str, length: int):
        argv = [sys.executable, "-m", "pretrain.bench", "train_step", "--worker", impl, model, str(length)]
        argv += ["--micro-batch", str(params.micro_batch), "--vocab", str(params.vocab), "--dtype", params.dtype]
        argv += ["--device", params.device, "--steps", str(params.steps), "--warmup", str(params.warmup)]
        if params.threads is not None:
            argv += ["--threads", str(params.threads)]
        env = dict(os.environ)
        # The worker imports this same checkout of the package, wherever the parent was started from.
        project_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                self.lines.put(json.loads(line[len(RESULT_PREFIX) :]))
        self.lines.put(None)  # end of output: the worker exited

    def wait_answer(self, timeout: float) -> dict:
        try:
            message = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise WorkerFailed(f"skipped: no answer within {timeout:g} s (--max-seconds); stopped") from None
        if message is None:
            self.proc.wait()
            raise WorkerFailed(self._failure())
        if "error" in message:
            self.close()
            raise WorkerFailed(message["error"])
        return message

    def request(self, command: str, timeout: float) -> dict:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait()
            raise WorkerFailed(self._failure()) from None
        return self.wait_answer(timeout)

    def _failure(self) -> str:
        if self.proc.returncode is not None and self.proc.returncode < 0:
            return f"killed by signal {-self.proc.returncode} (out of memory?)"
        self.stderr.seek(0)
        tail = [line for line in self.stderr.read().strip().splitlines() if line.strip()][-1:] or ["no output"]
        return f"failed (exit {self.proc.returncode}): {tail[0]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def measure_pair(params: TrainStepBenchParams, model: str, length: int, say) -> list[dict]:
    """Rows of every implementation at one (model, length), their steps alternated between the workers."""
    shape = model_shape(model)
    tokens = params.micro_batch * length
    rows = {impl: {"model": model, "seq": length, "impl": impl, "status": "ok"} for impl in params.impls}
    workers: dict[str, WorkerProcess] = {}
    for impl in params.impls:
        estimate = estimate_step_bytes(impl, shape, length, params.micro_batch, params.vocab)
        rows[impl]["estimated_gib"] = estimate / GIB
        if estimate > params.max_memory_gib * GIB:
            rows[impl]["status"] = (
                f"skipped: needs about {estimate / GIB:.1f} GiB (rough estimate), over --max-memory-gib "
                f"{params.max_memory_gib:.1f}"
            )
        else:
            workers[impl] = WorkerProcess(params, impl, model, length)

    def fail(impl: str, reason: str) -> None:
        rows[impl]["status"] = reason
        workers.pop(impl).close()

    def each(command: str, timeout: float) -> dict[str, dict]:
        """Send ``command`` to every live worker in turn, waiting for each answer before the next."""
        answers = {}
        for impl in list(workers):
            try:
                answers[impl] = workers[impl].request(command, timeout)
            except WorkerFailed as err:
                fail(impl, str(err))
        return answers

    try:
        for impl in list(workers):
            try:
                ready = workers[impl].wait_answer(timeout=max(600.0, params.max_seconds))
                rows[impl].update(n_params=ready["n_params"], setup_s=ready["setup_s"])
            except WorkerFailed as err:
                fail(impl, f"set-up: {err}")
        for i in range(params.warmup):
            for impl, reply in each("step", params.max_seconds).items():
                rows[impl].setdefault("warmup_times_s", []).append(reply["time_s"])
                # Judged on the last warm-up step: earlier ones may hold one-time costs (compiling on CUDA).
                projected = reply["time_s"] * (params.warmup + params.steps)
                if i == params.warmup - 1 and projected > params.max_seconds:
                    try:  # what the set-up and the warm-up took is still a measurement
                        rows[impl]["total_mib"] = workers[impl].request("report", 120)["total_mib"]
                    except WorkerFailed:
                        pass
                    fail(
                        impl,
                        f"skipped: the last warm-up step took {reply['time_s']:.0f} s, so "
                        f"{params.warmup + params.steps} steps would take about {projected:.0f} s, over --max-seconds "
                        f"{params.max_seconds:.0f}",
                    )
        for impl, reply in each("meter", 120).items():
            rows[impl]["memory_method"] = reply["method"]
        # --steps rounds, then more while a worker has less than --min-time of timed steps (short steps are noisy).
        rounds = 0
        while workers and (
            rounds < params.steps
            or (rounds < MAX_ROUNDS and min(sum(rows[i]["times_s"]) for i in workers) < params.min_time)
        ):
            for impl, reply in each("step", params.max_seconds).items():
                rows[impl].setdefault("times_s", []).append(reply["time_s"])
                rows[impl]["loss"] = reply["loss"]
            rounds += 1
        for impl, reply in each("report", 120).items():
            time_s = statistics.median(rows[impl]["times_s"])
            rows[impl].update(
                time_s=time_s,
                tokens_per_s=tokens / time_s,
                peak_mib=reply["peak_mib"],
                total_mib=reply["total_mib"],
            )
            summary = f"{tokens / time_s:,.0f} tokens/s, {reply['peak_mib']:.1f} MiB"
            say(f"  {model} L={length} {impl}: {summary}")
            workers.pop(impl).close()
    finally:
        for impl in list(workers):
            workers.pop(impl).close()
    for row in rows.values():
        if row["status"] != "ok":
            say(f"  {model} L={length} {row['impl']}: {row['status']}")
    return list(rows.values())


# --- the report --------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Add each row's tokens/s and peak memory over BLOOM's at the same (model, length); None where one is missing."""
    reference = {(r["model"], r["seq"]): r for r in rows if r["impl"] == "bloom" and r["status"] == "ok"}
    for row in rows:
        ref = reference.get((row["model"], row["seq"]))
        ok = ref is not None and row["status"] == "ok"
        row["tokens_per_s_vs_bloom"] = row["tokens_per_s"] / ref["tokens_per_s"] if ok else None
        row["peak_vs_bloom"] = row["peak_mib"] / ref["peak_mib"] if ok and ref["peak_mib"] > 0 else None


def format_table(rows: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"{'model':<6}{'seq':>6}  {'impl':<6}{'tokens/s':>10}{'step s':>9}{'peak MiB':>10}{'total MiB':>11}"
        f"{'tok/s ours/BLOOM':>18}{'peak ours/BLOOM':>17}"
    ]
    for r in rows:
        head = f"{r['model']:<6}{r['seq']:>6}  {r['impl']:<6}"
        if r["status"] != "ok":
            lines.append(f"{head}  {r['status']}")
            continue
        ratios = ("", "") if r["impl"] == "bloom" else (num(r["tokens_per_s_vs_bloom"], 2), num(r["peak_vs_bloom"], 3))
        lines.append(
            f"{head}{num(r['tokens_per_s'], 0):>10}{num(r['time_s'], 3):>9}{num(r['peak_mib'], 1):>10}"
            f"{num(r['total_mib'], 1):>11}{ratios[0]:>18}{ratios[1]:>17}"
        )
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's targets for ``model=tiny``: PASS, MISS, SKIP (not measured) or INFO (report only)."""
    ok = {(r["impl"], r["seq"]): r for r in rows if r["model"] == "tiny" and r["status"] == "ok"}
    targets = [
        (2048, 1.5, 0.5, "at seq 2048 model=tiny: ours >= 1.5x BLOOM's tokens/s with <= half its peak memory"),
        (512, 1.0, None, "at seq 512 model=tiny: ours >= 1.0x BLOOM's tokens/s"),
        (8192, None, None, "at seq 8192 model=tiny: tokens/s and peak memory against BLOOM (reported)"),
    ]
    checks = []
    for length, speed_min, memory_max, name in targets:
        ours, bloom = ok.get(("ours", length)), ok.get(("bloom", length))
        if not (ours and bloom):
            checks.append({"name": name, "status": "SKIP", "detail": f"needs ours and BLOOM measured at seq {length}"})
            continue
        speed = ours["tokens_per_s"] / bloom["tokens_per_s"]
        memory = ours["peak_mib"] / bloom["peak_mib"] if bloom["peak_mib"] > 0 else float("inf")
        detail = (
            f"tokens/s {ours['tokens_per_s']:,.0f} / {bloom['tokens_per_s']:,.0f} = {speed:.2f}x"
            + (f" (>= {speed_min})" if speed_min else "")
            + f", peak {ours['peak_mib']:.1f} / {bloom['peak_mib']:.1f} MiB = {memory:.3f}"
            + (f" (<= {memory_max})" if memory_max else "")
        )
        if speed_min is None:
            status = "INFO"
        else:
            passed = speed >= speed_min and (memory_max is None or memory <= memory_max)
            status = "PASS" if passed else "MISS"
        checks.append({"name": name, "status": status, "detail": detail})
    return checks


def versions(impls: tuple[str, ...]) -> dict:
    import deepspeed

    found = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    if "bloom" in impls:
        found["transformers"] = optional_import("transformers", "the bloom baseline of bench train_step").__version__
    return found


# --- command line ------------------------------------------------------------------------------------------


def parse_params(argv: list[str], prog: str) -> tuple[TrainStepBenchParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS), help="default: tiny 125m")
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="sequence lengths (default: 512 2048 8192)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="default: ours bloom")
    parser.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--vocab", type=positive_int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per row (default cpu: 3, cuda: 20)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default cpu: 1, cuda: 3)")
    parser.add_argument(
        "--min-time",
        type=float,
        help="more timed steps while an implementation has had fewer seconds of them (default cpu: 10, cuda: 2)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default cpu: float32, cuda: bfloat16")
    parser.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    parser.add_argument(
        "--max-seconds",
        type=positive_float,
        default=300.0,
        help="time budget of one row (warm-up + timed steps); a row that would take longer is skipped (default 300)",
    )
    parser.add_argument(
        "--max-memory-gib",
        type=positive_float,
        help="skip a row whose rough memory estimate is larger (default: 60%% of the memory available at start)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch threads of each worker (default: torch's, one per core)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    # Internal: serve one (impl, model, length) in this process (the parent's worker).
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch; use --device cpu")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup {args.warmup} is not allowed; it must be >= 0")
    if args.min_time is not None and args.min_time < 0:
        parser.error(f"--min-time {args.min_time} is not allowed; it must be >= 0")
    lengths, steps, warmup, dtype, min_time = DEFAULTS[args.device]
    params = TrainStepBenchParams(
        models=tuple(dict.fromkeys(args.models)),
        lengths=tuple(dict.fromkeys(args.lengths or lengths)),
        impls=tuple(dict.fromkeys(args.impls)),
        micro_batch=args.micro_batch,
        vocab=args.vocab,
        steps=args.steps or steps,
        warmup=warmup if args.warmup is None else args.warmup,
        dtype=args.dtype or dtype,
        device=args.device,
        min_time=min_time if args.min_time is None else args.min_time,
        max_seconds=args.max_seconds,
        max_memory_gib=args.max_memory_gib or 0.6 * available_memory_bytes(args.device) / GIB,
        threads=args.threads,
    )
    return params, args


def main(argv: list[str], prog: str = "python -m pretrain.bench train_step") -> int:
    params, args = parse_params(argv, prog)
    if args.worker:
        impl, model, length = args.worker
        worker(params, impl, model, int(length))
        return 0

    from pretrain.bench.report import machine_info, now_iso, write_report

    started = now_iso()
    machine = {**machine_info(params.device), **versions(params.impls)}

    def say(text: str) -> None:
        print(text, flush=True)

    threads = params.threads or machine["torch_threads"]
    say(
        f"train_step benchmark on {machine['device_name']} ({params.device}, {threads} torch threads): "
        f"{', '.join(params.impls)}; micro-batch {params.micro_batch}, vocab {params.vocab}, "
        f"{params.dtype}; {params.warmup} warm-up + {params.steps} timed steps per row (or more, for "
        f"{params.min_time:g} s of them), alternated; "
        f"budget {params.max_seconds:.0f} s and {params.max_memory_gib:.1f} GiB per row"
    )
    rows = []
    for model in params.models:
        for length in params.lengths:
            rows += measure_pair(params, model, length, say)
    add_ratios(rows)
    checks = target_checks(rows)

    say("")
    say(format_table(rows))
    say("")
    for check in checks:
        say(f"{check['status']}: {check['name']}: {check['detail']}")
    write_report(
        args.out, "train_step", started, machine, params, rows, say,
        shapes={name: asdict(model_shape(name)) for name in params.models},
        checks=checks,
        load_average_1min_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )  # fmt: skip
    return 0
