"""Pinned egress enforcement on real cgroups: survives SIGKILL of its loader, is adopted without
duplicate attachments, swaps policies with no allow-all window, applies all or nothing, and
coexists with an observation program at the cgroup2 root.

Every network target is a listener of this test on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.privileged.listeners import Listener

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ports():
    ls = [Listener() for _ in range(3)]
    yield [l.port for l in ls]
    for l in ls:
        l.close()


@pytest.fixture
def cgroup():
    from sensor.cgroup import CgroupFS
    fs = CgroupFS()
    rel = f"/envelope-test/egress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path, _ = fs.make(rel)
    yield path
    fs.remove(rel)
    fs.remove_empty_parents(rel + "/x", stop="/")


@pytest.fixture
def workload():
    from sensor.workload import Workload
    return Workload.host(f"egress-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def bpffs_cleanup(workload):
    from enforcer.egress import pin_dir_for
    pin = pin_dir_for("/sys/fs/bpf", workload.key)
    yield pin
    if pin.exists():  # a failed test must not leave pins behind
        from enforcer.egress import EgressProgram
        try:
            EgressProgram.adopt(pin).remove()
        except Exception:
            for p in pin.iterdir():
                p.unlink()
            pin.rmdir()


def policy_for(workload, ports_allowed, mode="enforce", extra_cidrs=0):
    from enforcer.policy import EgressRule, Policy
    rules = [EgressRule("tcp", "127.0.0.1/32", tuple(ports_allowed))]
    for i in range(extra_cidrs):  # documentation ranges only; nothing connects there
        rules.append(EgressRule("tcp", f"198.18.{i // 256}.{i % 256}/32", (443,)))
    return Policy(workload=workload, mode=mode, egress=tuple(rules))


def connect_in(cgroup_path: Path, port: int, host="127.0.0.1") -> int:
    """connect() from a child process inside ``cgroup_path``; returns 0 or the errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            with open(cgroup_path / "cgroup.procs", "w") as f:
                f.write("0")
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            try:
                s.connect((host, port))
            except OSError as e:
                code = e.errno
            os.write(w, struct.pack("=i", code))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4)
    os.close(r)
    os.waitpid(pid, 0)
    return struct.unpack("=i", data)[0]


LOADER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from enforcer.session import EnforcementSession
    from enforcer.policy import load_policy
    e = EnforcementSession({state!r}, bpffs="/sys/fs/bpf")
    e.apply(load_policy({policy!r}), "enforce", [{cgroup!r}], reason="test loader")
    print("ready", flush=True)
    time.sleep(600)
""")


def test_sigkill_of_loader_keeps_enforcement_and_restart_adopts(tmp_path, cgroup, workload, ports,
                                                               bpffs_cleanup):
    from enforcer.session import EnforcementSession
    from enforcer.egress import PROGRAMS
    from sensor import kernel
    from sensor.kernel import RingReader as RingBufferReader
    from enforcer.policy import dump_policy
    from sensor.events import decode
    allowed, forbidden, _ = ports
    state = tmp_path / "state"
    pol = tmp_path / "p.yaml"
    pol.write_text(dump_policy(policy_for(workload, [allowed])))
    script = tmp_path / "loader.py"
    script.write_text(LOADER.format(root=str(ROOT), state=str(state), policy=str(pol), cgroup=str(cgroup)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in proc.stdout:  # log lines may come first
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", lines
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    # The loader is gone: the pinned, attached programs keep enforcing.
    assert bpffs_cleanup.is_dir()
    assert connect_in(cgroup, allowed) == 0
    assert connect_in(cgroup, forbidden) == errno.EPERM

    # A restarted process adopts the pinned set; it does not attach a second copy.
    e = EnforcementSession(state, bpffs="/sys/fs/bpf")
    try:
        assert e.adopt_pinned() == [workload.key]
        prog = e.enforced[workload.key].program
        assert prog.applied().mode == "enforce"
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, t in PROGRAMS.items():
                assert kernel.prog_query(fd, t) == [prog.prog_ids[name]]
        finally:
            os.close(fd)
        assert e.attach_new_cgroup(workload, cgroup).attached is False  # already there
        # The violation made while no loader ran waits in the pinned ring buffer.
        seen = []
        reader = RingBufferReader()
        reader.add(prog.maps["events"].fd, lambda raw: seen.append(decode(raw)))
        reader.poll(100)
        reader.drain()
        reader.close()
        assert [(ev.port, ev.action, ev.behaviour_key()) for ev in seen] == [
            (forbidden, "denied", f"connect:tcp:127.0.0.1:{forbidden}")]
        assert os.stat(cgroup).st_ino in {ev.cgroup_id for ev in seen}
        # Remove: detached, unpinned, and the connect goes through again.
        assert e.remove(workload, reason="test done")
    finally:
        e.close()
    assert not bpffs_cleanup.exists()
    assert connect_in(cgroup, forbidden) == 0


SWAP_CHILD = textwrap.dedent("""
    import errno, socket, sys, os
    allowed, forbidden, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    with open(sys.argv[4], "w") as f:
        f.write("0")
    print("joined", flush=True)
    bad_ok = good_fail = n = 0
    stop = sys.argv[5]
    while not os.path.exists(stop) and n < rounds:
        for port, want_ok in ((forbidden, False), (allowed, True)):
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", port)); ok = True
            except OSError as e:
                ok = False
                assert e.errno == errno.EPERM, e
            finally:
                s.close()
            if ok and not want_ok: bad_ok += 1
            if want_ok and not ok: good_fail += 1
        n += 1
    print(f"n={n} bad_ok={bad_ok} good_fail={good_fail}", flush=True)
