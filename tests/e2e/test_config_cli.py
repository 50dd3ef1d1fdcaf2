"""Bad values on the real command line: one clear message, no traceback."""

import pytest
from cli import run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.n_head=5"], "error: model.d_model=128 is not divisible by model.n_head=5"),
        (["model.pos_encoding=xpos"], "error: model.pos_encoding='xpos' is not allowed"),
        (
            ["model.no_such_key=1"],
            "error: unknown config key 'model.no_such_key'; model.* keys: model.alibi_slopes, model.attention",
        ),
        (["train.max_step=3"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
        (["train.lr=abc"], "train.lr"),
    ],
)
def test_command_line_errors_are_one_clear_message(args, message):
    proc = run_cli(["pretrain", *args], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    if message.startswith("error: unknown config key"):  # ours, not Hydra's seven lines
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.returncode == 2
