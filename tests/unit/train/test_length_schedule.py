"""train.seq_len_schedule: phases by step, constant tokens per step, the loader switched exactly at the step and
restored on either side of a switch, and every bad schedule refused in one line before any work."""

from __future__ import annotations

import pytest

from pretrain.config import Config, ModelConfig, ParallelConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.train.length_schedule import LengthSchedule, ScheduledLoader
from pretrain.train.loop import check_training_split


class FakeLoader:
    """Batches named by (length, micro-batch, index); its state is the index."""

    def __init__(self, length, micro_batch):
        self.length, self.micro_batch, self.index = length, micro_batch, 0

    def next_batch(self):
        self.index += 1
        return (self.length, self.micro_batch, self.index)

    def state_dict(self):
        return {"seq_len": self.length, "index": self.index}

    def load_state_dict(self, state):
        assert state["seq_len"] == self.length
        self.index = state["index"]


def run(loader, first, last):
    out = []
    for completed in range(first, last):
        loader.set_step(completed)
        out.append(loader.next_batch())
    return out


def test_phases_switch_exactly_at_the_step_with_constant_tokens():
    schedule = LengthSchedule([[0, 16], [3, 32], [5, 64]], seq_len=64, micro_batch_size=2)
    assert [schedule.phase_at(n) for n in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [schedule.micro_batch(i) * schedule.length(i) for i in range(3)] == [128, 128, 128]
    batches = run(ScheduledLoader(schedule, FakeLoader), 0, 6)
    assert batches == [(16, 8, 1), (16, 8, 2), (16, 8, 3), (32, 4, 1), (32, 4, 2), (64, 2, 1)]


@pytest.mark.parametrize("stop", [2, 3, 4])  # before, at and after the switch
def test_resume_on_either_side_of_a_switch_is_exact(stop):
    schedule = LengthSchedule([[0, 16], [3, 32]], seq_len=32, micro_batch_size=2)
    whole = run(ScheduledLoader(schedule, FakeLoader), 0, 6)
    first = ScheduledLoader(schedule, FakeLoader)
    head = run(first, 0, stop)
    state = first.state_dict()
    resumed = ScheduledLoader(schedule, FakeLoader)
    resumed.load_state_dict(state)
    assert head + run(resumed, stop, 6) == whole


def test_no_schedule_is_one_phase_of_model_seq_len():
    schedule = LengthSchedule(None, seq_len=128, micro_batch_size=16)
    assert not schedule.active and schedule.length(0) == 128 and schedule.micro_batch(0) == 16


@pytest.mark.parametrize(
    "schedule, model, message",
    [
        ([[0, 64], [10, 32]], {}, "they must rise"),
        ([[5, 32], [10, 64]], {}, "first STEP must be 0"),
        ([[0, 32], [10, 48]], {}, "does not divide the 256 tokens"),
        ([[0, 32], [0, 64]], {}, "steps \\[0, 0\\]; they must rise"),
        ([[0, 32], [10]], {}, "not a list of \\[STEP, LENGTH\\] pairs"),
        ([[0, 32], [10, 128]], {"pos_encoding": "learned"}, "has 64 position rows"),
    ],
)
def test_bad_schedules_are_one_line(schedule, model, message):
    with pytest.raises(ConfigError, match=message):
        Config(model=ModelConfig(seq_len=64, **model), train=TrainConfig(micro_batch_size=4, seq_len_schedule=schedule))


def test_every_length_of_the_schedule_is_checked_against_the_sequence_split():
    cfg = Config(
        model=ModelConfig(seq_len=64, n_head=4),
        train=TrainConfig(micro_batch_size=4, seq_len_schedule=[[0, 16], [10, 64]]),
        parallel=ParallelConfig(sp_size=2, sp_mode="ring", zigzag=True),
    )
    check_training_split(cfg, 2)  # 16 and 64 both cut into 4 chunks
    cfg.train.seq_len_schedule = [[0, 8], [5, 32], [10, 64]]
    check_training_split(cfg, 2)
    cfg.parallel = ParallelConfig(sp_size=4, sp_mode="ring", zigzag=True)  # 8 chunks: 8 tokens is 1 each
    check_training_split(cfg, 4)
    cfg.train.seq_len_schedule = [[0, 4], [5, 32], [10, 64]]
    with pytest.raises(ConfigError, match="train.seq_len_schedule holds length 4: with each sequence split"):
        check_training_split(cfg, 4)


def test_the_plan_shows_every_length_and_the_peak_over_the_schedule():
    from pretrain.perf.plan import format_plan, make_plan

    cfg = Config(model=ModelConfig(seq_len=128), train=TrainConfig(seq_len_schedule=[[0, 32], [100, 128]]))
    text = format_plan(make_plan(cfg, 1, vocab_size=512, device="cpu"))
    assert "32 from step 1 (64 a micro-batch" in text and "128 from step 101 (16 a micro-batch" in text
    assert "the peak over the schedule (at 128)" in text
