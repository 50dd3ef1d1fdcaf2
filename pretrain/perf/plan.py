"""The plan of a run, before any work: sizes, batch, tokens, FLOPs and memory per device.

``pretrain print_plan=true`` prints it and exits; under a launcher the world size is the launcher's, and
``plan_world_size=N`` plans for N devices from a laptop. The memory model is the ZeRO paper's accounting
(Rajbhandari et al. 2020, section 3) for the model states plus a count of the activations our model keeps
for its backward pass; ``tests/test_plan.py`` holds it within 15% of peaks measured on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pretrain.config import Config, ModelConfig, resolve_precision
from pretrain.model.positions import position_parameters
from pretrain.ops.loss import chunk_tokens
from pretrain.parallel.deepspeed_config import DEEPSPEED_BUCKET_ELEMENTS, deepspeed_config
from pretrain.parallel.layout import kv_replication
from pretrain.perf.flops import flops_per_token
from pretrain.perf.memory import MIB

GIB = 1024 * MIB


# Floats per token and layer that a block keeps for its backward pass (fused attention, dropout 0): the
# inputs of both LayerNorms (2h), of the QKV projection (h), its output (3h: q, k, v; (n_head + 2 n_kv_head) x
# head_dim with grouped-query attention), the attention output and its re-laid-out copy entering the output
# projection (2h), the MLP input (h), the GELU input (4h) and output (4h) for an MLP ratio of 4 (2 x its width in
# general; SwiGLU: its fused gate-and-up output 2w, silu(gate) w and the product w).
def layer_activation_floats(cfg: ModelConfig) -> int:
    h, w = cfg.d_model, cfg.mlp_width
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    return 6 * h + qkv + (4 * w if cfg.mlp == "swiglu" else 2 * w)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Bytes the decoding cache holds per token: keys and values of ``n_kv_head`` heads in every layer (16-bit by
    default; grouped-query attention makes it ``n_head / n_kv_head`` times smaller)."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * bytes_per_value


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of ``GPT(cfg)`` (tied head counted once), from the shapes alone."""
    h, w, b = cfg.d_model, cfg.mlp_width, int(cfg.bias)
    norm = h * (1 + int(cfg.norm_bias))
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    up = 2 * w if cfg.mlp == "swiglu" else w
    per_layer = 2 * norm + (h * qkv + qkv * b) + (h * h + h * b) + (h * up + up * b) + (w * h + h * b)
    total = cfg.vocab_size * h + cfg.n_layer * per_layer + norm
    if cfg.embedding_layernorm:
        total += norm
    return total + position_parameters(cfg)


@dataclass(frozen=True)
class Plan:
    world_size: int
    dp_size: int
    sp_size: int
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    steps: int
    parameters: int
    flops_per_step: float
    zero_stage: int
    precision: str
    activation_checkpointing: bool
    memory: dict  # bytes per device: model states, activations (both modes), buffers, and phases (peak_bytes)
    # The attention's shape: heads, key/value heads, and what the decoding cache holds per token (16-bit).
    n_head: int = 0
    n_kv_head: int = 0
    kv_cache_bytes_per_token: int = 0
    # Lines of what the split does to the model (Ulysses repeating key/value heads).
    notes: tuple = ()

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    @property
    def total_memory(self) -> int:
        """The peak per device: parameters and optimizer state, plus the largest phase of a step."""
        return self.memory["parameters"] + self.memory["optimizer"] + max(self.memory["phases"].values())


def model_state_bytes(n_params: int, precision: str, zero_stage: int, shards: int) -> dict:
    """Parameters, gradients and optimizer state per device, as DeepSpeed keeps them.

    The ZeRO paper's accounting (section 3): mixed precision keeps 16-bit parameters and gradients and a
    float32 master copy with Adam's two moments (2 + 2 + 12 bytes a parameter). ZeRO-1 shards the optimizer
    state, ZeRO-2 also the gradients, ZeRO-3 also the parameters, over ``shards`` ranks (data x sequence
    parallel). Two DeepSpeed specifics: its ZeRO optimizers keep the float32 master partition even when
    the model itself is float32 (4 + 4 + 12), and at ZeRO-0 its bf16 optimizer accumulates gradients in a
    float32 buffer beside the 16-bit ones (2 + 6 + 12).
    """
    mixed = precision in ("bf16", "fp16")
    param_b = 2 if mixed else 4
    grad_b = param_b + (4 if mixed and zero_stage == 0 else 0)
    optim_b = 12 if mixed or zero_stage >= 1 else 8
    return {
        "parameters": param_b * n_params // (shards if zero_stage >= 3 else 1),
        "gradients": grad_b * n_params // (shards if zero_stage >= 2 else 1),
        "optimizer": optim_b * n_params // (shards if zero_stage >= 1 else 1),
    }


