import math

import pytest
import torch

from pretrain.ops.alibi import alibi_bias, causal_mask, head_slopes, positions, slopes

# Worked out by hand from the paper's rule (Press et al. 2022, section 3 and its code).
HAND_SLOPES = {
    8: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8],
    # 8 of a power of two, then every other of 16 heads' 2^-0.5, 2^-1, 2^-1.5, ...: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    12: [
        0.5,
        0.25,
        0.125,
        0.0625,
        0.03125,
        0.015625,
        0.0078125,
        0.00390625,
        0.70710678,
        0.35355339,
        0.17677670,
        0.08838835,
    ],
    # 16 heads' 2^-0.5 .. 2^-8, then every other of 32 heads' 2^-0.25, 2^-0.5, ...: 2^-0.25, 2^-0.75, ...
    24: [
        0.70710678,
        0.5,
        0.35355339,
        0.25,
        0.17677670,
        0.125,
        0.08838835,
        0.0625,
        0.04419417,
        0.03125,
        0.02209709,
        0.015625,
        0.01104854,
        0.0078125,
        0.00552427,
        0.00390625,
        0.84089642,
        0.59460356,
        0.42044820,
        0.29730178,
        0.21022410,
        0.14865089,
        0.10511205,
        0.07432544,
    ],
}


def formula(n: int, i: int) -> float:
    """Slope of head i written as a closed form, independently of the library's list building."""
    lower = 2 ** int(math.floor(math.log2(n)))
    if i < lower:
        return 2.0 ** (-8.0 * (i + 1) / lower)
    return 2.0 ** (-8.0 * (2 * (i - lower) + 1) / (2 * lower))


@pytest.mark.parametrize("n", range(1, 65))
def test_slopes_match_formula(n):
    got = slopes(n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    want = torch.tensor([formula(n, i) for i in range(n)], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", sorted(HAND_SLOPES))
def test_slopes_hand_table(n):
    torch.testing.assert_close(slopes(n), torch.tensor(HAND_SLOPES[n]), rtol=1e-6, atol=1e-8)


def test_twelve_heads_not_attention_gym_rule():
    # 2^(-8(h+1)/H) gives 0.63 for the first of 12 heads; the paper gives 0.5.
    assert slopes(12)[0].item() == 0.5
    assert abs(2 ** (-8 / 12) - 0.63) < 0.01


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_slopes_bad_head_count(bad):
    with pytest.raises(ValueError, match="n_heads"):
        slopes(bad)


def test_head_slopes_are_a_slice_of_global_heads():
    torch.testing.assert_close(head_slopes(12, 6, 6), slopes(12)[6:])
    with pytest.raises(ValueError, match="outside"):
        head_slopes(12, 8, 6)


def test_bias_uses_global_positions_and_relative_distance():
    s = slopes(4)
    q_pos, k_pos = positions(4096, 3), positions(4000, 5)
    bias = alibi_bias(s, q_pos, k_pos)
    assert bias.shape == (4, 3, 5) and bias.dtype == torch.float32
    for h in range(4):
        for a in range(3):
            for b in range(5):
                assert bias[h, a, b].item() == pytest.approx(-s[h].item() * ((4096 + a) - (4000 + b)))
    # Relative: shifting both by the same amount changes nothing.
    torch.testing.assert_close(bias, alibi_bias(s, positions(0, 3), positions(-96, 5)))


def test_bias_exact_at_long_distance_where_bf16_would_not_be():
    # Keys 2040..2043 against query 4095 at slope 0.5: bf16 would give them the same value.
    bias = alibi_bias(torch.tensor([0.5]), positions(4095, 1), positions(2040, 4))[0, 0]
    assert bias.tolist() == [-1027.5, -1027.0, -1026.5, -1026.0]
    assert len(set(bias.to(torch.bfloat16).tolist())) < 4


def test_causal_mask_with_window():
    mask = causal_mask(positions(10, 3), positions(7, 6), window=3)
    # query 10 sees 8, 9, 10; query 11 sees 9..11; query 12 sees 10..12
    want = [[j in range(i - 2, i + 1) for j in range(7, 13)] for i in range(10, 13)]
    assert mask.tolist() == want
