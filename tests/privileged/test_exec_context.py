"""Denials with their context, under ``envelope exec``: a workload that never used sockets tries
to connect, or to spawn a shell; what is denied names the destination, the process and the
session. Every destination is a loopback port of this test (nothing listens on it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.privileged.listeners import free_port

ROOT = Path(__file__).resolve().parents[2]
ENVELOPE = [sys.executable, "-m", "envelope.cli"]
COMM = Path(sys.executable).name[:15]  # the kernel's name of the process: the exec'd file's name
NETWORK = ("socket", "connect", "sendto", "sendmsg", "sendmmsg", "socketpair")

ATTEMPTS = textwrap.dedent("""
    import errno, json, os, socket, subprocess, sys
    port = int(sys.argv[1])
    out = {}
    def attempt(name, fn):
        try:
            fn(); out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    def tcp():
        s = socket.socket()
        try: s.connect(("127.0.0.1", port))
        finally: s.close()
    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try: s.sendto(b"x", ("127.0.0.1", port))
        finally: s.close()
    attempt("tcp", tcp)
    attempt("udp", udp)
    attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
    attempt("shell", lambda: subprocess.run(["/bin/sh", "-c", "true"], check=True))
    attempt("ptrace", lambda: __import__("ctypes").CDLL(None, use_errno=True).ptrace(0, 0, 0, 0) == 0
            or (_ for _ in ()).throw(OSError(__import__("ctypes").get_errno(), "ptrace")))
    print(json.dumps(out), flush=True)
""")


def launch_provenance(path: str) -> dict:
    """The provenance derive writes for the command itself, exec'd once in each recorded session:
    Landlock lets the launch run it, and the filter admits no ``execve`` but the launch's own."""
    return {"entry": f"exec:{path}", "substrate": "exec", "rule": "exact", "admitted": "threshold",
            "evidence": {"behaviours": [f"exec:{path}"], "count": 3, "sessions": 3}}


def write_policy(path: Path, substrates: tuple[str, ...]) -> None:
    from enforcer.policy import Policy, dump_policy
    from sensor import syscalls
    from sensor.workload import Workload
    denied = set(NETWORK) | {"execve", "execveat", "ptrace"}
    p = Policy(workload=Workload.host(f"ctx-{os.getpid()}"), mode="enforce", substrates=substrates,
               syscalls=tuple(n for n in syscalls.NUMBERS if n not in denied), execs=(sys.executable,),
               provenance=(launch_provenance(sys.executable),))
    path.write_text(dump_policy(p))


def run(state: Path, policy: Path, script: Path, port: int) -> tuple[dict, str]:
    r = subprocess.run(ENVELOPE + ["--state-dir", str(state), "exec", "--policy", str(policy), "--",
                                   sys.executable, str(script), str(port)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def violations(state: Path) -> list[dict]:
    r = subprocess.run(ENVELOPE + ["--state-dir", str(state), "violations", "-o", "json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    found = json.loads(r.stdout) if r.stdout else None
    assert r.returncode == (1 if found else 0), r.stderr  # exit 1: violations are a finding
    return found or []


@pytest.fixture
def script(tmp_path) -> Path:
    p = tmp_path / "attempts.py"
    p.write_text(ATTEMPTS)
    return p


def test_a_workload_without_sockets_is_denied_at_the_destination_which_is_reported(tmp_path, script):
    state, policy = tmp_path / "state", tmp_path / "policy.yaml"
    write_policy(policy, ("syscall", "egress", "exec"))
    port = free_port()
    out, err = run(state, policy, script, port)
    # the TCP and UDP attempts reach the egress programs (socket is left to them) and are denied
    # there; a netlink socket, a shell and ptrace are denied by the filter
    assert out == {"tcp": "EPERM", "udp": "EPERM", "netlink": "EPERM", "shell": "EPERM", "ptrace": "EPERM"}
    assert "no behaviours in review" in err  # said before it started
    vs = violations(state)
    by = {(v["substrate"], v["behaviour"]): v for v in vs}
    tcp = by[("egress", f"connect:tcp:127.0.0.1:{port}")]
    udp = by[("egress", f"send:udp:127.0.0.1:{port}")]
    for v in (tcp, udp):
        assert v["action"] == "denied"
        assert v["detail"]["comm"] == COMM and v["detail"]["pid"] > 0
        assert v["detail"]["session"].startswith("exec-")
    sock = by[("syscall", "syscall:socket")]
    assert sock["detail"]["socket"]["family"] == "AF_NETLINK"
    assert by[("syscall", "syscall:execve")]["detail"]["comm"] == COMM  # the shell's spawn
    assert ("syscall", "syscall:ptrace") in by
    for v in vs:
        assert v["detail"].get("session", "").startswith("exec-"), v


def test_without_egress_enforcement_the_filter_denial_names_the_destination(tmp_path, script):
    state, policy = tmp_path / "state", tmp_path / "policy.yaml"
    write_policy(policy, ("syscall", "exec"))  # egress not constrained: seccomp alone decides
    port = free_port()
    out, _ = run(state, policy, script, port)
    assert out["tcp"] == "EPERM" and out["udp"] == "EPERM"
    vs = violations(state)
    # socket itself is denied first: the kernel cannot know a destination yet, so the record
    # says which socket was asked for
    socks = [v for v in vs if v["behaviour"] == "syscall:socket"]
    assert {(v["detail"]["socket"]["family"], v["detail"]["socket"]["type"]) for v in socks} >= {
        ("AF_INET", "SOCK_STREAM"), ("AF_INET", "SOCK_DGRAM"), ("AF_NETLINK", "SOCK_RAW")}


def test_a_filter_denied_connect_names_its_destination(tmp_path):
    """socket allowed, connect and sendto denied by the filter (egress not constrained): the
    destination is read from the call's own arguments."""
    from enforcer.policy import Policy, dump_policy
    from sensor import syscalls
    from sensor.workload import Workload
    state, policy = tmp_path / "state", tmp_path / "policy.yaml"
    p = Policy(workload=Workload.host(f"ctx2-{os.getpid()}"), mode="enforce", substrates=("syscall",),
               syscalls=tuple(n for n in syscalls.NUMBERS if n not in ("connect", "sendto", "sendmsg")))
    policy.write_text(dump_policy(p))
    script = tmp_path / "c.py"
    script.write_text(textwrap.dedent("""
        import socket, sys
        port = int(sys.argv[1])
        for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(fam)
            try: s.connect((addr, port))
            except OSError: pass
            s.close()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try: s.sendto(b"x", ("127.0.0.1", port + 1))
        except OSError: pass
        print("{}")
    """))
    port = free_port()
    r = subprocess.run(ENVELOPE + ["--state-dir", str(state), "exec", "--policy", str(policy), "--",
                                   sys.executable, str(script), str(port)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = {(v["behaviour"], v["detail"].get("destination")) for v in violations(state)}
    assert ("syscall:connect", f"127.0.0.1:{port}") in got
    assert ("syscall:connect", f"[::1]:{port}") in got
    assert ("syscall:sendto", f"127.0.0.1:{port + 1}") in got
