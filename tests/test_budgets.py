"""The size budgets of the library (issue 15): no module of `pfgm_diffusers` over 600 lines, no class over 400, no
function over 100 (docstrings included). The trainer's 120-line rule is in test_checkpoints.py."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "pfgm_diffusers"
MODULE_LINES, CLASS_LINES, FUNCTION_LINES = 600, 400, 100


def over_budget(name: str, source: str) -> list[str]:
    found = []
    if len(source.splitlines()) > MODULE_LINES:
        found.append(f"{name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > (CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES):
                found.append(f"{name}: {node.name} {lines} lines")
    return found


def test_library_modules_classes_and_functions_keep_their_budgets():
    paths = sorted(LIBRARY.rglob("*.py"))
    assert len(paths) > 20
    found = [entry for path in paths for entry in over_budget(path.name, path.read_text())]
    assert found == []


def test_the_budget_check_finds_each_kind_of_excess():
    body = "    x = 1\n"
    assert over_budget("f.py", "def f():\n" + body * (FUNCTION_LINES - 1)) == []
    assert over_budget("f.py", "def f():\n" + body * FUNCTION_LINES) == ["f.py: f 101 lines"]
    big_class = "class C:\n" + "".join(f"    def m{i}(self):\n        pass\n" for i in range(CLASS_LINES // 2))
    assert over_budget("c.py", big_class) == ["c.py: C 401 lines"]
    assert over_budget("m.py", "x = 1\n" * (MODULE_LINES + 1)) == ["m.py: 601 lines"]
