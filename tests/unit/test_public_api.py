"""The names the README's library section promises, at the paths it gives them."""

from __future__ import annotations

import torch


def test_the_readme_library_imports_work_and_are_the_ops_themselves():
    from pretrain.alibi import slopes
    from pretrain.attention import alibi_attention
    from pretrain.ops.alibi import slopes as ops_slopes
    from pretrain.ops.attention import alibi_attention as ops_attention

    assert slopes is ops_slopes and alibi_attention is ops_attention
    q = torch.randn(1, 4, 16, 8)
    out = alibi_attention(q, q, q, slopes(4), q_offset=4096, k_offset=4096)
    out_lse = alibi_attention(q, q, q, slopes(4), return_lse=True)
    assert out.shape == (1, 4, 16, 8) and out_lse[1].shape == (1, 4, 16)