""")


def test_policy_swap_has_no_allow_all_window(tmp_path, cgroup, workload, ports, bpffs_cleanup):
    from enforcer.session import EnforcementSession
    allowed, forbidden, third = ports
    e = EnforcementSession(tmp_path / "state", bpffs="/sys/fs/bpf")
    a = policy_for(workload, [allowed])
    b = policy_for(workload, [allowed, third], extra_cidrs=300)  # a different, bigger rule set
    stop = tmp_path / "stop"
    child = tmp_path / "child.py"
    child.write_text(SWAP_CHILD)
    try:
        e.apply(a, "enforce", [cgroup])
        proc = subprocess.Popen([sys.executable, str(child), str(allowed), str(forbidden), "200000",
                                 str(cgroup / "cgroup.procs"), str(stop)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "joined"
        swaps = 0
        for i in range(30):
            e.apply(b if i % 2 == 0 else a, "enforce", [cgroup], reason="swap test")
            swaps += 1
        stop.write_text("")
        out = proc.stdout.readline().strip()
        proc.wait(timeout=60)
        proc.stdout.close()
        stats = dict(kv.split("=") for kv in out.split())
        assert int(stats["n"]) > 0
        assert stats["bad_ok"] == "0", out  # a forbidden connect never succeeded during swaps
        assert stats["good_fail"] == "0", out  # and an allowed one was never refused
        assert swaps == 30
        prog = e.enforced[workload.key].program
        gen, mode = prog.state()
        assert mode == "enforce"
        assert prog.rule_count(1 - gen) == 0  # the old generation was cleared
        assert prog.rule_count(gen) == 1  # policy a: one entry
    finally:
        e.remove(workload, reason="test done")
        e.close()


def test_apply_is_all_or_nothing(tmp_path, cgroup, workload, ports, bpffs_cleanup):
    from enforcer.session import ApplyError, EnforcementSession
    from enforcer.policy import policy_hash
    allowed, forbidden, third = ports
    e = EnforcementSession(tmp_path / "state", bpffs="/sys/fs/bpf")
    not_a_cgroup = tmp_path / "plain-dir"
    not_a_cgroup.mkdir()
    try:
        # A fresh apply whose second target cannot take the programs: nothing stays behind.
        with pytest.raises(ApplyError) as err:
            e.apply(policy_for(workload, [allowed]), "enforce", [cgroup, not_a_cgroup])
        assert str(not_a_cgroup) in str(err.value)
        assert not bpffs_cleanup.exists()
        assert connect_in(cgroup, forbidden) == 0  # not left attached

        # An update that fails keeps the previous policy in force.
        a = policy_for(workload, [allowed])
        e.apply(a, "enforce", [cgroup])
        assert connect_in(cgroup, third) == errno.EPERM
        with pytest.raises(ApplyError):
            e.apply(policy_for(workload, [allowed, third]), "enforce", [cgroup, not_a_cgroup])
        assert connect_in(cgroup, third) == errno.EPERM
        assert connect_in(cgroup, allowed) == 0
        assert e.enforced[workload.key].program.applied().policy_hash == policy_hash(a).hex()

        # A policy beyond the map capacity is refused before anything changes.
        with pytest.raises(ApplyError, match="exceed the map capacity.*nothing applied"):
            e.apply(policy_for(workload, [allowed], extra_cidrs=40000), "enforce", [cgroup])
        assert connect_in(cgroup, third) == errno.EPERM
        assert connect_in(cgroup, allowed) == 0
    finally:
        e.remove(workload, reason="test done")
        e.close()


OBSERVER = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(seen, u64, 1);
int observe4(struct bpf_sock_addr *ctx) {
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n) __sync_fetch_and_add(n, 1);
    return 1;
}
"""


