"""Every backend against a float64 reference written here, forward and gradients of q, k and v."""

import warnings

import pytest
import torch

import pretrain.ops.attention.blockwise as blockwise
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import alibi_attention
from pretrain.ops.attention.blockwise import blockwise_backward, blockwise_forward
from pretrain.ops.attention.flex import flex_alibi_attention

# (batch, heads, q_len, k_len, head_dim, q_offset, k_offset, window)
SHAPES = [
    (2, 8, 64, 64, 16, 0, 0, None),
    (1, 12, 300, 300, 16, 0, 0, None),  # not a power of two, not a multiple of the block
    (2, 5, 37, 1037, 8, 1000, 0, None),  # queries 1000..1036 against keys 0..1036
    (1, 3, 129, 77, 8, 4096, 4020, None),  # a ring block: q and k both off the origin, q_len != k_len
    (1, 4, 333, 333, 8, 0, 0, 50),  # sliding window
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, s, q_offset, k_offset, window=None):
    """Plain float64 attention with the bias -m*(i-j) built element by element from its definition."""
    q, k, v = q.double(), k.double(), v.double()
    i = torch.arange(q_offset, q_offset + q.shape[2], dtype=torch.float64)[:, None]
    j = torch.arange(k_offset, k_offset + k.shape[2], dtype=torch.float64)[None, :]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if s is not None:
        scores = scores - s.double()[:, None, None] * (i - j)
    visible = (j <= i) if window is None else (j <= i) & (i - j < window)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row that sees no key: output 0 and lse -inf, with no gradient (a softmax of it would be nan).
    has_key = visible.any(dim=-1, keepdim=True)
    scores = torch.where(has_key, scores, 0.0)
    lse = torch.where(has_key[:, 0], torch.logsumexp(scores, dim=-1), float("-inf"))
    return (torch.softmax(scores, dim=-1) * has_key) @ v, lse


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def make_inputs(shape, dtype, seed=0):
    batch, heads, q_len, k_len, dim = shape[:5]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, heads, k_len, dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, heads, k_len, dim, generator=gen).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["fused", "sdpa", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_float64_reference(backend, shape, dtype):
    q_offset, k_offset, window = shape[5:]
    q, k, v = make_inputs(shape, dtype, seed=hash((backend, shape)) % 1000)
    s = slopes(shape[1])
    want, _ = reference(q, k, v, s, q_offset, k_offset, window)
    grad_out = torch.randn(want.shape, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
    out = alibi_attention(q, k, v, s, q_offset, k_offset, backend, window=window)
    assert out.shape == want.shape and out.dtype == dtype
    grads = torch.autograd.grad((out.double() * grad_out).sum(), (q, k, v))
    tol = TOL[dtype]
    assert rel_err(out, want) < tol
    for name, got, exp in zip("qkv", grads, want_grads):
        assert rel_err(got, exp) < tol, f"grad of {name}"


@pytest.mark.parametrize("backend", ["fused", "eager"])
def test_log_sum_exp_and_its_gradient(backend):
    shape = SHAPES[2]
    q, k, v = make_inputs(shape, torch.float32, seed=3)
    s = slopes(shape[1])
    want, want_lse = reference(q, k, v, s, *shape[5:])
    want_grads = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v))
    out, lse = alibi_attention(q, k, v, s, shape[5], shape[6], backend, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == want_lse.shape
    assert rel_err(lse, want_lse) < 1e-6
    for got, exp in zip(torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)), want_grads):
        assert rel_err(got, exp) < 1e-5