def communication_bytes(n_params: int, precision: str, zero_stage: int, world_size: int, bucket: int) -> dict:
    """DeepSpeed's gradient and parameter staging buffers (bytes per device), by phase of the step.

    ``reduce``: ZeRO-0 flattens the gradients into all-reduce buckets (nothing with one rank: the engine's
    all-reduce is off then); ZeRO-1/2/3 allocate a ``reduce_bucket_size`` bucket (capped at the model's
    size), float32 at ZeRO-1 and in the model's dtype above. ``gather``: after the optimizer step ZeRO-1/2
    gather the updated parameter partitions into one full copy and pass the optimizer a float32 copy of
    their gradient partition (measured on CPU with gloo).
    """
    param_b = 2 if precision in ("bf16", "fp16") else 4
    if zero_stage == 0:
        reduce = param_b * min(n_params, bucket) if world_size > 1 else 0
    else:
        reduce = (4 if zero_stage == 1 else param_b) * min(n_params, bucket)
    gather = param_b * n_params + 4 * n_params // world_size if zero_stage in (1, 2) else 0
    return {"reduce": reduce, "gather": gather}


def activation_bytes(cfg: ModelConfig, tokens: int, precision: str, checkpointing: bool, device: str = "cpu") -> int:
    """Peak activation memory of one micro-batch of ``tokens`` tokens on one device.

    Blocks: ``layer_activation_floats`` per token and layer (with activation checkpointing, only each
    block's input is kept, plus one block's full set while it is recomputed). Embedding output, its
    LayerNorm and the final LayerNorm keep 3 more ``d_model`` floats a token. The loss never holds the
    logits (``pretrain.ops.loss``): it keeps the hidden states' gradient, a float32 gradient of the output
    weight, and works on one chunk of float32 logits at a time (the BLAS copies it once more to take the
    weight's gradient). The chunk is the one the loss uses on ``device`` (larger on CUDA).
    """
    act_b = 2 if precision in ("bf16", "fp16") else 4
    per_layer = layer_activation_floats(cfg)
    blocks = cfg.d_model * cfg.n_layer + per_layer if checkpointing else per_layer * cfg.n_layer
    chunk = min(tokens, chunk_tokens(cfg.vocab_size, torch.device(device)))
    loss = tokens * cfg.d_model * act_b + 4 * cfg.vocab_size * cfg.d_model + 2 * 4 * chunk * cfg.vocab_size
    return tokens * (blocks + 3 * cfg.d_model) * act_b + loss


def peak_bytes(memory: dict, grad_accum: int) -> dict:
    """What is live beside the parameters and optimizer state at the end of each phase of a step.

    Forward: the activations, with the gradients of earlier micro-batches when they accumulate (``memory``'s
    gradients are already per stage: ZeRO-2 keeps only its partition, ZeRO-0/1 the full gradients).
    Backward: activations are freed layer by layer as gradients appear, so its peak is the gradients and
    the reduce buffer.
    Step: the gradients and the gather buffers.
    """
    carried = memory["gradients"] if grad_accum > 1 else 0
    return {
        "forward": memory["activations"] + carried,
        "backward": memory["gradients"] + memory["reduce"],
        "step": memory["gradients"] + memory["gather"],
    }


