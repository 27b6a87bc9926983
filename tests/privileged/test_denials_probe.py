"""The seccomp denial probe on real processes under real seccomp filters.

Method under test: a call that seccomp denies reaches raw sys_exit with -errno but never raw
sys_enter; an ordinary failure with the same errno passes through sys_enter first.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid

import pytest


@pytest.fixture
def cgroups():
    from sensor.cgroup import CgroupFS
    fs = CgroupFS()
    base = f"/envelope-test/denials-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = {}
    for name in ("watched", "other"):
        path, cid = fs.make(f"{base}/{name}")
        made[name] = (path, cid)
    yield made
    fs.remove(base)
    fs.remove_empty_parents(base + "/x", stop="/")


@pytest.fixture
def probe():
    from enforcer.denials import DenialProbe
    p = DenialProbe()
    yield p
    p.close()


def collect(probe):
    from sensor.kernel import RingReader as RingBufferReader
    from sensor.events import decode
    events = []
    reader = RingBufferReader()
    reader.add(probe.events_fd, lambda raw: events.append(decode(raw)))
    return reader, events


def run_child(cgroup_path, body) -> list[int]:
    """Fork; the child joins ``cgroup_path`` and runs ``body()`` which returns a list of ints
    (errno per attempt), sent back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
                f.write("0")
            out = body()
            os.write(w, struct.pack(f"={len(out)}i", *out))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return list(struct.unpack(f"={len(data) // 4}i", data))


def _errno_of(fn) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


def totals(probe) -> dict:
    """The kernel's counts, by (syscall name, pid, denied)."""
    from enforcer.denials import parse_denial_key
    from sensor.syscalls import name as syscall_name
    out = {}
    for key, n in probe.counts():
        k = parse_denial_key(key)
        out[(syscall_name(k["nr"]), k["pid"], k["denied"])] = n
    return out


def test_every_denied_call_counted_once_announced_once_and_ordinary_eperm_not(probe, cgroups):
    import seccomp
    from sensor.syscalls import name as syscall_name
    from enforcer.seccomp import DENY_ERRNO
    path, cid = cgroups["watched"]
    probe.watch(cid, "enforce", DENY_ERRNO)
    reader, events = collect(probe)

    def body():
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(seccomp.ERRNO(DENY_ERRNO), "getsid")
        f.load()
        res = [_errno_of(lambda: os.getsid(0)) for _ in range(4)]
        # Ordinary EPERMs, after dropping privileges: signalling init, and regaining root.
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        res += [_errno_of(lambda: os.kill(1, 0)) for _ in range(3)]
        res += [_errno_of(lambda: os.setuid(0))]
        return res

    res = run_child(path, body)
    assert res == [errno.EPERM] * 4 + [errno.EPERM] * 3 + [errno.EPERM]
    reader.poll(100)
    reader.drain()
    reader.close()
    names = [syscall_name(ev.nr) for ev in events]
    assert names == ["getsid"]  # announced once, with its context; the ordinary EPERMs not at all
    [ev] = events
    assert ev.ret == -DENY_ERRNO and ev.cgroup_id == cid and ev.counted and ev.comm
    # and counted in the kernel: each denied call exactly once
    assert totals(probe) == {("getsid", ev.pid, True): 4}
    assert probe.lost() == 0 and probe.uncounted() == 0


def test_unwatched_cgroup_is_not_reported(probe, cgroups):
    import seccomp
    from enforcer.seccomp import DENY_ERRNO
    probe.watch(cgroups["watched"][1], "enforce", DENY_ERRNO)
    reader, events = collect(probe)

    def body():
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(seccomp.ERRNO(DENY_ERRNO), "getsid")
        f.load()
        return [_errno_of(lambda: os.getsid(0))]

    assert run_child(cgroups["other"][0], body) == [errno.EPERM]
    reader.poll(100)
    reader.drain()
    reader.close()
    assert events == [] and probe.counts() == []


