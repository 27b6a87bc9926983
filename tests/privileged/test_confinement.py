"""The enforced child's confinement against the real kernel: after joining its cgroup and
applying :class:`enforcer.confinement.Confinement`, a root process cannot write itself into the
root cgroup or a sibling (the cgroup namespace), cannot see or open anything on the bpffs (an
empty tmpfs covers it), and cannot undo either (no CAP_SYS_ADMIN for setns or umount, no way
to the host's mounts through /proc/<parent>/root). The same probes without the confinement
succeed, so each refusal is the confinement's."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import uuid

import pytest

from enforcer.confinement import BREAKERS, Confinement, bpffs_mounts, for_exec, mounts
from sensor.cgroup import CgroupFS, parse_proc_cgroup
from sensor.libc import LIBC

CAP_SYS_ADMIN = 21
MNT_DETACH = 2


@pytest.fixture
def cgroups():
    fs = CgroupFS()
    base = f"/envelope-test/confine-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = []
    for name in ("own", "sibling"):
        path, _ = fs.make(f"{base}/{name}")
        made.append(path)
    yield made
    for name in ("own", "sibling"):
        fs.remove(f"{base}/{name}")
    fs.remove(base)
    fs.remove_empty_parents(base + "/x", stop="/")


@pytest.fixture
def bpffs_entry():
    path = f"/sys/fs/bpf/envelope-test-confine-{os.getpid()}"
    os.mkdir(path)
    yield path
    os.rmdir(path)


def _own_caps(field: str) -> int:
    status = open("/proc/self/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field)), 16)


def _errno_of(fn) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)       # never O_CREAT: a missing file is an error, not a new one
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.setns(fd, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _probe(own: str, sibling: str, root: str, entry: str, parent: int, hidden: bool) -> dict:
    """What a confined root process tries, as errno per attempt (0: it worked). The umount is
    tried only inside the child's own mount namespace (``hidden``): tried outside it, it would
    take the host's bpffs away."""
    out = {"ownCgroup": parse_proc_cgroup(open("/proc/self/cgroup").read())}
    out["bpffsEntry"] = _errno_of(lambda: os.stat(entry))
    try:
        out["bpffsListing"] = sorted(os.listdir("/sys/fs/bpf"))
    except OSError as e:
        out["bpffsListing"] = e.errno
    out["parentRoot"] = _errno_of(lambda: os.listdir(f"/proc/{parent}/root/sys/fs/bpf"))
    out["setns"] = _errno_of(lambda: _setns(f"/proc/{parent}/ns/cgroup"))
    if hidden:
        out["umount"] = 0 if LIBC.umount2(b"/sys/fs/bpf", MNT_DETACH) == 0 else ctypes.get_errno()
    out["sibling"] = _errno_of(lambda: _write(os.path.join(sibling, "cgroup.procs"), "0"))
    out["root"] = _errno_of(lambda: _write(os.path.join(root, "cgroup.procs"), "0"))
    out["capBnd"] = _own_caps("CapBnd")
    try:
        out["cgroupType"] = open(os.path.join(own, "cgroup.type")).read().strip()
    except OSError as e:
        out["cgroupType"] = e.errno
    out["capEff"] = _own_caps("CapEff")
    return out


