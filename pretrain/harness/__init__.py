"""Downstream tasks: EleutherAI's lm-evaluation-harness on the run's export ``<run_dir>/hf/`` (``stage=harness``).

``run``: the checks before any work and the stage itself; ``results``: ``eval/harness.json``, the console table, the
model card's section and wandb's keys; ``compare``: several runs' results side by side (``harness.compare``).
"""