def test_alert_mode_reports_calls_outside_the_allowed_set(probe, cgroups):
    import seccomp
    from sensor.syscalls import name as syscall_name
    path, cid = cgroups["watched"]
    allowed = [syscall_name(nr) for nr in range(0, 512) if syscall_name(nr) != "getsid"]
    probe.watch(cid, "alert", errno.EPERM, [n for n in allowed if not n.startswith("nr_")])
    reader, events = collect(probe)

    def body():
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(seccomp.LOG, "getsid")  # alert mode: the call runs and is logged
        f.load()
        return [_errno_of(lambda: os.getsid(0)) for _ in range(2)]

    assert run_child(path, body) == [0, 0]  # allowed
    reader.poll(100)
    reader.drain()
    reader.close()
    assert [(syscall_name(ev.nr), ev.ret) for ev in events] == [("getsid", 0)]  # announced once
    assert totals(probe) == {("getsid", events[0].pid, False): 2}  # counted per call


URING_C = os.path.join(os.path.dirname(__file__), "workloads", "uring_connect.c")


@pytest.fixture(scope="module")
def uring_connect(tmp_path_factory) -> str:
    import shutil
    import subprocess
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the io_uring workload; run make setup")
    out = tmp_path_factory.mktemp("uring") / "uring_connect"
    subprocess.run([gcc, "-O1", "-Wall", "-o", str(out), URING_C], check=True)
    return str(out)


def run_in_cgroup(cgroup_path, argv):
    import subprocess

    def join():
        with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
            f.write("0")
    return subprocess.run(argv, preexec_fn=join, capture_output=True, text=True, timeout=30)


def test_io_uring_operations_are_announced_once_and_judged_against_the_profile(
        probe, cgroups, uring_connect):
    """connect(2) done by the ring: seccomp never sees it, the submission tracepoint does."""
    import socket
    from sensor.events import IoUringOpEvent
    from enforcer.seccomp import DENY_ERRNO
    from enforcer.violations import from_io_uring_event
    if not probe.io_uring:
        pytest.skip("this kernel has no io_uring:io_uring_submit_req tracepoint")
    path, cid = cgroups["watched"]
    allowed = frozenset({"io_uring_setup", "io_uring_enter", "socket", "close", "mmap"})
    probe.watch(cid, "enforce", DENY_ERRNO, allowed)
    probe.watch(cgroups["other"][1], "enforce", DENY_ERRNO, allowed)
    reader, events = collect(probe)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        done = run_in_cgroup(path, [uring_connect, str(port), "3"])
        assert done.returncode == 0, done.stderr
        # the NOP completed, then three connects succeeded through the ring
        assert done.stdout.split("\n")[:4] == ["0 0", "16 0", "16 0", "16 0"]
    reader.poll(100)
    reader.drain()
    reader.close()
    ours = [ev for ev in events if isinstance(ev, IoUringOpEvent)]
    assert sorted((ev.op, ev.syscall) for ev in ours) == [("CONNECT", "connect"), ("NOP", None)]
    assert all(ev.cgroup_id == cid and not ev.sq_thread for ev in ours)
    # only the connect is outside the profile; the NOP has no syscall to judge
    judged = [from_io_uring_event(ev, "default/agent", 0.0, allowed) for ev in ours]
    reported = [v for v in judged if v is not None]
    assert [(v.behaviour, v.action, v.detail["via"]) for v in reported] == [
        ("syscall:connect", "alerted", "io_uring")]
    assert from_io_uring_event(next(e for e in ours if e.op == "CONNECT"), "default/agent", 0.0,
                               allowed | {"connect"}) is None


