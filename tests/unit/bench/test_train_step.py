"""The train_step benchmark's own arithmetic: option checks, targets and ratios from rows, the memory estimate."""

import pytest

from pretrain.bench.train_step import add_ratios, estimate_step_bytes, model_shape, target_checks
from pretrain.bench.train_step import main as train_step_main


def test_train_step_bad_options_are_clear_errors(capsys):
    for argv, message in (
        (["--models", "huge"], "argument --models: invalid choice: 'huge'"),
        (["--lengths", "0"], "argument --lengths: 0 is not allowed; it must be >= 1"),
        (["--min-time", "-1"], "--min-time -1.0 is not allowed; it must be >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train_step_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_targets_and_ratios_from_rows():
    def row(impl, seq, tokens_per_s, peak_mib):
        return {"model": "tiny", "seq": seq, "impl": impl, "status": "ok", "tokens_per_s": tokens_per_s,
                "peak_mib": peak_mib}  # fmt: skip

    rows = [
        row("ours", 512, 1100.0, 90.0), row("bloom", 512, 1000.0, 100.0),
        row("ours", 2048, 1400.0, 40.0), row("bloom", 2048, 1000.0, 100.0),
        {"model": "tiny", "seq": 8192, "impl": "bloom", "status": "skipped: too big"},
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[0]["tokens_per_s_vs_bloom"] == 1.1 and rows[0]["peak_vs_bloom"] == 0.9
    assert rows[4]["tokens_per_s_vs_bloom"] is None
    checks = target_checks(rows)
    assert [c["status"] for c in checks] == ["MISS", "PASS", "SKIP"]  # 1.4x < 1.5x at 2048
    assert "1.40x" in checks[0]["detail"]


def test_memory_estimate_skips_what_cannot_fit():
    tiny, base = model_shape("tiny"), model_shape("125m")
    assert (base.n_layer, base.d_model, base.n_head) == (12, 768, 12)
    # BLOOM's saved [heads, L, L] float32 probabilities dominate at 8192: 12 layers x 3 GiB.
    assert estimate_step_bytes("bloom", base, 8192, 1, 8192) > 40 * 1024**3
    assert estimate_step_bytes("ours", base, 8192, 1, 8192) < 10 * 1024**3
    assert estimate_step_bytes("ours", tiny, 2048, 1, 8192) < estimate_step_bytes("bloom", tiny, 2048, 1, 8192)
