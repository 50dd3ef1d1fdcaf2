"""Shared by both tiers. ``tests/unit``: no test starts a process (under a minute in all). ``tests/e2e``: the real
program in subprocesses (the CLI, several ranks, the benchmarks, the launch scripts), marked ``e2e`` here.

Test modules are imported by path (``--import-mode=importlib`` in pyproject.toml), so two test files may share a
basename in different folders. This folder and ``e2e/`` are on ``sys.path`` (pyproject.toml's ``pythonpath``), so
helpers beside this file, such as ``data_fixtures``, import by their plain names; so do those beside
``e2e/conftest.py`` (``cli``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent / "unit"
E2E = Path(__file__).resolve().parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark everything under tests/e2e ``e2e``; run the unit tier first (otherwise in collection order)."""
    for item in items:
        if item.path.is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)
    items.sort(key=lambda item: not item.path.is_relative_to(UNIT))
