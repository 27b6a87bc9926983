"""A confined root process that moves itself out of its enforced cgroup (writes its pid into a
sibling's cgroup.procs) walks out of the egress programs attached there. The denial probe sees
the move inside the write (cgroup:cgroup_attach_task, the writer marked at sys_enter), and the
enforcement session moves the task back, audits nothing (unpinned, as ``envelope exec``) and
reports an ``integrity`` violation; a move into a child cgroup is not an escape."""

from __future__ import annotations

import errno
import os
import socket
import struct
import uuid

import pytest

from enforcer.session import EnforcementSession
from tests.privileged.test_egress_pinning import (  # noqa: F401 - fixtures
    cgroup, policy_for, ports, workload)


@pytest.fixture
def sibling():
    from sensor.cgroup import CgroupFS
    fs = CgroupFS()
    rel = f"/envelope-test/escape-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path, _ = fs.make(rel)
    yield path
    fs.remove(rel)
    fs.remove_empty_parents(rel + "/x", stop="/")


def _connect(port: int) -> int:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read().strip().split("::", 1)[1]


def _child(cgroup_path, dest, port, to_parent, from_parent):
    """In the enforced cgroup: connect, move to ``dest``, connect, wait, connect."""
    out = []
    with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
        f.write("0")
    out.append(_connect(port))
    with open(os.path.join(dest, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    out.append(_connect(port))
    os.write(to_parent, b"m")
    os.read(from_parent, 1)
    out.append(_connect(port))
    os.write(to_parent, struct.pack("=3i", *out))


def run_escape(cgroup_path, dest, port, session):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _child(str(cgroup_path), str(dest), port, w1, r2)
        finally:
            os._exit(0)
    try:
        assert os.read(r1, 1) == b"m"
        violations = []
        for _ in range(20):
            violations += session.poll_violations(timeout_ms=100)
            if any(v.substrate == "integrity" for v in violations):
                break
        where = _cgroup_of(pid)
        os.write(w2, b"g")
        res = struct.unpack("=3i", os.read(r1, 12))
    finally:
        os.waitpid(pid, 0)
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    return res, where, violations


def test_a_task_that_leaves_its_cgroup_is_moved_back_and_reported(tmp_path, cgroup, sibling,
                                                                   workload, ports):
    from sensor.cgroup import CgroupFS
    allowed, forbidden, _ = ports
    s = EnforcementSession(tmp_path / "state", pinned=False, denials=True)
    try:
        s.apply(policy_for(workload, [allowed]), "enforce", [cgroup])
        res, where, violations = run_escape(cgroup, sibling, forbidden, s)
    finally:
        s.close()
    fs = CgroupFS()
    # denied inside, open after the move (the escape is real), denied again once moved back
    assert res == (errno.EPERM, 0, errno.EPERM)
    assert where == fs.relpath(cgroup)
    [v] = [v for v in violations if v.substrate == "integrity"]
    assert (v.workload, v.behaviour, v.action) == (workload.key, "cgroup:migration", "denied")
    assert v.detail["to"] == str(sibling) and v.detail["from"] == str(cgroup)
    assert v.detail["moved_back"] is True


def test_a_move_into_a_child_cgroup_is_not_an_escape(tmp_path, cgroup, workload, ports):
    allowed, forbidden, _ = ports
    child = cgroup / "inner"
    child.mkdir()
    s = EnforcementSession(tmp_path / "state", pinned=False, denials=True)
    try:
        s.apply(policy_for(workload, [allowed]), "enforce", [cgroup])
        res, where, violations = run_escape(cgroup, child, forbidden, s)
    finally:
        s.close()
        # the child has exited; its cgroup can go
        child.rmdir()
    # the egress programs are inherited by the child cgroup: denied all along
    assert res == (errno.EPERM, errno.EPERM, errno.EPERM)
    assert where.endswith("/inner")
    assert not [v for v in violations if v.substrate == "integrity"]