def test_io_uring_is_announced_again_after_the_cgroup_is_rewatched(probe, cgroups, uring_connect):
    """A policy update rewrites the cgroup's entry: its operations are judged afresh."""
    import socket
    from sensor.events import IoUringOpEvent
    from enforcer.seccomp import DENY_ERRNO
    if not probe.io_uring:
        pytest.skip("this kernel has no io_uring:io_uring_submit_req tracepoint")
    path, cid = cgroups["watched"]
    probe.watch(cid, "enforce", DENY_ERRNO, ())
    reader, events = collect(probe)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = str(listener.getsockname()[1])
        assert run_in_cgroup(path, [uring_connect, port, "1"]).returncode == 0
        assert run_in_cgroup(path, [uring_connect, port, "1"]).returncode == 0
        probe.watch(cid, "enforce", DENY_ERRNO, ())
        assert run_in_cgroup(path, [uring_connect, port, "1"]).returncode == 0
    reader.poll(100)
    reader.drain()
    reader.close()
    connects = [ev for ev in events if isinstance(ev, IoUringOpEvent) and ev.op == "CONNECT"]
    assert len(connects) == 2  # first run, then after the rewatch; the second run not at all



def _sockets():
    import socket as so
    return [(so.AF_INET, so.SOCK_STREAM, 0), (so.AF_INET6, so.SOCK_DGRAM | so.SOCK_CLOEXEC, 0),
            (so.AF_UNIX, so.SOCK_STREAM, 0), (so.AF_INET, so.SOCK_RAW, so.IPPROTO_ICMP),
            (so.AF_PACKET, so.SOCK_RAW, 0x0300), (so.AF_INET, so.SOCK_DGRAM, so.IPPROTO_ICMP)]


def _socket_policy():
    from enforcer.policy import Policy
    from sensor import syscalls
    from sensor.workload import Workload
    # every syscall the table knows, so the child's Python keeps running under the filter
    names = [n for n in syscalls.NAMES.values() if n not in ("socket",)] + ["socket"]
    return Policy(workload=Workload("default", "Deployment", "sockets", "main"), mode="enforce",
                  substrates=("syscall", "egress"), syscalls=tuple(names))


@pytest.mark.parametrize("mode", ["enforce", "alert"])
def test_raw_packet_and_icmp_sockets_are_stopped_and_reported_with_their_arguments(
        probe, cgroups, mode):
    """The filter's socket restriction against the kernel, and the probe's view of it: in
    enforce mode the three sockets that bypass the egress hooks fail with EPERM and are reported
    as denied; in alert mode they are created and reported at entry. Both with the arguments."""
    from enforcer.seccomp import DENY_ERRNO, build_filter, profile_for, socket_allowed
    from enforcer.violations import from_seccomp_event
    from sensor.events import SeccompDenialEvent
    compiled = profile_for(_socket_policy(), mode, target="exec")
    assert compiled.restricts_sockets()
    path, cid = cgroups["watched"]
    probe.watch(cid, mode, DENY_ERRNO, compiled.allowed(), compiled.restricts_sockets())
    reader, events = collect(probe)
    tried = _sockets()

    def body():
        import socket as so
        build_filter(compiled).load()
        out = []
        for d, t, p in tried:
            try:
                so.socket(d, t, p).close()
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        return out

    res = run_child(path, body)
    reader.poll(100)
    reader.drain()
    reader.close()
    outside = [s for s in tried if not socket_allowed(*s)]
    assert len(outside) == 3
    if mode == "enforce":
        assert res == [0 if socket_allowed(*s) else errno.EPERM for s in tried]
    else:  # the filter lets every call through; the ping socket may still fail with EACCES when
        # net.ipv4.ping_group_range excludes our group: the kernel's answer, not seccomp's
        assert res[:5] == [0] * 5 and res[5] in (0, errno.EACCES)
    reports = [ev for ev in events if isinstance(ev, SeccompDenialEvent) and ev.name == "socket"]
    # Python adds SOCK_CLOEXEC to the type: compare the type's low bits
    assert [(a[0], a[1] & 0xF, a[2]) for a in (ev.args for ev in reports)] == outside
    assert all((ev.ret == -DENY_ERRNO) == (mode == "enforce") for ev in reports)
    v = from_seccomp_event(reports[1], "default/sockets", 0.0, compiled.allowed())
    assert v.detail["socket"] == {"family": "AF_PACKET", "type": "SOCK_RAW", "protocol": "768"}
