"""The package's layers: a module imports only from its own layer or those below.

Every import of every module counts, those inside functions and under ``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"discovery": "circuitfinder", "tasks": "circuitfinder.tasks", "graphs": "circuitfinder.graphs"}

# bottom to top; a module belongs to the layer of its longest matching prefix
LAYERS = (
    (
        "base",
        (
            "circuitfinder.errors",
            "circuitfinder.config",
            "circuitfinder.folders",
            "circuitfinder.checkpoint",
            "circuitfinder.compiled",
        ),
    ),
    ("tasks", ("circuitfinder.tasks",)),
    ("engine", ("circuitfinder.engine",)),
    ("methods", ("circuitfinder.methods",)),
    ("circuit and graphs", ("circuitfinder.graphs",)),
    ("runs and the command line", ("circuitfinder.runs", "circuitfinder.cli", "circuitfinder")),
)


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), level)
        for level, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not matches:
        raise ValueError(f"{module} is in no layer")
    return max(matches)[1]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imported(source: str) -> set[str]:
    """Every ``circuitfinder`` module a source imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "circuitfinder" or n.startswith("circuitfinder.")}


def violations(module: str, source: str) -> list[str]:
    own = layer_of(module)
    return [
        f"{module} ({LAYERS[own][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
        for name in sorted(imported(source))
        if layer_of(name) > own
    ]


def test_every_module_imports_only_from_its_layer_or_below():
    found = [v for module, path in sorted(modules().items()) for v in violations(module, path.read_text())]
    assert found == []


def test_the_layer_check_finds_an_upward_import():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from circuitfinder.runs.run import Run\n"
    assert violations("circuitfinder.engine.graph", source) == [
        "circuitfinder.engine.graph (engine) imports circuitfinder.runs.run (runs and the command line)"
    ]
    assert violations("circuitfinder.runs.run", source) == []
    with pytest.raises(ValueError, match="in no layer"):
        layer_of("discovery.graph")


def test_every_module_is_in_a_layer_and_the_front_door_names_exist():
    import circuitfinder

    assert len(modules()) > 30 and all(layer_of(m) >= 0 for m in modules())
    for name in circuitfinder.__all__:
        assert getattr(circuitfinder, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        circuitfinder.nothing  # noqa: B018
