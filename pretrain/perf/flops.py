"""FLOPs per token and model FLOPs utilization (MFU): the one home of these numbers."""

from __future__ import annotations

import re

import torch

from pretrain.config import ModelConfig

# Dense (no sparsity) peak throughput per device model, FLOP/s: bf16 and fp16 on the tensor cores (fp32
# accumulation), tf32 on the tensor cores, fp32 on the CUDA cores (IEEE). The vendor data sheets print the
# tensor-core figures "with sparsity"; these are half of those. None: the device has no such path.
#   H100 SXM / PCIe / NVL, H200 SXM / NVL: NVIDIA H100 and H200 Tensor Core GPU data sheets (2023, 2024)
#   GH200: NVIDIA GH200 Grace Hopper Superchip data sheet (its GPU is an H100/H200 SXM part)
#   A100 SXM and PCIe, 40 and 80 GB: NVIDIA A100 Tensor Core GPU data sheet (2021; one figure for all four)
#   L4, L40, L40S: their NVIDIA data sheets (2023); A10: NVIDIA A10 data sheet (2021)
#   A10G: AWS publishes no sheet; NVIDIA's A10 figures, which AWS's G5 page matches for FP32 (31.2 TF)
#   V100 SXM2 / PCIe: NVIDIA V100 data sheet (2020; no bf16)
#   RTX 4090: NVIDIA Ada Lovelace architecture white paper, appendix (fp32 accumulation: half the fp16-accumulate
#   figure); RTX 3090: NVIDIA Ampere GA102 white paper; RTX A6000: its NVIDIA data sheet
DEVICE_PEAKS: dict[str, dict[str, float | None]] = {
    "H100 SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200 SXM": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "GH200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "V100 PCIe": {"bf16": None, "fp16": 112e12, "tf32": None, "fp32": 14e12},
    "V100 SXM": {"bf16": None, "fp16": 125e12, "tf32": None, "fp32": 15.7e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "RTX A6000": {"bf16": 154.8e12, "fp16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12},
}
# How torch.cuda.get_device_name() spells each model ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB", ...), matched on whole words after "-"/"_" become spaces,
# the most specific pattern first: "L4" never matches "L40S", "H100" alone is the SXM part.
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bV100S?\b.*\bPCIE\b", "V100 PCIe"),
    (r"\bV100S?\b", "V100 SXM"),
    (r"\bRTX 4090\b", "RTX 4090"),
    (r"\bRTX 3090\b", "RTX 3090"),
    (r"\bRTX A6000\b", "RTX A6000"),
)
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def device_model(name: str) -> str | None:
    """The key of ``DEVICE_PEAKS`` that a device name stands for, or None for a device not in the table."""
    words = re.sub(r"[-_]", " ", name).upper()
    for pattern, model in _PATTERNS:
        if re.search(pattern, words):
            return model
    return None


def device_peak_flops(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the device called ``name`` at ``precision`` (bf16, fp16, tf32, fp32); None when the
    device is not in the table or has no such path (MFU is then omitted)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of: {', '.join(PRECISIONS)}")
    model = device_model(name)
    return None if model is None else DEVICE_PEAKS[model][precision]


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward and backward: ``6 N + 12 L H Q T``.

    PaLM (Chowdhery et al. 2022), appendix B: N parameters (the tied LM head is counted once, through the
    embedding; its matmul is real work), L layers, H heads, Q head dimension, T sequence length. The
    attention term counts the full ``T x T`` score matrix, as PaLM does, although causal kernels skip
    the masked half: MFU stays comparable with other reports.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * t


def matmul_precision(precision: str) -> str:
    """The peak a training precision runs at on CUDA: fp32 matmuls run on the TF32 tensor cores when torch allows it."""
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def peak_flops(precision: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of this process's device: ``train.peak_flops`` if set, else the table; None if unknown."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    return device_peak_flops(torch.cuda.get_device_name(), matmul_precision(precision))


def mfu(tokens_per_s_per_device: float, per_token: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s_per_device * per_token / peak
