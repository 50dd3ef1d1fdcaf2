"""The FlexAttention path (the fused kernel on CUDA), proven on CPU as far as a CPU can: its block masks, their
memory, its mask and score functions in the uncompiled forward, and what it is given (no host sync per call).
Compiling it needs a C++ compiler process: those tests are in tests/e2e/test_flex_compile.py."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import pretrain.ops.attention.flex as flex
import pretrain.ops.attention.reference as reference_module
from pretrain.config import Config, ModelConfig
from pretrain.model.gpt import GPT
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import alibi_attention, uses_flex
from pretrain.perf.memory import MIB, RssPeakMemory, reset_rss_high_water_mark
from pretrain.perf.plan import make_plan

# (q_len, k_len, q_offset, k_offset, window): lengths on and off the 128 block, offsets, windows of 1, 3, 40
MASKS = [
    (300, 300, 0, 0, None),
    (256, 384, 128, 0, None),
    (200, 500, 300, 0, 40),
    (128, 128, 0, 0, 1),
    (1000, 1000, 0, 0, 3),
    (64, 700, 700, 0, None),
    (130, 900, 0, 5, 3),
    (77, 129, 4096, 4020, None),
]


def dense_mask_mod(q_offset, k_offset, window):
    def mask_mod(b, h, q_idx, kv_idx):
        distance = (q_idx + q_offset) - (kv_idx + k_offset)
        allowed = distance >= 0
        return allowed if window is None else allowed & (distance < window)

    return mask_mod


@pytest.mark.parametrize("case", MASKS, ids=lambda c: "x".join(map(str, c)))
def test_block_mask_from_block_indices_is_torchs_dense_one(case):
    q_len, k_len, q_offset, k_offset, window = case
    ours = flex.alibi_block_mask(q_len, k_len, q_offset, k_offset, window, "cpu")
    theirs = create_block_mask(dense_mask_mod(q_offset, k_offset, window), None, None, q_len, k_len, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)


def test_block_mask_of_65536_tokens_costs_blocks_not_tokens():
    """O((L/128)^2): 512 x 512 small integers. A dense L x L mask would be 4 GiB of bools."""
    if not reset_rss_high_water_mark():
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    flex.alibi_block_mask(256, 256, 0, 0, None, "cpu")  # the code paths loaded once
    meter = RssPeakMemory()
    meter.start()
    mask = flex.alibi_block_mask(65536, 65536, 0, 0, 2048, "cpu")
    assert meter.peak_extra_bytes() < 256 * MIB
    assert mask.kv_num_blocks.shape[-1] == 512


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 300, 300, 0, 0, None),
        (1, 7, 256, 640, 384, 0, None),
        (1, 3, 200, 200, 0, 0, 1),
        (1, 3, 130, 900, 0, 5, 3),
        (1, 6, 333, 333, 0, 0, 40),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_flex_forward_matches_the_reference_for_odd_heads_offsets_and_windows(shape, dtype):
    batch, heads, q_len, k_len, q_offset, k_offset, window = shape
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, heads, q_len, 32, generator=gen).to(dtype)
    k, v = (torch.randn(batch, heads, k_len, 32, generator=gen).to(dtype) for _ in range(2))
    want, _ = reference_module.eager_attention(
        q.double(), k.double(), v.double(), slopes(heads), q_offset, k_offset, window, 32**-0.5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use torch.compile(flex_attention)": we mean to run it eagerly
        out, _ = flex.flex_alibi_attention(q, k, v, slopes(heads), q_offset, k_offset, window, compiled=False)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - want.double()).abs().max().item() < tolerance


def test_offsets_and_windows_reach_the_kernel_as_tensors_made_once():
    """``torch.tensor(int, device=cuda)`` on every call of every layer is a host-device sync each: made once."""
    first = flex._scalar(4096, "cpu")
    assert flex._scalar(4096, "cpu") is first
    mask = flex.alibi_block_mask(300, 300, 4096, 4096, 7, "cpu")
    assert flex.alibi_block_mask(300, 300, 4096, 4096, 7, "cpu") is mask
    closure = [c.cell_contents for c in mask.mask_mod.__closure__]
    assert all(isinstance(c, torch.Tensor) and c.dim() == 0 for c in closure), "offsets and window as tensors"


def test_fused_runs_flex_on_cuda_for_head_dims_its_kernel_takes_and_blockwise_otherwise():
    def queries(cuda: bool, head_dim: int):
        return types.SimpleNamespace(is_cuda=cuda, shape=(1, 4, 128, head_dim))

    assert uses_flex(queries(True, 16)) and uses_flex(queries(True, 64))
    assert not uses_flex(queries(True, 8)), "torch's CUDA flex kernel rejects head_dim < 16: the blockwise kernel"
    assert not uses_flex(queries(False, 64))


def test_flex_backend_refuses_to_train_on_cpu_with_a_clear_error():
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    with pytest.raises(ValueError, match="backend='flex' has no backward pass on CPU"):
        alibi_attention(q, q, q, slopes(2), backend="flex")


def test_sdpa_keeps_the_bias_in_float32_for_bf16_inputs(monkeypatch):
    """bf16 holds integers exactly only to 256: a bias rounded to bf16 gives keys 2040..2043 one value at m=0.5."""
    seen = {}
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.update(q=q.dtype, mask=attn_mask.dtype)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(reference_module.F, "scaled_dot_product_attention", spy)
    q = torch.zeros(1, 1, 2100, 8, dtype=torch.bfloat16)
    v = torch.arange(2100, dtype=torch.float32).repeat(8, 1).T[None, None].to(torch.bfloat16)
    out = alibi_attention(q, q, v, torch.tensor([0.5]), backend="sdpa")
    assert seen == {"q": torch.float32, "mask": torch.float32} and out.dtype == torch.bfloat16
    # With q = k = 0 the weights are softmax(-0.5 * distance): the last row's output is a fixed function of
    # the exact bias, computed here in float64.
    distance = torch.arange(2099, -1, -1, dtype=torch.float64)
    weights = torch.softmax(-0.5 * distance, dim=0)
    want = (weights * torch.arange(2100, dtype=torch.float64)).sum()
    assert abs(out[0, 0, -1, 0].double() - want) <= 0.01 * want  # bf16 output rounding, not bias rounding


def test_slopes_stay_float32_and_exact_when_the_model_is_cast():
    """Older DeepSpeed casts every buffer with module.bfloat16(): 0.707107 would become 0.707031."""
    model = GPT(ModelConfig(n_head=12, d_model=96, vocab_size=300))
    for cast in (model.bfloat16, model.half, lambda: model.to(torch.bfloat16)):
        cast()
        assert model.pos.slopes.dtype == torch.float32
        assert torch.equal(model.pos.slopes, slopes(12))
        assert model.h[0].self_attention.pos.slopes is model.pos.slopes


def test_the_plan_sizes_the_loss_chunk_for_the_device_the_run_uses():
    cfg = Config(model=ModelConfig(vocab_size=50304, seq_len=2048), train=Config().train)
    cfg.train.micro_batch_size = 8
    cpu, cuda = make_plan(cfg, 1, device="cpu"), make_plan(cfg, 1, device="cuda")
    assert cuda.memory["activations"] > cpu.memory["activations"]  # the CUDA chunk of logits is 8x larger
