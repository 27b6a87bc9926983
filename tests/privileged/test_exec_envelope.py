"""``envelope exec`` end to end: real processes, real cgroups, real seccomp and BPF.

Every network target is a listener of this test on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.privileged.listeners import Listener

ROOT = Path(__file__).resolve().parents[2]
ENVELOPE = [sys.executable, "-m", "envelope.cli"]
DENIED_SYSCALL = "getsid"


def all_syscalls_but(*denied: str) -> list[str]:
    import seccomp
    out = []
    for nr in range(0, 512):
        try:
            name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, nr).decode()
        except Exception:
            continue
        if name and name not in denied:
            out.append(name)
    return out


@pytest.fixture
def listeners():
    ls = {"allowed": Listener("127.0.0.1"), "other_port": Listener("127.0.0.1"),
          "v6": Listener("::1"), "udp": Listener("127.0.0.1", socket.SOCK_DGRAM)}
    yield ls
    for l in ls.values():
        l.close()


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


def write_policy(path: Path, allowed_port: int, mode: str = "enforce", watch=(), egress_extra=()):
    from enforcer.policy import EgressRule, Policy, dump_policy
    from sensor.workload import Workload
    rules = (EgressRule("tcp", "127.0.0.1/32", (allowed_port,)),) + tuple(egress_extra)
    p = Policy(workload=Workload.host("exec-test"), mode=mode, syscalls=tuple(all_syscalls_but(DENIED_SYSCALL)),
               egress=rules, watch=tuple(watch), execs=(sys.executable, "/bin/sh", "/usr/bin/sh"))
    path.write_text(dump_policy(p))
    return p


CHILD = textwrap.dedent("""
    import errno, os, socket, sys, json
    allowed, other, v6, udp = (int(x) for x in sys.argv[1:5])
    out = {}
    def attempt(name, fn):
        try:
            fn(); out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    def tcp(host, port):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try: s.connect((host, port))
        finally: s.close()
    def send(host, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try: s.sendto(b"x", (host, port))
        finally: s.close()
    attempt("connect_allowed", lambda: tcp("127.0.0.1", allowed))
    attempt("connect_other_port", lambda: tcp("127.0.0.1", other))
    attempt("connect_other_cidr", lambda: tcp("::1", v6))
    attempt("send_udp", lambda: send("127.0.0.1", udp))
    for i in range(3):
        attempt("getsid_%d" % i, lambda: os.getsid(0))
    attempt("getpid", os.getpid)
    print(json.dumps(out), flush=True)
    sys.exit(7)
""")


def run_envelope(state_dir: Path, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(ENVELOPE + ["--state-dir", str(state_dir)] + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def violations(state_dir: Path) -> list[dict]:
    r = run_envelope(state_dir, "violations", "-o", "json")
    found = json.loads(r.stdout) if r.stdout else None
    assert r.returncode == (1 if found else 0), r.stderr  # exit 1: violations are a finding
    return found


def envelope_cgroups() -> list[str]:
    """exec cgroups whose owner is gone: what an exec would leave behind (others' running execs,
    on a shared machine, own theirs)."""
    import re
    from sensor.cgroup import cgroup2_mount_point
    d = cgroup2_mount_point() / "envelope"
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and (m := re.match(r"exec-(\d+)-\d+$", p.name))
                  and not Path(f"/proc/{m.group(1)}").exists())


def test_enforce_denies_outside_and_allows_inside(tmp_path, state_dir, listeners):
    pol = tmp_path / "policy.yaml"
    write_policy(pol, listeners["allowed"].port, watch=[f"connect:tcp:127.0.0.1:{listeners['other_port'].port}"])
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    before = envelope_cgroups()
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", sys.executable, str(child),
                     str(listeners["allowed"].port), str(listeners["other_port"].port),
                     str(listeners["v6"].port), str(listeners["udp"].port))
    assert r.returncode == 7, r.stderr  # CMD's exit code passes through
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["connect_allowed"] == "ok"
    assert out["getpid"] == "ok"
    assert out["connect_other_port"] == "EPERM"
    assert out["connect_other_cidr"] == "EPERM"
    assert out["send_udp"] == "EPERM"
    assert [out[f"getsid_{i}"] for i in range(3)] == ["EPERM"] * 3

    vs = violations(state_dir)
    by = {}
    for v in vs:
        assert v["workload"] == "host/Unit/exec-test/main"
        by.setdefault((v["substrate"], v["behaviour"], v["action"]), 0)
        by[(v["substrate"], v["behaviour"], v["action"])] += v["count"]
    other, v6, udp = listeners["other_port"].port, listeners["v6"].port, listeners["udp"].port
    assert by.pop(("egress", f"connect:tcp:127.0.0.1:{other}", "denied")) == 1
    assert by.pop(("egress", f"connect:tcp:[::1]:{v6}", "denied")) == 1
    assert by.pop(("egress", f"send:udp:127.0.0.1:{udp}", "denied")) == 1
    assert by.pop(("syscall", f"syscall:{DENIED_SYSCALL}", "denied")) == 3  # once per call
    assert by.pop(("watch", f"connect:tcp:127.0.0.1:{other}", "alerted")) == 1
    assert by == {}, f"unexpected violations: {by}"
    assert envelope_cgroups() == before  # the cgroup was removed
    from enforcer import audit
    [entry] = audit.read(state_dir, action="exec.apply")
    assert entry["workload"] == "host/Unit/exec-test/main" and entry["details"]["mode"] == "enforce"
    assert audit.verify(state_dir).ok


def test_alert_mode_allows_and_reports(tmp_path, state_dir, listeners):
    pol = tmp_path / "policy.yaml"
    write_policy(pol, listeners["allowed"].port, mode="enforce")
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--mode", "alert", "--", sys.executable,
                     str(child), str(listeners["allowed"].port), str(listeners["other_port"].port),
                     str(listeners["v6"].port), str(listeners["udp"].port))
    assert r.returncode == 7, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out.values()) == {"ok"}, out  # everything allowed
    vs = violations(state_dir)
    got = {(v["substrate"], v["behaviour"]): (v["action"], v["count"]) for v in vs}
    other, v6, udp = listeners["other_port"].port, listeners["v6"].port, listeners["udp"].port
    assert got[("egress", f"connect:tcp:127.0.0.1:{other}")] == ("alerted", 1)
    assert got[("egress", f"connect:tcp:[::1]:{v6}")] == ("alerted", 1)
    assert got[("egress", f"send:udp:127.0.0.1:{udp}")] == ("alerted", 1)
    assert got[("syscall", f"syscall:{DENIED_SYSCALL}")] == ("alerted", 3)
    assert ("egress", f"connect:tcp:127.0.0.1:{listeners['allowed'].port}") not in got
    assert all(v["action"] == "alerted" for v in vs)
    # running an enforce policy in alert mode is an override, and it is audited as one
    from enforcer import audit
    [entry] = audit.read(state_dir, action="exec.override")
    assert (entry["details"]["mode"], entry["details"]["policy_mode"]) == ("alert", "enforce")


EXCEPTION_CHILD = textwrap.dedent("""
    import errno, socket, sys, time
    port = int(sys.argv[1])
    seq = []
    for i in range(3000):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port)); r = "ok"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
        if not seq or seq[-1] != r:
            seq.append(r)
            print(r, flush=True)
        if seq[-3:] == ["EPERM", "ok", "EPERM"]:
            sys.exit(0)
        time.sleep(0.02)
    sys.exit(3)
