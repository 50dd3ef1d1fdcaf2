"""The package's imports run one way: errors/config -> ops -> model -> parallel -> perf -> data -> train -> eval ->
pipeline. Walks every ``import`` in the package (function-local ones too) and fails on an upward import or a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pretrain"  # tests/unit/ -> the repository's pretrain/

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"errors", "extras", "config", "run_files", "tracking"},
    {"ops", "alibi", "attention"},  # alibi.py and attention.py: the public library names, re-exported from ops
    {"model"},
    {"parallel"},
    {"perf"},
    {"data"},
    {"train"},
    {"eval"},
    {"export", "generate"},
    {"harness"},  # lm-evaluation-harness on the export
    {"pipeline", "run_lock", "run_record", "__main__"},
    {"bench"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import statement is."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest prefix that is one of the package's modules
            parts = target.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert (PACKAGE / "__init__.py") in files, f"no package at {PACKAGE}: the walk would check nothing"
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer():
    unplaced = sorted({unit(m) for m in import_graph() if unit(m) is not None and unit(m) not in LAYER_OF})
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{module} (layer {LAYER_OF[unit(module)]}) imports {target} (layer {LAYER_OF[unit(target)]})"
        for module, targets in import_graph().items()
        if unit(module) is not None
        for target in targets
        if unit(target) is not None and LAYER_OF[unit(target)] > LAYER_OF[unit(module)]
    ]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_function_local_and_upward_imports(tmp_path):
    """The walk must see an import inside a function: that is how cycles hid before."""
    source = tmp_path / "pretrain" / "ops" / "example.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from pretrain.train.loop import run_train\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pretrain"
    try:
        found = imported_modules(source, {"pretrain.ops.example", "pretrain.train.loop", "pretrain.train"})
    finally:
        PACKAGE = saved
    assert found == {"pretrain.train.loop"}
