"""The train stage: the GPT under the DeepSpeed engine, with checkpoints, exact resume and monitoring.

``run_train`` wires small parts together: the model (``model.py``), the optimizer and schedule
(``optim.py``), the generated DeepSpeed config (``deepspeed_config.py``), the data loader (``loader.py``),
checkpoints (``checkpoint.py``) and the monitor (``monitor.py``).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import Config, resolve_precision
from pretrain.data.loader import ValidationSplits, train_loader
from pretrain.data.prepare import install_tokenizer
from pretrain.data.tokenizer import EOS_ID
from pretrain.model.gpt import GPT
from pretrain.ops.documents import document_ids_from_tokens
from pretrain.parallel.deepspeed_config import deepspeed_config, global_batch, sequence_loss_scale
from pretrain.parallel.distributed import (
    DistContext,
    all_reduce,
    build_parallel_groups,
    ensure_process_group,
)
from pretrain.parallel.layout import SequenceLayout, check_split
from pretrain.parallel.sequence_parallel import apply_sequence_parallel
from pretrain.perf.flops import flops_per_token, mfu, peak_flops
from pretrain.perf.memory import MIB, peak_memory_meter, preload_framework_code
from pretrain.run_files import RunFiles, file_sha256
from pretrain.train.activation_checkpointing import apply_activation_checkpointing
from pretrain.train.checkpoint import CheckpointManager
from pretrain.train.guard import DivergenceGuard
from pretrain.train.length_schedule import LengthSchedule, ScheduledLoader, schedule_lengths
from pretrain.train.monitor import Monitor
from pretrain.train.optim import build_optimizer
from pretrain.train.profile import StepProfiler
from pretrain.train.resume import apply_overrides, check_resume, train_record
from pretrain.train.weights import load_init_weights, save_weights


class StopSignal:
    """Asks the loop to stop after the current step (with a checkpoint) on SIGTERM, as a scheduler sends
    before preempting an allocation, on Ctrl-C (SIGINT; a second one interrupts at once), on a time limit, or at
    ``train.stop_at_step``. Ranks agree on it."""

    def __init__(self, stop_at_step: int | None, time_limit_s: float | None, ctx: DistContext):
        self.stop_at_step = stop_at_step
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.ctx = ctx
        self.reason: str | None = None
        self.from_outside = False
        self._signals: list[str] = []
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name not in self._signals:
            self._signals.append(name)
        if signum == signal.SIGINT:
            if self.ctx.is_main:
                print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to interrupt at once)")
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def check(self, step: int) -> bool:
        reasons = list(self._signals)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            reasons.append("train.time_limit")
        outside = bool(reasons)
        if self.stop_at_step is not None and step >= self.stop_at_step:
            reasons.append(f"train.stop_at_step={self.stop_at_step}")
        flags = torch.tensor([1.0 if reasons else 0.0, 1.0 if outside else 0.0])
        flags = all_reduce(flags, self.ctx, op=dist.ReduceOp.MAX)  # one rank's signal stops them all, at one step
        if flags[0].item() > 0:
            self.reason = ", ".join(reasons) or "another rank asked to stop"
            self.from_outside = flags[1].item() > 0
            return True
        return False

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> float:
    """The mean of a one-element tensor over all ranks, as a float."""
    return mean_tensor_over_ranks(value, ctx).item()


def mean_tensor_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a one-element tensor over all ranks, left on the device (``[1]``, float32)."""
    return all_reduce(value.detach().float().reshape(1), ctx) / ctx.world_size


