"""The test suite's own layout: pytest's default import mode puts each test directory on sys.path
and imports a test file by its base name, so two files with one name in different directories stop
the whole run at collection (seen in CI). Keep every test module's base name unique."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_directories():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"test modules sharing a base name: {clashes}"


def _parametrizes(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "parametrize"


def test_parametrize_marks_sit_on_tests():
    """A ``parametrize`` mark on a helper (a function inserted between a mark and its test) leaves
    the test with unknown fixtures, which pytest reports only when the test runs (seen in CI)."""
    misplaced = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not node.name.startswith("test") \
                    and any(_parametrizes(d) for d in node.decorator_list):
                misplaced.append(f"{path.relative_to(TESTS)}:{node.lineno} {node.name}")
    assert not misplaced, f"parametrize marks on functions that are not tests: {misplaced}"
