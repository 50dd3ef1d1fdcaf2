"""The RSS meter the benchmarks use: it sees a known allocation, and a fresh start forgets the last peak."""

import pytest
import torch

from pretrain.perf.memory import MIB, RssPeakMemory, reset_rss_high_water_mark


@pytest.mark.skipif(not reset_rss_high_water_mark(), reason="needs Linux /proc/self/clear_refs")
def test_rss_meter_sees_a_known_allocation():
    meter = RssPeakMemory()
    meter.start()
    block = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    del block
    assert 60 <= meter.peak_extra_bytes() / MIB <= 80
    meter.start()  # a fresh start forgets the 64 MiB peak
    assert meter.peak_extra_bytes() / MIB < 16
