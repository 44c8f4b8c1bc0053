"""No function or method of the package is longer than 80 lines (its definition, docstring and
body: ``end_lineno - lineno + 1``), so that each can be read on one screen.

Every ``.py`` file of discovery/, tasks/ and graphs/ is parsed; nested functions and methods
count on their own (a function's length includes the functions nested in it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("discovery", "tasks", "graphs")
LIMIT = 80  # lines


def long_functions(source: str, filename: str, limit: int = LIMIT) -> list[str]:
    """``FILE:FUNCTION:LENGTH`` for each function or method of ``source`` over ``limit`` lines;
    a method is named ``Class.method``, a nested function ``outer.inner``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and length > limit:
                    found.append(f"{filename}:{name}:{length}")
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename=filename), "")
    return found


def package_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
    found = [f for p in package_files() for f in long_functions(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, f"{len(found)} function(s) over {LIMIT} lines:\n" + "\n".join(found)


def test_the_length_check_finds_a_long_function_and_method():
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    source = (
        f"def long():\n{body}\n\ndef short():\n    return 1\n\n\n"
        f"class C:\n    def method(self):\n{body.replace('    ', '        ')}        def inner():\n"
        f"{body.replace('    ', '            ')}"
    )
    assert long_functions(source, "m.py") == ["m.py:long:81", "m.py:C.method:162", "m.py:C.method.inner:81"]
    assert long_functions("def f():\n" + "    pass\n" * 79, "m.py") == []  # 80 lines: allowed
    assert len(package_files()) > 30


def test_a_run_reads_as_the_list_of_its_stages():
    """``run_config`` stays a short list of stage calls (``circuitfinder.runs.pipeline``)."""
    source = (ROOT / "discovery" / "runs" / "run.py").read_text()
    run_config = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "run_config")
    assert run_config.end_lineno - run_config.lineno + 1 < 40
