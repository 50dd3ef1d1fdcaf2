"""FLOPs per token and model FLOPs utilization (MFU): the one home of these numbers."""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig

# Dense (no sparsity) peak throughput per device, FLOP/s, by precision. Vendor data sheets.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
}


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward and backward: ``6 N + 12 L H Q T``.

    PaLM (Chowdhery et al. 2022), appendix B: N parameters (the tied LM head is counted once, through the
    embedding; its matmul is real work), L layers, H heads, Q head dimension, T sequence length. The
    attention term counts the full ``T x T`` score matrix, as PaLM does, although causal kernels skip
    the masked half: MFU stays comparable with other reports.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * t


def peak_flops(precision: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of this process's device: ``train.peak_flops`` if set, else the table; None if unknown."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return None


def mfu(tokens_per_s_per_device: float, per_token: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s_per_device * per_token / peak