def test_coexists_with_observation_program_at_cgroup2_root(tmp_path, cgroup, workload, ports, bpffs_cleanup):
    """The sensor attaches its own sock_addr programs at the cgroup2 root (BPF_F_ALLOW_MULTI);
    both run: the observer sees the connect that the enforcement denies."""
    from bcc import BPF
    from enforcer.session import EnforcementSession
    from sensor.kernel import BPF_CGROUP_INET4_CONNECT, BPF_F_ALLOW_MULTI, prog_attach, prog_detach
    from sensor.cgroup import cgroup2_mount_point
    allowed, forbidden, _ = ports
    b = BPF(text=OBSERVER.encode())
    fn = b.load_func(b"observe4", BPF.CGROUP_SOCK_ADDR, attach_type=BPF_CGROUP_INET4_CONNECT)
    root_fd = os.open(cgroup2_mount_point(), os.O_RDONLY | os.O_DIRECTORY)
    e = EnforcementSession(tmp_path / "state", bpffs="/sys/fs/bpf")
    try:
        prog_attach(fn.fd, root_fd, BPF_CGROUP_INET4_CONNECT, BPF_F_ALLOW_MULTI)
        try:
            e.apply(policy_for(workload, [allowed]), "enforce", [cgroup])
            seen0 = b[b"seen"][0].value
            assert connect_in(cgroup, forbidden) == errno.EPERM
            assert connect_in(cgroup, allowed) == 0
            assert b[b"seen"][0].value - seen0 >= 2  # the root observer ran for both
        finally:
            prog_detach(fn.fd, root_fd, BPF_CGROUP_INET4_CONNECT)
    finally:
        os.close(root_fd)
        e.remove(workload, reason="test done")
        e.close()
        b.cleanup()


def test_mode_change_needs_no_reload(tmp_path, cgroup, workload, ports, bpffs_cleanup):
    from enforcer.session import EnforcementSession
    from enforcer import state as st
    allowed, forbidden, _ = ports
    e = EnforcementSession(tmp_path / "state", bpffs="/sys/fs/bpf")
    try:
        e.apply(policy_for(workload, [allowed]), "enforce", [cgroup])
        prog = e.enforced[workload.key].program
        ids = dict(prog.prog_ids)
        assert connect_in(cgroup, forbidden) == errno.EPERM
        st.set_mode(tmp_path / "state", workload, "alert", reason="test: alert only")
        assert e.sync() == [workload.key]
        assert connect_in(cgroup, forbidden) == 0  # alert mode allows
        assert prog.prog_ids == ids and prog.state()[1] == "alert"
    finally:
        e.remove(workload, reason="test done")
        e.close()