def finite_on_all_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Whether ``value`` is finite on every rank: a bool tensor on the device, read by the divergence guard."""
    finite = torch.isfinite(value.detach()).float().reshape(1)
    return all_reduce(finite, ctx, op=dist.ReduceOp.MIN) > 0


@dataclass
class PendingStep:
    """An optimizer step whose loss and gradient norm have not been read from the device yet."""

    step: int
    loss: torch.Tensor  # [1], the mean over ranks
    grad_norm: torch.Tensor | float | None
    lr: float
    updates_skipped: int  # the guard's count for this step (known on the host: the guard decided it)


def logged_step(step: int, tcfg) -> bool:
    """Whether step ``step`` reads its values and writes a metrics row: every ``train.log_every`` steps, and at every
    step that evaluates, checkpoints or may stop (a stop signal or the time limit is looked at on these steps)."""
    return (
        step % tcfg.log_every == 0
        or step >= tcfg.max_steps
        or step % tcfg.eval_every == 0
        or step % tcfg.ckpt_every == 0
        or (tcfg.stop_at_step is not None and step >= tcfg.stop_at_step)
    )


def read_pending(pending: list[PendingStep]) -> list[tuple[PendingStep, float, float | None]]:
    """(step, loss, grad norm) of every pending step, read from the device in one transfer."""
    values = [p.loss.reshape(()) for p in pending]
    norms = [p.grad_norm for p in pending]
    at = [i for i, norm in enumerate(norms) if isinstance(norm, torch.Tensor)]
    values += [norms[i].detach().float().reshape(()).to(values[0].device) for i in at]
    read = torch.stack(values).tolist()
    losses, tensor_norms = read[: len(pending)], dict(zip(at, read[len(pending) :], strict=True))
    out = []
    for i, p in enumerate(pending):
        norm = tensor_norms.get(i, norms[i])
        out.append((p, losses[i], None if norm is None else float(norm)))
    return out


def grad_norm_stage0(model: torch.nn.Module) -> torch.Tensor | float:
    """Global L2 norm of the (already all-reduced) gradients, on the device; DeepSpeed reports it only for ZeRO >= 1."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0


def skip_lone_allreduce(engine, world_size: int, zero_stage: int) -> None:
    """One rank at ZeRO-0 has nothing to all-reduce, but DeepSpeed would still copy every gradient into a
    flat buffer and back after each backward pass: a full extra gradient's memory and time."""
    if world_size == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False


def forward_loss(
    engine, inputs: torch.Tensor, targets: torch.Tensor, layout: SequenceLayout | None, document_mask: bool = False
):
    """Mean loss of this rank's tokens: the whole sequences, or its shard of them under sequence parallelism. With
    ``document_mask`` (``train.document_mask``) attention stays inside the documents of each window: their ids come
    from the ``</s>`` of the whole window, global positions on every rank of a sequence-parallel group."""
    docs = {}
    if document_mask:
        docs["document_ids"] = document_ids_from_tokens(inputs, EOS_ID).to(engine.device)
    if layout is None:
        return engine(inputs.to(engine.device), targets.to(engine.device), **docs)
    positions = layout.positions(engine.device)
    shard_inputs, shard_targets = layout.shard(inputs).to(engine.device), layout.shard(targets).to(engine.device)
    return engine(shard_inputs, shard_targets, positions=positions, **docs)


@torch.no_grad()
def validation_loss(
    engine, batches, ctx: DistContext, layout: SequenceLayout | None, document_mask: bool = False
) -> float:
    """Mean loss over validation batches (each rank holds its share), averaged over ranks."""
    engine.eval()
    total, count = torch.zeros(1, device=ctx.device), torch.zeros(1, device=ctx.device)
    for inputs, targets in batches:
        total += forward_loss(engine, inputs, targets, layout, document_mask).float()
        count += 1
    total, count = all_reduce(total, ctx), all_reduce(count, ctx)
    engine.train()
    return (total / count.clamp_min(1)).item()


def check_training_split(cfg: Config, world_size: int) -> None:
    """Raise ConfigError when ``parallel.*`` cannot split the training sequences over ``world_size`` ranks."""
    heads = {"the model": cfg.model.n_head}
    if cfg.train.seq_len_schedule:  # every length the schedule trains at
        where = "train.seq_len_schedule holds length "
        check_split(cfg.parallel, world_size, schedule_lengths(cfg), heads, where, "sequence", "or another sp_size")
        return
    check_split(
        cfg.parallel, world_size, [cfg.model.seq_len], heads, "model.seq_len=", "sequence", "or another sp_size"
    )


def resolved_precision(cfg: Config, ctx: DistContext, record: dict | None) -> Config:
    """``cfg`` with ``train.precision=auto`` resolved before anything records or compares it: a resumed run keeps
    its checkpoint's precision (one recorded before ``auto`` existed: fp32, the default then), a new one takes bf16
    where the device has it, fp32 on CPU. On CUDA, fp32 matmuls run on the TF32 tensor cores."""
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    saved = None if record is None else record.get("train_config", {}).get("train.precision", "fp32")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.train.precision, device.type, bf16, saved)
    return cfg if precision == cfg.train.precision else replace(cfg, train=replace(cfg.train, precision=precision))