""")


def test_exception_allows_until_ttl_then_denies(tmp_path, state_dir, listeners):
    """Denied -> exception added (takes effect in the running cgroup) -> lapses -> denied."""
    from enforcer import exceptions
    pol = tmp_path / "policy.yaml"
    policy = write_policy(pol, listeners["allowed"].port)
    child = tmp_path / "child.py"
    child.write_text(EXCEPTION_CHILD)
    target = listeners["other_port"].port
    proc = subprocess.Popen(ENVELOPE + ["--state-dir", str(state_dir), "exec", "--policy", str(pol), "--",
                                        sys.executable, str(child), str(target)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        assert first == "EPERM"  # outside the policy, no exception yet
        exc = exceptions.add(state_dir, policy.workload, f"connect:tcp:127.0.0.1:{target}", 2.0,
                             reason="test: temporary access")
        second = proc.stdout.readline().strip()
        assert second == "ok"  # the exception reached the running cgroup's maps
        third = proc.stdout.readline().strip()
        assert third == "EPERM"  # and lapsed on its own
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    # the lapse happened at or after the exception's expiry, never before
    import time as _t
    assert _t.time() >= exc.expires
    vs = [v for v in violations(state_dir) if v["substrate"] == "egress"]
    assert sum(v["count"] for v in vs) >= 2  # the denials before and after the window


def test_exit_status_passthrough_and_signal(tmp_path, state_dir):
    pol = tmp_path / "policy.yaml"
    write_policy(pol, 1)
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", "/bin/sh", "-c", "exit 42")
    assert r.returncode == 42, r.stderr
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", "/bin/sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15, r.stderr


def test_malformed_policy_is_one_clear_error(tmp_path, state_dir):
    pol = tmp_path / "bad.yaml"
    pol.write_text("apiVersion: envelope.dev/v1alpha1\nkind: LeastPrivilegePolicy\nspec:\n"
                   "  workload: {namespace: host, kind: Unit, name: x, container: main}\n"
                   "  allow:\n    egress:\n      - {proto: tcp, cidr: 10.0.0.0/33, ports: [443]}\n")
    before = envelope_cgroups()
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", "/bin/true")
    assert r.returncode == 2
    assert "spec.allow.egress[0].cidr" in r.stderr
    assert "Traceback" not in r.stderr
    assert envelope_cgroups() == before


WATCH_CHILD = textwrap.dedent("""
    import socket, sys
    port = int(sys.argv[1])
    for i in range(5):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.close()