def make_plan(cfg: Config, world_size: int, vocab_size: int | None = None, device: str | None = None) -> Plan:
    """The plan for ``world_size`` devices of type ``device`` (default: CUDA where this machine has it)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = cfg.model if vocab_size is None else ModelConfig(**{**cfg.model.__dict__, "vocab_size": vocab_size})
    sp = cfg.parallel.sp_size
    dp = max(1, world_size // sp)
    n = parameter_count(model)
    # train.precision=auto as a new run on that device resolves it (bf16 on CUDA, fp32 on CPU).
    t = replace(cfg.train, precision=resolve_precision(cfg.train.precision, device, device == "cuda"))
    tokens_per_rank = t.micro_batch_size * model.seq_len // sp
    memory = model_state_bytes(n, t.precision, t.zero_stage, dp * sp)
    checkpointing = t.activation_checkpointing
    memory["activations"] = activation_bytes(model, tokens_per_rank, t.precision, checkpointing, device)
    memory["activations_other_mode"] = activation_bytes(model, tokens_per_rank, t.precision, not checkpointing, device)
    schedule_notes = ()
    if t.seq_len_schedule:
        # Every length of the schedule holds the same tokens per micro-batch: the peak is the largest length's.
        by_length = {
            length: activation_bytes(
                replace(model, seq_len=length), tokens_per_rank, t.precision, checkpointing, device
            )
            for _, length in t.seq_len_schedule
        }
        peak_length = max(by_length, key=lambda length: (by_length[length], length))
        memory["activations"] = by_length[peak_length]
        memory["activations_other_mode"] = max(
            activation_bytes(replace(model, seq_len=length), tokens_per_rank, t.precision, not checkpointing, device)
            for length in by_length
        )
        schedule_notes = (
            "train.seq_len_schedule: "
            + ", ".join(
                f"{length} from step {start + 1} ({t.micro_batch_size * model.seq_len // length} a micro-batch, "
                f"activations {_size(by_length[length])})"
                for start, length in t.seq_len_schedule
            )
            + f"; memory below is the peak over the schedule (at {peak_length})",
        )
    zero = deepspeed_config(t, dp, sp, n)["zero_optimization"]
    bucket = zero.get("reduce_bucket_size", DEEPSPEED_BUCKET_ELEMENTS) if t.zero_stage else DEEPSPEED_BUCKET_ELEMENTS
    memory.update(communication_bytes(n, t.precision, t.zero_stage, dp * sp, int(bucket)))
    memory["phases"] = peak_bytes(memory, t.grad_accum)
    return Plan(
        world_size=world_size,
        dp_size=dp,
        sp_size=sp,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        seq_len=model.seq_len,
        steps=t.max_steps,
        parameters=n,
        flops_per_step=flops_per_token(model, n) * t.micro_batch_size * t.grad_accum * dp * model.seq_len,
        zero_stage=t.zero_stage,
        precision=t.precision,
        activation_checkpointing=t.activation_checkpointing,
        memory=memory,
        n_head=model.n_head,
        n_kv_head=model.n_kv_head,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        notes=_split_notes(cfg, model) + schedule_notes,
    )


def _split_notes(cfg: Config, model: ModelConfig) -> tuple:
    sp, kv = cfg.parallel.sp_size, model.n_kv_head
    repeat = kv_replication(kv, sp)
    if sp == 1 or cfg.parallel.sp_mode != "ulysses" or repeat == 1:
        return ()
    return (
        f"ulysses: {kv} key/value heads do not split over {sp} ranks; each is repeated {repeat} times before the "
        f"all-to-all ({kv * repeat} heads, {kv * repeat // sp} per rank; key/value traffic x{repeat})",
    )


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_plan(plan: Plan) -> str:
    m = plan.memory
    other = "without" if plan.activation_checkpointing else "with"
    this = "with" if plan.activation_checkpointing else "without"
    lines = [
        f"world: {plan.world_size} devices = {plan.dp_size} data-parallel x {plan.sp_size} sequence-parallel",
        f"batch: {plan.micro_batch_size} sequences x {plan.grad_accum} accumulation x {plan.dp_size} data-parallel "
        f"= {plan.sequences_per_step} sequences of {plan.seq_len} = {plan.tokens_per_step:,} tokens per step",
        f"run: {plan.steps:,} steps = {plan.tokens_per_step * plan.steps:,} tokens",
        f"model: {plan.parameters:,} parameters; {plan.flops_per_step:.3e} FLOPs per step "
        f"({plan.flops_per_step * plan.steps:.3e} in total; 6N + 12LHQT per token, PaLM appendix B)",
        f"attention: {plan.n_head} query heads, {plan.n_kv_head} key/value heads; KV cache "
        f"{plan.kv_cache_bytes_per_token:,} bytes per token in 16 bits",
        *plan.notes,
        f"memory per device (ZeRO-{plan.zero_stage}, {plan.precision}):",
        f"  parameters   {_size(m['parameters']):>12}",
        f"  gradients    {_size(m['gradients']):>12}",
        f"  optimizer    {_size(m['optimizer']):>12}",
        f"  activations  {_size(m['activations']):>12}  ({this} activation checkpointing; "
        f"{other}: {_size(m['activations_other_mode'])})",
        f"  reduce buffer{_size(m['reduce']):>13}  (DeepSpeed's gradient bucket)",
        f"  gather buffer{_size(m['gather']):>13}  (ZeRO-1/2: updated parameters gathered after the step)",
        "  peak by phase: "
        + ", ".join(f"{name} {_size(v)}" for name, v in m["phases"].items())
        + " (beside the parameters and optimizer state)",
        f"  total        {_size(plan.total_memory):>12}  (the largest phase; plus allocator fragmentation)",
    ]
    return "\n".join(lines)