def run_train(
    cfg: Config,
    ctx: DistContext,
    corpus,
    on_checked: Callable[[], None] | None = None,
    extrapolation: Callable[[torch.nn.Module, object], dict] | None = None,
) -> dict:
    """Train ``cfg.model`` on a prepared corpus; returns a summary (steps, final loss, where things are).

    ``on_checked`` runs on rank 0 once the resume is checked against this config and corpus, before anything is
    written into the run directory (default: install the corpus's tokenizer there). ``extrapolation(model,
    model_cfg)`` scores longer windows at every validation (``train.eval_lengths``; from the eval package)."""
    import deepspeed

    run_dir = Path(cfg.run_dir)
    tcfg = cfg.train
    pcfg = cfg.parallel
    check_training_split(cfg, ctx.world_size)
    checkpoints = CheckpointManager(RunFiles(run_dir).checkpoints, tcfg.keep_last, ctx, sp_size=pcfg.sp_size)
    checkpoints.find(tcfg.resume)  # a bad resume path fails here, before any heavy work
    ensure_process_group(ctx)
    groups = build_parallel_groups(ctx, pcfg.sp_size)
    dp_size = groups.dp_size
    model_cfg = replace(cfg.model, vocab_size=corpus.vocab_size)
    tokenizer_sha256 = file_sha256(corpus.tokenizer_path)  # recorded with every checkpoint and the final weights
    loader = train_loader(  # one train shard, or a mixture's sources drawn by weight (data=mix)
        corpus,
        model_cfg.seq_len,
        tcfg.micro_batch_size,
        seed=tcfg.seed,
        dp_rank=groups.dp_rank,
        dp_size=dp_size,
    )
    schedule = LengthSchedule(tcfg.seq_len_schedule, model_cfg.seq_len, tcfg.micro_batch_size)
    if schedule.active:  # one loader per length, switched at the schedule's steps (length_schedule.py)
        loader = ScheduledLoader(
            schedule,
            lambda length, micro_batch: train_loader(
                corpus, length, micro_batch, seed=tcfg.seed, dp_rank=groups.dp_rank, dp_size=dp_size
            ),
        )
    # Verified against the checksums saved with it (train.resume=auto falls back past a corrupt one), and checked
    # against this config and corpus, before anything is loaded or written.
    found = checkpoints.find_verified(tcfg.resume)
    cfg = resolved_precision(cfg, ctx, checkpoints.record(*found) if found is not None else None)
    tcfg = cfg.train
    overrides = []
    if found is not None:
        where = str(found[0] / found[1])
        overrides = check_resume(checkpoints.record(*found), cfg, model_cfg, loader.state_dict(), where, dp_size)
    if ctx.is_main:
        (on_checked or (lambda: install_tokenizer(corpus, run_dir)))()
    # ZeRO shards optimizer state by rank: another world size loads through the universal format.
    universal = found is not None and tcfg.zero_stage > 0 and checkpoints.saved_world_size(*found) != ctx.world_size
    if universal:
        found = checkpoints.to_universal(*found)

    # What the model, optimizer and steps add to this process's memory (compared with the plan). Code the
    # framework loads on first use is not the run's: it is loaded before the baseline.
    preload_framework_code(tcfg.zero_stage)
    memory = peak_memory_meter(ctx.device)
    memory.start()
    # The same seed on every rank gives every rank the same initial weights.
    torch.manual_seed(tcfg.seed)
    model = GPT(model_cfg)
    init_note = None
    if tcfg.init_from is not None and found is None:
        init_note = load_init_weights(model, tcfg.init_from, corpus.tokenizer_path)
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model.h)
    layout = None
    if groups.sp_size > 1:
        layout = apply_sequence_parallel(model, groups.sp_group, pcfg.sp_mode, model_cfg.seq_len, pcfg.zigzag)
    n_params = model.num_parameters()
    guard = DivergenceGuard(tcfg.max_bad_steps, tcfg.spike_factor)
    optimizer, scheduler = build_optimizer(model, tcfg, wrap=guard.wrap)
    ds_config = deepspeed_config(tcfg, dp_size, groups.sp_size, n_params)
    loss_scale = sequence_loss_scale(tcfg.zero_stage, groups.sp_size)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=groups.mpu
    )
    skip_lone_allreduce(engine, ctx.world_size, tcfg.zero_stage)
    if tcfg.compile:
        engine.compile()
    start_step, resumed_loss = 0, math.nan
    if found is not None:
        client_state = checkpoints.load(engine, *found)
        start_step = client_state["step"]
        resumed_loss = client_state.get("loss", math.nan)
        loader.load_state_dict(client_state["loader"])
        apply_overrides(optimizer, scheduler, cfg)

    # A validation split too small for one batch fails now, not mid-run; a mixture has one per source.
    validation = ValidationSplits(
        corpus, model_cfg.seq_len, tcfg.micro_batch_size, tcfg.eval_batches, groups.dp_rank, dp_size
    )
    seq_len = model_cfg.seq_len

    def use_length(phase: int):
        """Train (and validate, and split sequences) at the schedule's length of ``phase`` from the next step on."""
        nonlocal seq_len, layout, validation
        seq_len, micro_batch = schedule.length(phase), schedule.micro_batch(phase)
        if groups.sp_size > 1:
            layout = apply_sequence_parallel(model, groups.sp_group, pcfg.sp_mode, seq_len, pcfg.zigzag)
        validation = ValidationSplits(corpus, seq_len, micro_batch, tcfg.eval_batches, groups.dp_rank, dp_size)

    if schedule.active:
        loader.set_step(start_step)
        use_length(loader.phase)
    tokens_per_step = global_batch(tcfg, dp_size) * model_cfg.seq_len
    per_token = flops_per_token(model_cfg, n_params)
    peak = peak_flops(tcfg.precision, tcfg.peak_flops)

    monitor = Monitor(run_dir, cfg.wandb, ctx, tcfg.max_steps, start_step, asdict(replace(cfg, model=model_cfg)))
    monitor.write(
        f"model: {n_params / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, d_model {model_cfg.d_model}, "
        f"{model_cfg.n_head} heads, {model_cfg.pos_encoding} positions, seq_len {model_cfg.seq_len}\n"
        f"batch: {tcfg.micro_batch_size} x {tcfg.grad_accum} accumulation x {dp_size} ranks = "
        f"{tokens_per_step:,} tokens per step; {tcfg.max_steps} steps = {tokens_per_step * tcfg.max_steps:,} tokens; "
        f"ZeRO-{tcfg.zero_stage}, {tcfg.precision}"
        + (f"; each sequence split over {groups.sp_size} ranks ({pcfg.sp_mode})" if layout else "")
        + (f"\nresumed from {found[0] / found[1]} at step {start_step}" if found else "")
        + "".join(f"\nchanged on resume: {change}" for change in overrides)
        + (f"\n{init_note}" if init_note else "")
        + (
            "\nsequence lengths: "
            + ", ".join(
                f"{length} from step {start + 1} ({schedule.micro_batch(i)} a micro-batch)"
                for i, (start, length) in enumerate(schedule.phases)
            )  # fmt: skip
            if schedule.active
            else ""
        )
    )
    if peak is None and ctx.device.type == "cuda":
        monitor.write(
            f"MFU omitted: no dense peak is known for {torch.cuda.get_device_name()} at {tcfg.precision} "
            "(pretrain.perf.flops.DEVICE_PEAKS); set train.peak_flops=FLOP/s to log it"
        )
    stopper = StopSignal(tcfg.stop_at_step, tcfg.time_limit_s, ctx)
    wall_start = time.monotonic()
    step, loss_value = start_step, resumed_loss
    if start_step >= tcfg.max_steps:
        loss_note = "" if math.isnan(loss_value) else f" (loss {loss_value:.4f})"
        monitor.write(
            f"already trained: the checkpoint is at step {start_step} of train.max_steps={tcfg.max_steps}"
            f"{loss_note}; raise train.max_steps to train on"
        )
    profiler = StepProfiler(tcfg.profile, RunFiles(run_dir).train_dir / "profile", ctx)
    # Each step's loss and gradient norm stay on the device until the next logged step (train.log_every), which reads
    # them all in one transfer: with the divergence guard's check, a step costs one host sync, a logged step one more.
    pending: list[PendingStep] = []
    interval_start = time.perf_counter()
    try:
        while step < tcfg.max_steps:
            profiler.before_step(step + 1)
            if schedule.active and loader.set_step(step):
                use_length(loader.phase)
                monitor.write(f"step {step + 1}: sequence length {seq_len} (train.seq_len_schedule)")
            loss_sum = torch.zeros((), device=ctx.device)  # on the device: no host sync per micro-batch
            norm = None
            for _ in range(tcfg.grad_accum):
                inputs, targets = loader.next_batch()
                loss = forward_loss(engine, inputs, targets, layout, tcfg.document_mask)
                engine.backward(loss * loss_scale)
                loss_sum += loss.detach().float()
                if engine.is_gradient_accumulation_boundary():
                    guard.before_update(finite_on_all_ranks(loss_sum, ctx))
                    if tcfg.zero_stage == 0:
                        norm = grad_norm_stage0(engine.module)
                lr = scheduler.get_last_lr()[0]
                engine.step()
            step += 1
            if norm is None:
                norm = engine.get_global_grad_norm()
            loss_mean = mean_tensor_over_ranks(loss_sum / tcfg.grad_accum, ctx)
            pending.append(PendingStep(step, loss_mean, norm, lr, guard.updates_skipped))
            if not logged_step(step, tcfg):
                if profiler.after_step(step):
                    monitor.write(f"profiled steps {tcfg.profile[0]}..{step}: {profiler.trace}")
                continue
            steps = read_pending(pending)
            pending.clear()
            elapsed = (time.perf_counter() - interval_start) / len(steps)
            for pending_step, loss_value, norm in steps:
                # fp16's loss scaler skips overflowing steps itself, with an infinite norm: not a divergence.
                guard.updates_skipped = pending_step.updates_skipped
                flags = guard.after_step(pending_step.step, loss_value, None if tcfg.precision == "fp16" else norm)
                if flags.get("loss_spike"):
                    monitor.write(
                        f"step {pending_step.step}: loss spike: {loss_value:.4f} is above {tcfg.spike_factor} x the "
                        "recent mean"
                    )
                if flags.get("skipped"):
                    monitor.write(
                        f"step {pending_step.step}: the loss or gradient is not finite; the update was skipped"
                    )
            tokens_per_s = tokens_per_step / elapsed
            monitor.log_step(
                step,
                {
                    "loss": loss_value,
                    "lr": pending_step.lr,
                    "grad_norm": norm,
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                    "step_time_s": elapsed,
                    "mfu": mfu(tokens_per_s / ctx.world_size, per_token, peak),
                    "peak_memory_mib": memory.peak_extra_bytes() / MIB,
                    "seq_len": seq_len,
                    **flags,
                },
            )
            guard.raise_if_diverged()
            if profiler.after_step(step):
                monitor.write(f"profiled steps {tcfg.profile[0]}..{step}: {profiler.trace}")
            if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
                # by_source: a mixture's loss per source ({"loss/<label>": ...}; val/loss/<label> in wandb).
                val_loss, by_source = validation.losses(
                    lambda batches: validation_loss(engine, batches, ctx, layout, tcfg.document_mask)
                )
                # Measured relative to the length now trained (train.seq_len_schedule).
                current = replace(model_cfg, seq_len=seq_len)
                longer = extrapolation(engine.module, current) if extrapolation is not None else {}
                monitor.log_eval(step, val_loss, {**by_source, **longer})
            stopping = step < tcfg.max_steps and stopper.check(step)
            if step % tcfg.ckpt_every == 0 or step == tcfg.max_steps or stopping:
                client_state = {"step": step, "loader": loader.state_dict(), "loss": loss_value}
                record = {"train_config": train_record(cfg, dp_size), "loader": loader.state_dict(), "loss": loss_value}
                record["tokenizer_sha256"] = tokenizer_sha256  # export and train.init_from check their tokenizer
                checkpoints.save(engine, step, client_state, model_cfg, record)  # model_cfg: evaluable on its own
            if stopping:
                monitor.write(
                    f"stopped after step {step} ({stopper.reason}); checkpoint saved, resume with the same command"
                )
                break
            interval_start = time.perf_counter()  # the next interval's time excludes this step's eval and checkpoint
        finished = step >= tcfg.max_steps
        if finished:
            weights = save_weights(
                engine.module, model_cfg, RunFiles(run_dir).checkpoints, ctx, tcfg.zero_stage, tokenizer_sha256
            )
        if finished and step > start_step:
            monitor.write(
                f"trained {step} steps ({step * tokens_per_step:,} tokens) in {time.monotonic() - wall_start:.0f} s: "
                f"loss {loss_value:.4f}; weights in {weights}"
            )
    finally:
        profiler.close()
        stopper.restore()
        monitor.close(
            {"final_loss": loss_value, "steps": step, "bad_steps": guard.bad_steps, "loss_spikes": guard.spikes}
        )
    return {
        "steps": step,
        "loss": loss_value,
        "finished": finished,
        "model_config": model_cfg,
        "stopped": stopper.reason,
        # Stopped from outside (a signal, the time limit), not at train.stop_at_step: the job is to be resumed.
        "requeue": not finished and stopper.from_outside,
    }
