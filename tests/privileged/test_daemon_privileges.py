"""Least privilege for Envelope itself, measured on the real kernel: the daemon does its whole job
(probes attached, a cgroup profiled, a pinned policy adopted and attached to a cgroup that
appears later, a forbidden connect denied and reported, a clean exit) with exactly the
capabilities the DaemonSet gives it (daemonset/daemonset.yaml), and under its own seccomp
profile (daemonset/seccomp/), applied by ``envelope exec`` from the profile's policy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from enforcer.policy import EgressRule, Policy, dump_policy
from sensor import capabilities
from enforcer.violations import ViolationStore
from sensor.cgroup import host_unit_name
from sensor.store import ProfileStore
from sensor.workload import Workload
from tests.privileged.daemon_log import LogReader
from tests.privileged.test_hardening import cgroup, world  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
CAP_NUMBERS = capabilities.NUMBERS


def daemonset_caps() -> list[str]:
    ds = yaml.safe_load((ROOT / "daemonset" / "daemonset.yaml").read_text())
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return list(c["securityContext"]["capabilities"]["add"])


def daemon_policy() -> Path:
    return ROOT / "daemonset" / "seccomp" / "envelope-daemon.policy.yaml"


def _job(world, cgroup, prefix: list[str]) -> tuple[int, list, set, str]:
    """Run the daemon under ``prefix`` (what confines it) through its job: enforce a policy from
    the operator's CLI first (full root), start the daemon, let a cgroup of the enforced
    workload appear and connect where it may not, profile another cgroup, stop it. Returns
    (exit code, violations, the daemon's effective capabilities, its log)."""
    base, state, bpffs, cfg = world
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    w = Workload.host(host_unit_name(f"/envelope.test/priv-enf-{os.getpid()}").strip("/").replace("/", "_"))
    policy = base / "policy.yaml"
    policy.write_text(dump_policy(Policy(w, mode="enforce", substrates=("egress",),
                                         egress=(EgressRule("tcp", "127.0.0.1/32", (port,)),))))
    env = [sys.executable, "-m", "envelope.cli", "--config", str(cfg), "--state-dir", str(state)]
    r = subprocess.run(env + ["enforce", w.key, "--policy", str(policy), "--reason", "privileges test"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    observed = cgroup(f"priv-obs-{os.getpid()}.scope")
    proc = subprocess.Popen(prefix + env + ["--log-json", "daemon", "--metrics-port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = LogReader(proc.stderr)
    try:
        log.wait_for("ready")
        eff = int([x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if x.startswith("CapEff")][0].split()[1], 16)
        caps = {name for name, n in CAP_NUMBERS.items() if eff >> n & 1}
        enf = cgroup(f"priv-enf-{os.getpid()}")
        script = ("import socket, errno, time\ntime.sleep(2)\n"
                  f"socket.create_connection(('127.0.0.1', {port})).close()\n"
                  "s = socket.socket()\ntry:\n"
                  f"    s.connect(('127.0.0.1', {port - 1 if port > 1024 else port + 1}))\n"
                  "    print('forbidden: connected')\n"
                  "except OSError as e:\n    print('forbidden:', errno.errorcode[e.errno])\n")
        out = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True,
                             preexec_fn=lambda: open(f"{enf}/cgroup.procs", "w").write("0"))
        assert "forbidden: ECONNREFUSED" not in out.stdout
        assert "forbidden: EPERM" in out.stdout, out.stdout + out.stderr
        subprocess.run(["/usr/bin/python3", "-c", "import ctypes; ctypes.CDLL(None).personality(0xffffffff)"],
                       preexec_fn=lambda: open(f"{observed}/cgroup.procs", "w").write("0"), check=True)
        found = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not found:
            found = [v for v in ViolationStore(state).list(workload=w.key) if v.substrate == "egress"]
            time.sleep(0.5)
        time.sleep(1.5)  # a flush interval for the observed cgroup's profile
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(env + ["enforce", w.key, "--remove", "--reason", "done"], cwd=ROOT, capture_output=True)
        listener.close()
    obs = Workload.host(host_unit_name(str(observed)))
    profile = ProfileStore(state).load(obs)
    assert profile is not None and "syscall:personality" in profile.behaviours()
    return code, found, caps, "\n".join(log.lines)


def test_the_daemon_does_its_job_with_only_the_daemonsets_capabilities(world, cgroup):
    caps = daemonset_caps()
    assert "SYS_ADMIN" not in caps and "SYS_PTRACE" not in caps
    bounding = "-all," + ",".join("+" + c.lower() for c in caps)
    code, found, eff, log = _job(world, cgroup, ["setpriv", "--bounding-set", bounding, "--"])
    assert eff == set(caps), eff  # it ran with exactly these, no more
    assert code == 0, log[-2000:]
    assert found and found[0].action == "denied"


def test_the_daemon_does_its_job_under_its_own_seccomp_profile(world, cgroup):
    """The profile measured with Envelope itself (daemonset/seccomp/measure.py), enforced with
    Envelope itself: ``envelope exec`` loads the filter before the daemon starts (unconfined: the
    daemon mounts, attaches and moves tasks itself), so the daemon
    and its loader child run under it; a syscall it needs and the profile lacks would be denied
    (EPERM) and reported as a violation of the exec'd workload."""
    base, state, _bpffs, _cfg = world
    exec_state = base / "exec-state"
    prefix = [sys.executable, "-m", "envelope.cli", "--state-dir", str(exec_state), "exec",
              "--policy", str(daemon_policy()), "--mode", "enforce", "--no-confine", "--stop-grace", "30", "--"]
    code, found, _eff, log = _job(world, cgroup, prefix)
    assert code == 0, log[-3000:]
    assert found and found[0].action == "denied"
    denied = [v for v in ViolationStore(exec_state).list() if v.substrate == "syscall"]
    assert denied == [], [v.behaviour for v in denied]
