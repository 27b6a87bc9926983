"""The test suite's own layout: pytest's default import mode puts each test directory on sys.path
and imports a test file by its base name, so two files with one name in different directories stop
the whole run at collection (seen in CI). Keep every test module's base name unique."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_directories():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"test modules sharing a base name: {clashes}"
