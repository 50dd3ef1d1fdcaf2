"""The entry point's one-line message for a misspelt config key (Hydra's own takes seven lines)."""

from __future__ import annotations

from pretrain.__main__ import unknown_key_message


def test_a_misspelt_key_is_named_with_the_closest_known_one():
    message = unknown_key_message(["model=tiny", "model.d_modle=3"])
    assert message.startswith("error: unknown config key 'model.d_modle'; did you mean model.d_model? model.* keys:")
    assert "\n" not in message
    assert "did you mean model?" in unknown_key_message(["modle=tiny"])
    assert "did you mean train.max_steps?" in unknown_key_message(["train.max_step=3"])


def test_known_keys_groups_and_hydra_syntax_pass():
    args = [
        "model=125m",
        "train.lr=1e-3",
        "eval.lengths=[32,64]",
        "train.deepspeed.zero_optimization.stage=1",  # below a free-form value
        "+extra=1",
        "hydra.run.dir=.",
        "export.dtype=bf16",
        "generate.prompt=hi",
    ]
    assert unknown_key_message(args) is None