""")


def test_watch_list_and_detection_judge_allowed_behaviour(tmp_path, state_dir, listeners):
    """Allowed behaviour on the watch list recurs -> watch alert; a live per-session count above
    mean + k*std of a detection rule -> soft violation. Nothing is denied."""
    from enforcer.policy import EgressRule, Policy, dump_policy
    from sensor.workload import Workload
    port = listeners["allowed"].port
    key = f"connect:tcp:127.0.0.1:{port}"
    p = Policy(workload=Workload.host("exec-watch"), mode="enforce",
               syscalls=tuple(all_syscalls_but(DENIED_SYSCALL)),
               egress=(EgressRule("tcp", "127.0.0.1/32", (port,)),), watch=(key,), execs=(sys.executable,),
               detection=({"key": key, "mean": 1.0, "std": 0.5, "k": 2.0, "sessions": 5},))
    pol = tmp_path / "policy.yaml"
    pol.write_text(dump_policy(p))
    child = tmp_path / "child.py"
    child.write_text(WATCH_CHILD)
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", sys.executable, str(child), str(port))
    assert r.returncode == 0, r.stderr
    vs = violations(state_dir)
    got = sorted((v["substrate"], v["behaviour"], v["action"]) for v in vs)
    assert got == [("detection", key, "alerted"), ("watch", key, "alerted")], vs
    det = next(v for v in vs if v["substrate"] == "detection")
    assert det["detail"]["bound"] == "above" and det["detail"]["count"] == 3  # crossed at 3 > 1 + 2*0.5
    watch = next(v for v in vs if v["substrate"] == "watch")
    assert watch["detail"]["allowed"] is True


def test_exec_outside_policy_is_denied_by_landlock_and_reported(tmp_path, state_dir):
    """exec entries are enforced with Landlock in enforce mode: a program outside the policy's
    execs fails with EACCES and is reported as a denied exec violation with its path and
    process; the allowed interpreter runs."""
    from enforcer.policy import Policy, dump_policy
    from sensor.workload import Workload
    p = Policy(workload=Workload.host("exec-execs"), mode="enforce",
               syscalls=tuple(all_syscalls_but()), execs=(sys.executable,))
    pol = tmp_path / "policy.yaml"
    pol.write_text(dump_policy(p))
    child = ("import subprocess, sys\n"
             "try:\n    subprocess.call(['/bin/true'])\nexcept PermissionError:\n    sys.exit(13)\n")
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", sys.executable, "-c", child)
    assert r.returncode == 13, r.stderr
    vs = violations(state_dir)
    assert [(v["substrate"], v["behaviour"], v["action"]) for v in vs] == [
        ("exec", "exec:/bin/true", "denied")], vs
    d = vs[0]["detail"]
    assert d["syscall"] == "execve" and d["errno"] == "EACCES" and d["enforcer"] == "landlock"
    assert d["path"] == "/bin/true" and d["pid"] > 0


def test_alert_mode_applies_no_landlock_and_reports_what_enforce_would_deny(tmp_path, state_dir):
    """Landlock has no log-only mode: in alert mode the exec runs and is reported as alerted."""
    from enforcer.policy import Policy, dump_policy
    from sensor.workload import Workload
    p = Policy(workload=Workload.host("exec-alert"), mode="alert",
               syscalls=tuple(all_syscalls_but()), execs=(sys.executable,))
    pol = tmp_path / "policy.yaml"
    pol.write_text(dump_policy(p))
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", sys.executable, "-c",
                     "import subprocess, sys; sys.exit(subprocess.call(['/bin/true']))")
    assert r.returncode == 0, r.stderr
    assert "Landlock is not applied" in r.stderr
    vs = [v for v in violations(state_dir) if v["substrate"] == "exec"]
    assert [(v["behaviour"], v["action"], v["detail"]["enforced"]) for v in vs] == [
        ("exec:/bin/true", "alerted", False)], vs


def test_a_command_the_policy_does_not_allow_to_run_is_refused_and_recorded(tmp_path, state_dir):
    from enforcer.policy import Policy, dump_policy
    from sensor.workload import Workload
    p = Policy(workload=Workload.host("exec-refused"), mode="enforce", syscalls=tuple(all_syscalls_but()),
               execs=(sys.executable,))
    pol = tmp_path / "policy.yaml"
    pol.write_text(dump_policy(p))
    r = run_envelope(state_dir, "exec", "--policy", str(pol), "--", "/bin/true")
    assert r.returncode == 2
    assert "Landlock: /bin/true is not an allowed exec of the policy" in r.stderr.strip().splitlines()[-1]
    vs = violations(state_dir)
    assert [(v["substrate"], v["behaviour"], v["action"]) for v in vs] == [("exec", "exec:/bin/true", "denied")]