def _run(confinement: Confinement, own: str, sibling: str, entry: str) -> dict:
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _write(os.path.join(own, "cgroup.procs"), "0")
            confinement.apply()
            os.write(w, json.dumps(_probe(own, sibling, str(CgroupFS().root), entry, parent,
                                             bool(confinement.hide))).encode())
        except BaseException:  # noqa: BLE001 - report it to the test
            import traceback
            os.write(w, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out


def test_unconfined_root_child_can_leave_and_reach_the_pins(cgroups, bpffs_entry):
    own, sibling = cgroups
    out = _run(Confinement(cgroup_namespace=False, hide=(), keep=None), own, sibling, bpffs_entry)
    assert out["ownCgroup"].endswith("/own")
    assert out["bpffsEntry"] == 0
    assert out["sibling"] == 0 and out["root"] == 0
    assert out["setns"] == 0 and out["parentRoot"] == 0
    assert out["capBnd"] & (1 << CAP_SYS_ADMIN)


def test_confined_child_cannot_leave_its_cgroup_or_open_pins(cgroups, bpffs_entry):
    own, sibling = cgroups
    confinement = for_exec("enforce")
    assert "/sys/fs/bpf" in confinement.hide
    assert str(CgroupFS().root) in [point for point, _ in confinement.readonly]
    out = _run(confinement, own, sibling, bpffs_entry)
    assert out["ownCgroup"] == "/"                     # its cgroup is its namespace's root
    assert out["sibling"] in (errno.EROFS, errno.ENOENT)  # read-only cgroupfs (ENOENT: nsdelegate)
    assert out["root"] in (errno.EROFS, errno.ENOENT)
    assert out["bpffsEntry"] == errno.ENOENT and out["bpffsListing"] == []
    assert out["umount"] != 0 and out["setns"] != 0       # EPERM: no CAP_SYS_ADMIN
    assert out["parentRoot"] != 0                         # no ptrace access to the parent
    assert out["cgroupType"] == "domain"                   # cgroup files stay readable
    for cap in BREAKERS:
        assert not out["capBnd"] & (1 << cap)
        assert not out["capEff"] & (1 << cap)
    # everything that is not a way out stays
    breakers = sum(1 << c for c in BREAKERS)
    assert out["capBnd"] == _own_caps("CapBnd") & ~breakers


def test_a_policy_keep_set_is_exact(cgroups, bpffs_entry):
    own, sibling = cgroups
    out = _run(for_exec("enforce", frozenset({0, 10})), own, sibling, bpffs_entry)   # CHOWN, NET_BIND_SERVICE
    assert out["capBnd"] == (1 << 0) | (1 << 10)
    assert out["capEff"] == (1 << 0) | (1 << 10)
    assert out["root"] in (errno.EROFS, errno.ENOENT)


def test_bpffs_mounts_are_found_here():
    assert "/sys/fs/bpf" in bpffs_mounts()
    assert for_exec("alert") is None and for_exec("observe") is None


ESCAPE_CHILD = """
import errno, json, os, socket, sys
root, port = sys.argv[1], int(sys.argv[2])
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def move():
    fd = os.open(os.path.join(root, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
def connect():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    finally:
        s.close()
attempt("move", move)
attempt("connect", connect)
out["bpffs"] = sorted(os.listdir("/sys/fs/bpf")) if os.access("/sys/fs/bpf", os.R_OK) else "unreadable"
print(json.dumps(out), flush=True)
"""


def _exec_escape(tmp_path, mode: str):
    from tests.privileged.listeners import Listener
    from tests.privileged.test_exec_envelope import run_envelope, write_policy
    allowed, other = Listener("127.0.0.1"), Listener("127.0.0.1")
    try:
        state = tmp_path / "state"
        state.mkdir()
        pol = tmp_path / "policy.yaml"
        write_policy(pol, allowed.port)
        child = tmp_path / "escape.py"
        child.write_text(ESCAPE_CHILD)
        import sys
        r = run_envelope(state, "exec", "--policy", str(pol), "--mode", mode, "--", sys.executable, str(child),
                         str(CgroupFS().root), str(other.port))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1]), state
    finally:
        allowed.close()
        other.close()


def test_exec_enforce_confines_the_command(tmp_path):
    from tests.privileged.test_exec_envelope import run_envelope
    out, state = _exec_escape(tmp_path, "enforce")
    assert out["move"] in ("EROFS", "ENOENT")     # it stayed in its cgroup ...
    assert out["connect"] == "EPERM"              # ... so its egress rules still hold
    assert out["bpffs"] in ([], "unreadable")     # and no pin is in sight (Landlock may refuse the read too)
    r = run_envelope(state, "audit", "show", "-o", "json")
    assert r.returncode == 0, r.stderr
    applied = [e for e in json.loads(r.stdout) if e["action"] == "exec.apply"]
    assert len(applied) == 1
    said = applied[0]["details"]["confinement"]   # the audit says how the run was confined
    assert said["cgroupNamespace"] is True and said["hidden"] == list(bpffs_mounts())
    assert said["readOnly"] == [point for point, _ in mounts(("cgroup2", "cgroup"))] != []
    breakers = {name for name, _ in BREAKERS.values()}
    assert breakers <= set(said["capabilitiesDropped"]) and not breakers & set(said["capabilitiesKept"])


def test_exec_alert_mode_leaves_the_way_open_and_moves_back(tmp_path):
    from tests.privileged.test_exec_envelope import violations
    out, state = _exec_escape(tmp_path, "alert")
    assert out["move"] == "ok" and out["bpffs"] != []   # nothing prevented in alert mode
    got = {(v["substrate"], v["behaviour"]) for v in violations(state)}
    assert ("integrity", "cgroup:migration") in got     # the move was seen and reported