def test_enforcer_reports_egress_violations_and_seccomp_denials(tmp_path, cgroup, workload, ports,
                                                                 bpffs_cleanup):
    """The daemon seam: violations come out of the pinned ring buffers and the denial probe,
    attributed to the workload, for a process under the filter compiled from the same policy."""
    import seccomp as _sc
    from enforcer.session import EnforcementSession
    from enforcer.policy import EgressRule, Policy
    from enforcer.seccomp import build_filter, compile_oci
    allowed, forbidden, _ = ports
    names = []
    for nr in range(512):
        try:
            n = _sc.resolve_syscall(_sc.Arch.NATIVE, nr).decode()
        except Exception:
            continue
        if n and n != "getsid":
            names.append(n)
    policy = Policy(workload=workload, mode="enforce", syscalls=tuple(names),
                    egress=(EgressRule("tcp", "127.0.0.1/32", (allowed,)),))
    flt = build_filter(compile_oci(policy, "enforce"))
    e = EnforcementSession(tmp_path / "state", bpffs="/sys/fs/bpf", denials=True)
    try:
        e.apply(policy, "enforce", [cgroup])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                with open(cgroup / "cgroup.procs", "w") as f:
                    f.write("0")
                flt.load()
                res = []
                for _ in range(2):
                    try:
                        os.getsid(0)
                        res.append(0)
                    except OSError as err:
                        res.append(err.errno)
                s = socket.socket()
                try:
                    s.connect(("127.0.0.1", forbidden))
                    res.append(0)
                except OSError as err:
                    res.append(err.errno)
                os.write(w, struct.pack("=3i", *res))
            finally:
                os._exit(0)
        os.close(w)
        res = struct.unpack("=3i", os.read(r, 12))
        os.close(r)
        os.waitpid(pid, 0)
        assert res == (errno.EPERM, errno.EPERM, errno.EPERM)
        got = {}
        for _ in range(20):  # poll until both records are in (bounded)
            for v in e.poll_violations(50):
                got[(v.substrate, v.behaviour, v.action, v.workload)] = \
                    got.get((v.substrate, v.behaviour, v.action, v.workload), 0) + v.count
            if len(got) >= 2:
                break
        assert got == {("syscall", "syscall:getsid", "denied", workload.key): 2,
                       ("egress", f"connect:tcp:127.0.0.1:{forbidden}", "denied", workload.key): 1}
        assert all(n == 0 for n in e.lost().values())
    finally:
        e.remove(workload, reason="test done")
        e.close()


def test_envelope_enforce_cli_applies_pins_and_removes(tmp_path, cgroup, workload, ports, bpffs_cleanup):
    import json as _json
    from enforcer import audit
    from enforcer.policy import dump_policy
    from sensor.cgroup import cgroup2_mount_point
    allowed, forbidden, _ = ports
    state = tmp_path / "state"
    pol = tmp_path / "p.yaml"
    pol.write_text(dump_policy(policy_for(workload, [allowed])))
    rel = "/" + str(cgroup.relative_to(cgroup2_mount_point()))
    cli = [sys.executable, "-m", "envelope.cli", "--state-dir", str(state)]

    bad = tmp_path / "bad.yaml"
    bad.write_text(pol.read_text().replace("127.0.0.1/32", "127.0.0.1/40"))
    r = subprocess.run(cli + ["enforce", workload.name, "--policy", str(bad), "--cgroup", rel],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "cidr" in r.stderr and "Traceback" not in r.stderr
    assert not bpffs_cleanup.exists()  # nothing applied

    r = subprocess.run(cli + ["enforce", workload.name, "--policy", str(pol), "--cgroup", rel, "-o", "json"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = _json.loads(r.stdout)
    assert out["cgroups"] == [{"cgroup": str(cgroup), "ok": True, "attached": True, "error": ""}]
    assert bpffs_cleanup.is_dir()  # pinned; the CLI process has exited
    assert connect_in(cgroup, forbidden) == errno.EPERM
    assert connect_in(cgroup, allowed) == 0
    desired = state / "enforce"
    assert any(p.suffix == ".yaml" for p in desired.iterdir())

    r = subprocess.run(cli + ["enforce", workload.key, "--remove", "--reason", "test done"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not bpffs_cleanup.exists()
    assert connect_in(cgroup, forbidden) == 0
    actions = [e["action"] for e in audit.read(state)]
    assert "policy.apply" in actions and "policy.remove" in actions
    assert audit.verify(state).ok
