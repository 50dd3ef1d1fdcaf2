"""Optional dependencies: the modules that only an optional stage or benchmark needs, and the extra installing each.

Everything the default chain (a bare ``pretrain``: prepare, train, eval, export) and every stage the README shows
without an extra imports is a base dependency in pyproject.toml. A module listed in ``OPTIONAL`` is never imported
at the top of a module: it is loaded by :func:`optional_import`, which turns its absence into one line naming the
extra to install. ``tests/unit/test_dependencies.py`` reads pyproject.toml and holds both rules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pretrain.errors import PipelineError


@dataclass(frozen=True)
class OptionalModule:
    distribution: str  # what pip installs (as the extra in pyproject.toml lists it)
    extra: str  # the extra of this project that brings it


# top-level module -> where it comes from
OPTIONAL: dict[str, OptionalModule] = {
    "transformers": OptionalModule("transformers", "bench"),
    # stage=harness: EleutherAI's lm-evaluation-harness (its hf model brings transformers and accelerate).
    "lm_eval": OptionalModule("lm-eval", "harness"),
}


class MissingExtraError(PipelineError):
    """An optional module is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    return f'pip install -e ".[{extra}]" in a checkout, or pip install "alibi-pretrain[{extra}]"'


def optional_import(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (or a submodule of an ``OPTIONAL`` one); if it is not installed, one line saying which
    extra brings it. ``needed_for`` says what asked for it, e.g. ``"the bloom baseline of bench train_step"``."""
    top = module.split(".")[0]
    if top not in OPTIONAL:
        raise KeyError(f"{top} is not an optional dependency; list it in pretrain.extras.OPTIONAL")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the optional package is there but something it needs is broken: keep the traceback
        spec = OPTIONAL[top]
        raise MissingExtraError(
            f"{needed_for} needs {spec.distribution}, which is not installed; it comes with the "
            f"'{spec.extra}' extra: {install_hint(spec.extra)}"
        ) from None
