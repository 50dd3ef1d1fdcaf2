"""Command-line value types shared by the benchmarks."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1, else a message naming the value and the bound."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be >= 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float > 0, else a message naming the value."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be > 0")
    return value
