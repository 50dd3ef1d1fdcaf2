"""The run's metric files on resume: rows after the resumed step are rewritten, a torn line never stops a resume."""

from __future__ import annotations

import json

from pretrain.config import WandbConfig
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import RunFiles
from pretrain.train.monitor import Monitor


def test_a_torn_last_line_is_dropped_and_later_rows_are_cut(tmp_path, capsys):
    files = RunFiles(tmp_path)
    files.metrics.parent.mkdir(parents=True)
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 7)]
    files.metrics.write_text("\n".join(rows) + '\n{"step": 7, "lo')  # killed while writing step 7
    files.validation.write_text(json.dumps({"step": 2, "val_loss": 3.0}) + "\n" + json.dumps({"step": 6}) + "\n")
    monitor = Monitor(tmp_path, WandbConfig(mode="disabled"), DistContext(), total_steps=10, start_step=4, config={})
    monitor.close()
    assert [json.loads(line)["step"] for line in files.metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in files.validation.read_text().splitlines()] == [2]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
