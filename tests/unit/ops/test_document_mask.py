"""Document masks (train.document_mask): a packed window of several documents gives, in every kernel, the outputs and
gradients of each document alone; the blockwise kernel skips the blocks of other documents; bad ids are one line."""

from __future__ import annotations

import pytest
import torch

import pretrain.ops.attention.blockwise as blockwise
from pretrain.config import ModelConfig
from pretrain.model.gpt import GPT
from pretrain.ops.alibi import slopes
from pretrain.ops.attention import alibi_attention
from pretrain.ops.attention.flex import document_block_classes, flex_alibi_attention
from pretrain.ops.documents import document_ids_from_tokens, document_starts

# Documents of each batch row: a one-token document, lengths off every block, one longer than the window (row 1).
LENGTHS = [[1, 40, 7, 100, 1, 51], [200]]
L = 200


def ids_of(lengths, device="cpu"):
    rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    return torch.stack(rows).to(device)


def qkv(batch=2, heads=3, length=L, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(3)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 query rows and 128 keys: documents cross many block boundaries."""
    monkeypatch.setattr(blockwise, "BLOCK_Q", 32)
    monkeypatch.setattr(blockwise, "BLOCK_ELEMENTS", 1)


def per_document(q, k, v, s, window=None):
    """The reference: each document of each row attended alone (eager), at its own positions."""
    out = torch.zeros_like(q)
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            part = slice(start, start + n)
            out[b : b + 1, :, part] = alibi_attention(
                q[b : b + 1, :, part], k[b : b + 1, :, part], v[b : b + 1, :, part], s, backend="eager", window=window
            )
            start += n
    return out


@pytest.mark.parametrize("backend, window", [("fused", None), ("fused", 30), ("sdpa", None), ("eager", 30)])
def test_packed_documents_equal_each_document_alone_with_gradients(small_blocks, backend, window):
    q, k, v = (t.requires_grad_() for t in qkv())
    s, ids = slopes(3), ids_of(LENGTHS)
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = alibi_attention(q, k, v, s, backend=backend, window=window, document_ids=ids)
    want = per_document(q, k, v, s, window)
    assert torch.allclose(got, want, atol=1e-5)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    wants = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(grads, wants):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_ring_blocks_off_the_origin_read_the_ids_of_their_global_positions(small_blocks):
    """A key block of positions 100..199 for queries 150..199 (a ring block): the ids are indexed globally."""
    q, k, v = qkv()
    s, ids = slopes(3), ids_of(LENGTHS)
    full, full_lse = blockwise.blockwise_forward(q, k, v, s, document_ids=ids)
    block_out, block_lse = blockwise.blockwise_forward(q[:, :, 150:], k[:, :, 100:], v[:, :, 100:], s, 150, 100,
                                                       document_ids=ids)  # fmt: skip
    # Row 0's queries 150..199 are of the documents starting at 148 and 149: keys before 100 count for none.
    assert torch.allclose(block_out[:1], full[:1, :, 150:], atol=1e-6)
    assert torch.allclose(block_lse[:1], full_lse[:1, :, 150:], atol=1e-6)


def test_blockwise_skips_the_key_blocks_of_other_documents(small_blocks):
    ids = ids_of([[64, 64, 72]])
    plan = blockwise._local_documents(ids, 0, L, 0, L, "cpu")[0]
    blocks = blockwise._blocks(L, L, 3, 0, 0, None, plan)
    plain = blockwise._blocks(L, L, 3, 0, 0, None)
    count = sum(len(chunks) for _, _, chunks in blocks)
    assert count < sum(len(chunks) for _, _, chunks in plain)
    # Queries 128..199 (the third document) see no chunk before key 128; no block of one document is masked for it.
    for qs, _, chunks in blocks:
        for ks, ke, r0, r1, _, _, split in chunks:
            first_doc, last_doc = (qs + r0) // 64, (qs + r1 - 1) // 64
            assert ke > first_doc * 64 and ks < (min(last_doc, 2) + 1) * 64
            if min(first_doc, 2) == min(last_doc, 2) == min(ks // 64, 2) == min((ke - 1) // 64, 2):
                assert not split


def test_flex_uncompiled_matches_and_its_block_mask_is_per_row_blocks():
    q, k, v = qkv(dtype=torch.float32, length=300, dim=16)
    ids = ids_of([[10, 1, 200, 89], [300]])
    s = slopes(3)
    out, _ = flex_alibi_attention(q, k, v, s, compiled=False, document_ids=ids)
    want = alibi_attention(q, k, v, s, backend="eager", document_ids=ids)
    assert torch.allclose(out, want, atol=1e-5)
    partial, full = document_block_classes(300, 300, 0, 0, None, ids)
    assert partial.shape == full.shape == (2, 3, 3)  # O(B (L/128)^2), not L x L
    assert not (partial | full)[0, 2, 0]  # queries 256..299 (one document from 11) see no key of block 0 (0..127)
    assert full[1, 1, 0] and not full[0, 1, 1]  # row 1 is one document: below the diagonal every block is full


def test_document_ids_from_eos_and_starts():
    tokens = torch.tensor([[5, 3, 7, 8, 3, 3, 9]])
    ids = document_ids_from_tokens(tokens, eos_id=3)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # the </s> belongs to the document it ends
    assert document_starts(ids).tolist() == [[0, 0, 2, 2, 2, 5, 6]]


@pytest.mark.parametrize("pos_encoding", ["alibi", "learned", "rope"])
def test_model_loss_and_gradients_of_a_packed_window_equal_each_document_alone(pos_encoding):
    """Through the whole model: absolute positions restart at each document's first token."""
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, seq_len=64, vocab_size=50, pos_encoding=pos_encoding)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    lengths = [1, 20, 9, 34]
    tokens = torch.randint(0, 50, (1, 64))
    ids = ids_of([lengths])
    packed = model(tokens, tokens, document_ids=ids)
    packed.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, start = 0, 0
    for n in lengths:
        total = total + model(tokens[:, start : start + n], tokens[:, start : start + n]) * n / 64
        start += n
    total.backward()
    assert torch.allclose(packed, total, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=1e-6), name


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(2, L, dtype=torch.int32), "int64"),
        (torch.zeros(1, L, dtype=torch.int64), r"\[2, >= 200\]"),
        (torch.zeros(2, L - 1, dtype=torch.int64), r"\[2, >= 200\]"),
        (torch.zeros(2, 1, L, dtype=torch.int64), "got shape"),
    ],
)
def test_bad_document_ids_are_one_line(ids, message):
    q, k, v = qkv(length=L)
    with pytest.raises(ValueError, match=message):
        alibi_attention(q, k, v, slopes(3), document_ids=ids)


def test_ids_that_do_not_run_along_the_window_are_masked_all_the_same(small_blocks):
    """Ids need not rise (e.g. a row of documents 2, 0, 1): no row narrowing then, the masks still exact."""
    q, k, v = qkv(batch=1, length=100)
    ids = torch.cat([torch.full((30,), 2), torch.zeros(40, dtype=torch.long), torch.ones(30, dtype=torch.long)])[None]
    got = alibi_attention(q, k, v, slopes(3), document_ids=ids)
    want = alibi_attention(q, k, v, slopes(3), backend="eager", document_ids=ids)
    assert torch.allclose(got, want, atol=1e-5)