def test_online_softmax_across_many_key_chunks(monkeypatch):
    # Force small blocks so every row is merged over several key chunks.
    monkeypatch.setattr(blockwise, "BLOCK_Q", 32)
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 1)
    shape = (1, 6, 500, 500, 8, 0, 0, None)
    q, k, v = make_inputs(shape, torch.float32, seed=5)
    s = slopes(6)
    want, want_lse = reference(q, k, v, s, 0, 0)
    out, lse = blockwise_forward(q.detach(), k.detach(), v.detach(), s)
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-6
    grad_out = torch.randn(want.shape, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
    grads = blockwise_backward(grad_out.float(), q.detach(), k.detach(), v.detach(), out, lse, s)
    for got, exp in zip(grads, want_grads):
        assert rel_err(got, exp) < 1e-5


def test_rows_that_see_no_key_give_zero():
    # Queries 0..3 against keys 4..7: nothing is visible.
    q, k, v = make_inputs((1, 2, 4, 4, 8), torch.float32)
    for backend in ("fused", "eager"):
        out, lse = alibi_attention(q, k, v, slopes(2), 0, 4, backend, return_lse=True)
        assert torch.all(out == 0) and torch.all(torch.isinf(lse))
        out.sum().backward()
        assert torch.all(q.grad == 0)
        q.grad = None


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 query rows and 128 keys, so that short sequences cross many block boundaries."""
    monkeypatch.setattr(blockwise, "BLOCK_Q", 32)
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 1)


@pytest.mark.parametrize("with_slopes", [True, False], ids=["alibi", "no-bias"])
@pytest.mark.parametrize(
    "case",
    [
        # (q_len, k_len, q_offset, k_offset, window)
        (100, 60, 0, 70, None),  # rows 0..69 see no key: the block of rows 64..95 is part empty
        (90, 300, 150, 0, 3),  # a window far smaller than a block
        (70, 300, 40, 10, 1),  # each row sees only its own position
        (200, 200, 0, 0, 40),
        (45, 400, 300, 0, 200),  # the window's edge cuts through several key chunks
    ],
    ids=lambda c: "x".join(map(str, c)),
)
def test_small_blocks_with_empty_rows_and_windows(small_blocks, case, with_slopes):
    q_len, k_len, q_offset, k_offset, window = case
    q, k, v = make_inputs((1, 4, q_len, k_len, 8), torch.float32, seed=q_len + k_len)
    s = slopes(4) if with_slopes else None
    want, want_lse = reference(q, k, v, s, q_offset, k_offset, window)
    grad_out = torch.randn(want.shape, dtype=torch.float64)
    grad_lse = torch.randn(want_lse.shape, dtype=torch.float64)
    finite = torch.isfinite(want_lse)
    loss = (want * grad_out).sum() + (want_lse * grad_lse)[finite].sum()
    want_grads = torch.autograd.grad(loss, (q, k, v))
    out, lse = alibi_attention(q, k, v, s, q_offset, k_offset, window=window, return_lse=True)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.all(out[~finite] == 0) and torch.all(lse[~finite] == float("-inf"))
    assert rel_err(out, want) < 1e-5 and rel_err(lse[finite], want_lse[finite]) < 1e-6
    loss = (out.double() * grad_out).sum() + (lse.double() * grad_lse)[finite].sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    assert torch.all(grads[0][~finite] == 0)
    for name, got, exp in zip("qkv", grads, want_grads):
        assert rel_err(got, exp) < 1e-5, f"grad of {name}"


@pytest.mark.parametrize("with_slopes", [True, False], ids=["alibi", "no-bias"])
@pytest.mark.parametrize("window", [None, 10])
def test_hidden_keys_contribute_exactly_zero(small_blocks, window, with_slopes):
    # The rows that see only keys with v = 0 must give exactly 0, however large the v of the keys they are
    # denied (in the same blocks): a hidden entry weighing even exp(-87) = 1.6e-38 would show.
    q, k, v = (t.detach() for t in make_inputs((1, 2, 100, 100, 8), torch.float32, seed=2))
    huge = 1e30
    if window is None:  # rows 0..49 see keys 0..49 only; keys 50.. are their future
        v[:, :, :50], v[:, :, 50:] = 0.0, huge
        quiet = slice(0, 50)
    else:  # rows 59.. see keys 50.. only; the window hides keys ..49
        v[:, :, :50], v[:, :, 50:] = huge, 0.0
        quiet = slice(59, 100)
    out, _ = blockwise_forward(q, k, v, slopes(2) if with_slopes else None, window=window)
    assert torch.all(out[:, :, quiet] == 0)


@pytest.mark.parametrize("with_slopes", [True, False], ids=["alibi", "no-bias"])
def test_rows_that_see_no_key_leave_no_trace_in_gradients(small_blocks, with_slopes):
    # Queries 0..99 against keys 40..139: rows 0..39 see no key, and rows 32..39 share a block with rows
    # that do. Whatever their q, output gradient and lse gradient, they must add exactly nothing to dk and
    # dv and get dq = 0.
    q, k, v = (t.detach() for t in make_inputs((1, 2, 100, 100, 8), torch.float32, seed=4))
    s = slopes(2) if with_slopes else None
    out, lse = blockwise_forward(q, k, v, s, 0, 40)
    assert torch.all(out[:, :, :40] == 0) and torch.all(lse[:, :, :40] == float("-inf"))
    assert torch.all(torch.isfinite(lse[:, :, 40:]))
    gen = torch.Generator().manual_seed(9)
    dout, dlse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    grads = blockwise_backward(dout, q, k, v, out, lse, s, 0, 40, dlse=dlse)
    q2, dout2, dlse2 = q.clone(), dout.clone(), dlse.clone()
    q2[:, :, :40], dout2[:, :, :40], dlse2[:, :, :40] = 1e30, 1e30, -1e30
    grads2 = blockwise_backward(dout2, q2, k, v, out, lse, s, 0, 40, dlse=dlse2)
    assert torch.all(grads2[0][:, :, :40] == 0)
    assert torch.equal(grads[0], grads2[0]) and torch.equal(grads[1], grads2[1]) and torch.equal(grads[2], grads2[2])


def test_steep_slopes(small_blocks):
    # Slopes far steeper than ALiBi's: a hidden future entry's score is then hundreds above the row's
    # log-sum-exp (its exp overflows unless capped before it is zeroed), and most visible ones are far below
    # the exp's underflow (clamped).
    q, k, v = make_inputs((1, 2, 200, 200, 8), torch.float32, seed=8)
    s = torch.tensor([4.0, 1.0])
    want, want_lse = reference(q, k, v, s, 0, 0)
    grad_out = torch.randn(want.shape, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * grad_out).sum() + want_lse.sum(), (q, k, v))
    out, lse = alibi_attention(q, k, v, s, return_lse=True)
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-6
    grads = torch.autograd.grad((out.double() * grad_out).sum() + lse.sum(), (q, k, v))
    for name, got, exp in zip("qkv", grads, want_grads):
        assert torch.all(torch.isfinite(got)) and rel_err(got, exp) < 1e-5, f"grad of {name}"


@pytest.mark.parametrize("window", [None, 30])
def test_backward_per_key_block_with_the_merged_log_sum_exp(small_blocks, window):
    # What ring attention does: the keys in two blocks, each block's gradient from the merged output and
    # log-sum-exp. In the later block the first rows see none of its keys although their lse is finite.
    q, k, v = (t.detach() for t in make_inputs((1, 3, 150, 150, 8), torch.float32, seed=6))
    s = slopes(3)
    out, lse = blockwise_forward(q, k, v, s, window=window)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    want = blockwise_backward(dout, q, k, v, out, lse, s, window=window)
    dq = torch.zeros_like(q)
    dkv = []
    for ks, ke in ((0, 70), (70, 150)):
        bq, bk, bv = blockwise_backward(dout, q, k[:, :, ks:ke], v[:, :, ks:ke], out, lse, s, 0, ks, window)
        dq += bq
        dkv.append((bk, bv))
    assert rel_err(dq, want[0].double()) < 1e-5
    assert rel_err(torch.cat([bk for bk, _ in dkv], dim=2), want[1].double()) < 1e-5
    assert rel_err(torch.cat([bv for _, bv in dkv], dim=2), want[2].double()) < 1e-5


def test_no_slopes_is_plain_causal_attention():
    q, k, v = make_inputs((1, 2, 50, 50, 8), torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("fused", "sdpa", "eager"):
        assert rel_err(alibi_attention(q, k, v, None, backend=backend), want.double()) < 1e-5


def test_fused_keeps_no_length_squared_tensor_for_backward():
    length = 1024
    q, k, v = make_inputs((1, 2, length, length, 16), torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = alibi_attention(q, k, v, slopes(2))
    out.sum().backward()
    assert saved and max(saved) <= 2 * length * 16  # q, k, v, out: O(L * D); no L x L
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        alibi_attention(q, k, v, slopes(2), backend="eager")
    assert max(saved) >= 2 * length * length  # the reference does keep the probabilities


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
def test_flex_score_mod_and_block_mask_forward_on_cpu(shape):
    """The FlexAttention formulation (the CUDA fused path) is checked here in its uncompiled forward."""
    q, k, v = (t.detach() for t in make_inputs(shape, torch.float32, seed=7))
    s = slopes(shape[1])
    want, want_lse = reference(q, k, v, s, *shape[5:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use torch.compile(flex_attention)": we mean to run it eagerly
        out, lse = flex_alibi_attention(q, k, v, s, *shape[5:], compiled=False)
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_on_gpu_matches_reference(shape, dtype):
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_inputs(shape, dtype, seed=11))
    s = slopes(shape[1])
    want, _ = reference(q, k, v, s, *shape[5:])
    grad_out = torch.randn(want.shape, dtype=torch.float64, device="cuda")
    want_grads = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
    out = alibi_attention(q, k, v, s, shape[5], shape[6], "fused", window=shape[7])
    grads = torch.autograd.grad((out.double() * grad_out).sum(), (q, k, v))
    tol = TOL[dtype]
    assert rel_err(out, want) < tol
    for got, exp in zip(grads, want_grads):
        assert rel_err(got, exp) < tol


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="flash"), "backend='flash' is not allowed; choose one of: fused, sdpa, eager"),
        (dict(k=torch.zeros(1, 3, 8, 8), v=torch.zeros(1, 3, 8, 8)), "k's heads must divide q's"),
        (dict(v=torch.zeros(1, 2, 9, 8)), "k and v must have the same shape"),
        (dict(q=torch.zeros(2, 8, 8)), r"q must be \[batch, heads, length, head_dim\]"),
        (dict(slopes=torch.ones(3)), r"slopes must have shape \[heads\] = \[2\]"),
        (dict(q_offset=-1), "must be >= 0"),
        (dict(window=0), "window=0 is not allowed"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    args = dict(q=torch.zeros(1, 2, 8, 8), k=torch.zeros(1, 2, 8, 8), v=torch.zeros(1, 2, 8, 8), slopes=slopes(2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        alibi_attention(**args)


def test_sdpa_has_no_log_sum_exp():
    q, k, v = make_inputs((1, 2, 8, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="return_lse"):
        alibi_attention(q, k, v, slopes(2), backend="sdpa", return_lse=True)
