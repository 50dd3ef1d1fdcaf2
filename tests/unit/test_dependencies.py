"""What the package imports is what pyproject.toml installs.

A newcomer runs ``pip install -e . && pretrain``: no extra. So every third-party module the package imports is a
base dependency (listed directly, not left to another package's requirements), except the modules of
``pretrain.extras.OPTIONAL``, which are loaded only through ``optional_import`` and belong to the extra it names.
This fails in seconds when a base dependency is removed or an import is added without one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from pretrain.extras import OPTIONAL, MissingExtraError, optional_import

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pretrain"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def third_party_imports() -> dict[str, list[str]]:
    """top-level module -> ["pretrain/x.py:12", ...] for every import statement naming it, function-local too."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "pretrain" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_walk_sees_the_package():
    imports = third_party_imports()
    assert {"torch", "deepspeed", "sentencepiece"} <= set(imports), sorted(imports)


def test_every_imported_module_is_a_base_dependency():
    base = {requirement_name(r) for r in project()["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, places in sorted(third_party_imports().items()):
        if module in OPTIONAL:
            continue
        distributions = {canonical(d) for d in providers.get(module, [])}
        if not distributions:
            missing.append(f"{module} (imported at {places[0]}) is not installed here, so nothing provides it")
        elif not distributions & base:
            missing.append(
                f"{module} (imported at {places[0]}) comes from {sorted(distributions)}, "
                "which pyproject.toml's [project] dependencies do not list"
            )
    assert not missing, "a fresh `pip install -e .` would lack modules the package imports:\n" + "\n".join(missing)


def test_optional_modules_are_imported_only_through_optional_import():
    imports = third_party_imports()
    direct = {module: imports[module] for module in OPTIONAL if module in imports}
    assert not direct, (
        f"import these through pretrain.extras.optional_import, so that a missing extra is one line: {direct}"
    )


def test_each_optional_module_belongs_to_its_extra_and_the_dev_extra():
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project()["optional-dependencies"].items()}
    base = {requirement_name(r) for r in project()["dependencies"]}
    for module, spec in OPTIONAL.items():
        dist = canonical(spec.distribution)
        assert spec.extra in extras, f"{module}: pyproject.toml has no extra {spec.extra!r}"
        assert dist in extras[spec.extra], f"{module}: the {spec.extra!r} extra does not list {spec.distribution}"
        assert dist in extras["dev"], f"{module}: the tests need it, so the dev extra lists {spec.distribution} too"
        assert dist not in base, f"{module} is optional but also a base dependency: keep it in one place"


def test_a_missing_optional_module_is_one_line_naming_its_extra(monkeypatch):
    from pretrain.extras import OptionalModule

    monkeypatch.setitem(OPTIONAL, "surely_not_installed_xyz", OptionalModule("surely-not-installed", "bench"))
    with pytest.raises(MissingExtraError) as err:
        optional_import("surely_not_installed_xyz.sub", "the thing under test")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the thing under test needs surely-not-installed, which is not installed")
    assert "'bench' extra" in message and 'pip install -e ".[bench]"' in message


def test_optional_import_refuses_a_module_not_declared_optional():
    with pytest.raises(KeyError, match="list it in pretrain.extras.OPTIONAL"):
        optional_import("json", "nothing")


def test_optional_import_loads_an_installed_module():
    assert optional_import("transformers", "the test").__name__ == "transformers"
