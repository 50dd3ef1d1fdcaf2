"""Bad values on the real command line: one clear message, no traceback."""

import pytest
from cli import run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.n_head=5"], "error: model.d_model=128 is not divisible by model.n_head=5"),
        (["model.pos_encoding=xpos"], "error: model.pos_encoding='xpos' is not allowed"),
        (["model.no_such_key=1"], "Key 'no_such_key' not in 'ModelConfig'"),
        (["train.lr=abc"], "train.lr"),
    ],
)
def test_command_line_errors_are_one_clear_message(args, message):
    proc = run_cli(["pretrain", *args], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
