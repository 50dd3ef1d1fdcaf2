"""The errors a user can cause. Both end the program with one line naming the problem (``pretrain.pipeline``).

Everything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A value a user set is not allowed; the message names the key, the value and what is allowed."""


class PipelineError(RuntimeError):
    """A problem with the user's input found while a stage runs (a missing file, an empty corpus, ...)."""


# The exit status of a run stopped early by a signal or train.time_limit with a checkpoint saved: a scheduler
# requeues the job on it and the same command resumes (EX_TEMPFAIL: "try again later").
EXIT_STOPPED_EARLY = 75
