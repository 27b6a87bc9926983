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


def test_the_demo_agent_is_a_program_of_its_own():
    """The demo's workload runs as a script (``python envelope/demo_agent.py``), where Envelope's
    packages are not importable: an import of them fails at run time, in the middle of its
    malicious run (seen in CI). It may use the standard library only."""
    agent = TESTS.parent / "envelope" / "demo_agent.py"
    ours = {"envelope", "sensor", "enforcer", "bench", "tests"}
    found = []
    for node in ast.walk(ast.parse(agent.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [f"{agent.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ours]
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"{agent.name}:{node.lineno} relative import")
    assert not found, found
