"""Exec paths judged by resolved name: aliases and symlinks name one file."""

from __future__ import annotations

from enforcer.exec_paths import ExecNames
from enforcer.policy import Policy
from sensor.workload import Workload

W = Workload.host("agent")
#: a merged-/usr host: /bin -> /usr/bin, python3 -> python3.11, sh -> dash
LINKS = {"/bin/sh": "/usr/bin/dash", "/usr/bin/sh": "/usr/bin/dash", "/usr/bin/python3": "/usr/bin/python3.11",
         "/bin/python3": "/usr/bin/python3.11", "/bin/cat": "/usr/bin/cat", "/usr/bin/cat": "/usr/bin/cat",
         "/usr/bin/python3.11": "/usr/bin/python3.11", "/usr/bin/dash": "/usr/bin/dash", "/bin": "/usr/bin",
         "/usr/bin": "/usr/bin", "/opt/tools": "/opt/tools", "/opt/tools/run": "/opt/tools/run",
         "/srv/link-to-tools": "/opt/tools"}


def resolve(root: str, path: str) -> str | None:
    return LINKS.get(path)


def names() -> ExecNames:
    return ExecNames("/", resolve=resolve)


def test_an_alias_of_an_allowed_file_is_the_same_file():
    p = Policy(W, substrates=("exec",), execs=("/usr/bin/python3", "/usr/bin/cat"))
    admits = names().admits(p)
    assert admits("exec:/usr/bin/python3.11") and admits("exec:/bin/python3") and admits("exec:/bin/cat")
    assert not admits("exec:/bin/sh") and not admits("exec:/usr/bin/dash")
    assert not p.allows("exec:/bin/cat")  # the pure check sees two names; the edge resolves them


def test_a_pattern_matches_through_its_directory_alias():
    p = Policy(W, substrates=("exec",), execs=("/opt/tools/*",))
    admits = names().admits(p)
    assert admits("exec:/opt/tools/run") and admits("exec:/srv/link-to-tools/run")
    assert not admits("exec:/usr/bin/cat")


def test_unresolvable_paths_are_judged_as_given_and_the_cache_is_bounded():
    n = ExecNames("/", cache=2, resolve=resolve)
    assert n.canonical("/gone/tool") == "/gone/tool"
    for path in ("/bin/sh", "/bin/cat", "/usr/bin/python3"):
        n.canonical(path)
    assert len(n._cache) == 2
