"""The compiled FlexAttention path on CPU (inference: torch compiles no FlexAttention backward for CPU), and the
slopes after DeepSpeed's engine casts a bf16 model. In the e2e tier: compiling runs the C++ compiler, and
each kernel takes seconds to build."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from cli import run_python
from torch._dynamo.utils import counters

import pretrain.ops.attention.flex as flex
from pretrain.ops.alibi import slopes
from pretrain.ops.attention.flex import FlexRecompileError, flex_alibi_attention
from pretrain.ops.attention.reference import eager_attention

HEADS, HEAD_DIM, SEQ_LEN = 4, 32, 128  # model=tiny


def default_run_attention_calls():
    """The attention calls of a default ``stage=all`` on a GPU, after training: ``(mode, batch, length, window)``.

    Validation every 100 steps (no_grad, 16 sequences of 128); eval at 1..32x the training length
    (inference_mode, 16,384 tokens a batch) with and without the windowed control; passkey prompts at 1..8x
    (10 candidate answers a prompt, each prompt one token short of its length).
    """
    calls = [("no_grad", 16, SEQ_LEN, None)]
    for length in (128, 256, 512, 1024, 2048, 4096):
        calls.append(("inference", max(1, 16384 // length), length, None))
        if length > SEQ_LEN:
            calls.append(("inference", max(1, 16384 // length), length, SEQ_LEN))
    for length in (128, 256, 512, 1024):
        calls.append(("inference", 10, length - 1, None))
    return calls


def test_a_default_run_compiles_a_bounded_number_of_kernels_and_each_is_right():
    torch._dynamo.reset()
    counters.clear()
    head_slopes = slopes(HEADS)
    for mode, batch, length, window in default_run_attention_calls():
        gen = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, generator=gen) for _ in range(3))
        with torch.inference_mode() if mode == "inference" else torch.no_grad():
            out, _ = flex_alibi_attention(q, k, v, head_slopes, window=window, return_lse=False)
        want, _ = eager_attention(q[:1], k[:1], v[:1], head_slopes, 0, 0, window, HEAD_DIM**-0.5)
        assert (out[:1] - want).abs().max().item() < 1e-4, (mode, batch, length, window)
    compiled = counters["stats"]["unique_graphs"]
    # 16 calls of 11 shapes, with and without a window, in 2 grad modes: 5 kernels with torch 2.13 (the first
    # shape of each mode static, then dynamic ones), never one per shape (the limit before the fix: 8, then the
    # dense fallback).
    assert 1 <= compiled <= 6, compiled
    assert compiled <= flex.KERNEL_BOUND


def test_hitting_the_recompile_limit_is_an_error_not_a_dense_fallback(monkeypatch):
    q = torch.randn(1, HEADS, 128, HEAD_DIM)
    with torch.inference_mode():
        flex_alibi_attention(q, q, q, slopes(HEADS), return_lse=False)  # compiled at least once
        monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)  # the limit the call sets, from flex.KERNEL_BOUND
        with pytest.raises(FlexRecompileError, match="refusing"):
            flex_alibi_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), slopes(HEADS), return_lse=False)


def test_slopes_the_kernel_reads_are_float32_after_deepspeed_initializes_a_bf16_engine():
    """In its own process: DeepSpeed's engine needs a process group, which must not outlive the test."""
    proc = run_python(ENGINE_SLOPES)
    assert proc.returncode == 0 and "slopes ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


ENGINE_SLOPES = """
import deepspeed, torch
from pretrain.config import ModelConfig, TrainConfig
from pretrain.model.gpt import GPT
from pretrain.ops.alibi import slopes
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.distributed import DistContext, ensure_process_group
from pretrain.train.optim import build_optimizer

ensure_process_group(DistContext())
torch.manual_seed(0)
model = GPT(ModelConfig(n_head=12, d_model=96, vocab_size=300))
tcfg = TrainConfig(precision="bf16", micro_batch_size=2)
optimizer, scheduler = build_optimizer(model, tcfg)
engine, _, _, _ = deepspeed.initialize(
    model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg, 1)
)
assert next(engine.module.parameters()).dtype == torch.bfloat16
for block in engine.module.h:
    assert block.self_attention.pos.slopes.dtype == torch.float32
    assert torch.equal(block.self_attention.pos.slopes, slopes(12))  # 0.707107, not bf16's 0.707031
print("slopes ok")
"""


def test_flex_inside_a_compiled_model_gives_the_references_output():
    """``train.compile`` compiles the whole model: the attention call inside it must still be right."""
    head_slopes = slopes(HEADS)

    def doubled(q, offset):
        return 2 * flex_alibi_attention(q, q, q, head_slopes, offset, offset, None, return_lse=False)[0]

    compiled = torch.compile(doubled)
    with torch.inference_mode():
        for length, offset in ((128, 0), (256, 128)):
            q = torch.randn(1, HEADS, length, HEAD_DIM)
            want, _ = eager_attention(q, q, q, head_slopes, offset, offset, None, HEAD_DIM**-0.5)
            assert (compiled(q, offset) - 2 * want).abs().max().item() < 1e-4


def test_compiled_flex_with_documents_matches_each_document_alone():
    """train.document_mask on the compiled FlexAttention path (CPU: forward only, compiled static per shape)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 300, HEAD_DIM, generator=g) for _ in range(3))
    lengths = [[1, 130, 9, 160], [300]]  # a one-token document, documents across 128-blocks, one whole row
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    s = slopes(HEADS)
    with torch.no_grad():
        out, _ = flex_alibi_attention(q, k, v, s, document_ids=ids, return_lse=False)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                part = slice(start, start + n)
                alone, _ = eager_attention(q[b:b+1, :, part], k[b:b+1, :, part], v[b:b+1, :, part], s, 0, 0, None,
                                           HEAD_DIM**-0.5)  # fmt: skip
                assert torch.allclose(out[b : b + 1, :, part], alone, atol=1e-5)
                start += n
