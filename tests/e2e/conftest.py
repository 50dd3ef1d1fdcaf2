"""The end-to-end tier: each test starts the real program (or a launch script, a benchmark, a torchrun worker)
in a subprocess, through the helpers in ``cli.py`` beside this file (importable as ``cli``)."""
