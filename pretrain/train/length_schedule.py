"""The sequence-length schedule (``train.seq_len_schedule=[[STEP, LENGTH], ...]``): shorter windows first, as BTLM's
2k -> 8k, GPT-NeoX's and OLMo's schedules train, within one run.

Step ``s`` (1-based, as metrics count) trains at the length of the last entry whose STEP is below ``s``: with
``[[0, 1024], [100, 2048]]`` steps 1..100 read 1024-token windows and steps 101.. 2048-token ones. Tokens per
optimizer step stay those of ``model.seq_len``: ``train.micro_batch_size`` counts sequences of ``model.seq_len``
tokens, and at length L each micro-batch holds ``micro_batch_size * model.seq_len / L`` sequences (which must be a
whole number), so the learning-rate schedule, gradient accumulation and DeepSpeed's batch arithmetic are unchanged.

Each length reads the corpus through its own loader (windows of that length, in their own shuffled order from the
start of an epoch), created at the step it starts; its position is saved with every checkpoint beside the index of
the phase, so a resume on either side of a switch continues exactly.
"""

from __future__ import annotations

from typing import Any

# Marks a loader state as the schedule's (the phase it was saved in), beside the phase loader's own keys.
PHASE_KEY = "seq_len_phase"


def schedule_lengths(cfg) -> list[int]:
    """Every length the run trains at: the schedule's, or ``model.seq_len`` alone. (The schedule's shape and fit are
    checked with the config: ``config.check_schedule_shape``, ``config.check_schedule_fits``.)"""
    schedule = cfg.train.seq_len_schedule
    return [cfg.model.seq_len] if not schedule else [int(length) for _, length in schedule]


class LengthSchedule:
    """Which length, and how many sequences per micro-batch, each step trains with."""

    def __init__(self, schedule, seq_len: int, micro_batch_size: int) -> None:
        self.phases = [(0, seq_len)] if not schedule else [(int(s), int(n)) for s, n in schedule]
        self.tokens = micro_batch_size * seq_len

    @property
    def active(self) -> bool:
        return len(self.phases) > 1

    def phase_at(self, completed: int) -> int:
        """The phase of the step after ``completed`` optimizer steps."""
        return max(i for i, (start, _) in enumerate(self.phases) if start <= completed)

    def length(self, phase: int) -> int:
        return self.phases[phase][1]

    def micro_batch(self, phase: int) -> int:
        return self.tokens // self.length(phase)


class ScheduledLoader:
    """The training batches of a length schedule: one loader per length (``make_loader(seq_len, micro_batch)``),
    switched at the steps the schedule names. ``set_step(completed)`` before each step; ``state_dict`` is the current
    phase loader's, with the phase."""

    def __init__(self, schedule: LengthSchedule, make_loader) -> None:
        self.schedule = schedule
        self.make_loader = make_loader
        self.phase = 0
        self.loader = self._make(0)

    def _make(self, phase: int):
        return self.make_loader(self.schedule.length(phase), self.schedule.micro_batch(phase))

    @property
    def seq_len(self) -> int:
        return self.schedule.length(self.phase)

    def set_step(self, completed: int) -> bool:
        """Switch to the length of the step after ``completed`` steps; whether it changed."""
        phase = self.schedule.phase_at(completed)
        if phase == self.phase:
            return False
        self.phase, self.loader = phase, self._make(phase)
        return True

    def next_batch(self):
        return self.loader.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), PHASE_KEY: self.phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        phase = int(state.get(PHASE_KEY, 0))
        if phase >= len(self.schedule.phases):
            raise ValueError(
                f"cannot resume the data loader: the checkpoint was in phase {phase} of a longer train.seq_len_schedule"
            )
        if phase != self.phase:
            self.phase, self.loader = phase, self._make(phase)
        self.loader.load_state_dict({k: v for k, v in state.items() if k != PHASE_KEY})
