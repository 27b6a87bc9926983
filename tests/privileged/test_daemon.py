"""``envelope daemon``: ready line, node-wide attribution by cgroup, flush on SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sensor.cgroup import CgroupFS, host_unit_name
from sensor.store import ProfileStore
from tests.privileged.daemon_log import LogReader

ROOT = Path(__file__).resolve().parents[2]


def test_daemon_profiles_a_cgroup_and_flushes_on_sigterm(tmp_path):
    cgfs = CgroupFS()
    rel = f"/envelope.test/daemon-{os.getpid()}"
    path, cid = cgfs.make(rel)
    proc = subprocess.Popen(
        [sys.executable, "-m", "envelope.cli", "--state-dir", str(tmp_path), "--log-json",
         "daemon", "--metrics-port", "0", "--flush-interval", "3600"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        LogReader(proc.stderr).wait_for("ready")
        script = ("import ctypes\nl=ctypes.CDLL(None)\n"
                  "for _ in range(9): l.personality(0xffffffff)\n")
        w = subprocess.Popen(["/usr/bin/python3", "-c", script],
                             preexec_fn=lambda: open(f"{path}/cgroup.procs", "w").write("0"))
        assert w.wait() == 0
        time.sleep(2.5)  # let at least one counter read pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cgfs.remove(rel)
        cgfs.remove_empty_parents(rel)
    store = ProfileStore(tmp_path)
    matches = [w for w in store.workloads() if w.name == host_unit_name(rel).strip("/").replace("/", "_")]
    assert matches, [w.key for w in store.workloads()]
    b = store.load(matches[0]).behaviours()
    assert b["syscall:personality"].count == 9
    assert b["exec:/usr/bin/python3"].count == 1


def test_daemon_enforces_a_future_cgroup_and_reports_violations(tmp_path):
    """`envelope enforce` records the desired state; the running daemon attaches the pinned egress
    programs to a cgroup of that workload that appears later, drains its violations, and judges
    the policy's watch list on what the sensor sees."""
    import socket
    import subprocess as sp

    from enforcer.policy import EgressRule, Policy, dump_policy
    from enforcer.violations import ViolationStore
    from sensor.workload import Workload

    cgfs = CgroupFS()
    rel = f"/envelope.test/daemon-enf-{os.getpid()}"
    workload = Workload.host(host_unit_name(rel).strip("/").replace("/", "_"))
    allowed = socket.socket()
    allowed.bind(("127.0.0.1", 0))
    allowed.listen(8)
    port = allowed.getsockname()[1]
    policy = Policy(workload, mode="enforce", substrates=("egress", "exec"),
                    egress=(EgressRule("tcp", "127.0.0.1/32", (port,)),),
                    execs=("/usr/bin/python3",), watch=("exec:/bin/true",))
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(dump_policy(policy, "yaml"))
    state = tmp_path / "state"
    env = [sys.executable, "-m", "envelope.cli", "--state-dir", str(state)]
    r = sp.run(env + ["enforce", workload.key, "--policy", str(policy_file), "--reason", "test"],
               cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(env + ["--log-json", "daemon", "--metrics-port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        LogReader(proc.stderr).wait_for("ready")
        path, _ = cgfs.make(rel)  # the workload's cgroup appears after the daemon started
        script = (
            "import socket, subprocess, errno, time\n"
            "time.sleep(2)\n"  # the daemon binds the cgroup at its first syscall; give it a moment
            f"socket.create_connection(('127.0.0.1', {port})).close()\n"
            "s = socket.socket()\n"
            "try:\n"
            f"    s.connect(('127.0.0.1', {port + 1 if port < 65535 else port - 1}))\n"
            "    print('forbidden: connected')\n"
            "except OSError as e:\n"
            "    print('forbidden:', errno.errorcode[e.errno])\n"
            "subprocess.run(['/bin/true'])\n")
        w = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True,
                           preexec_fn=lambda: open(f"{path}/cgroup.procs", "w").write("0"))
        assert w.returncode == 0, w.stderr
        assert "forbidden: EPERM" in w.stdout
        deadline = time.monotonic() + 30
        found = []
        while time.monotonic() < deadline:
            found = ViolationStore(state).list(workload=workload.key)
            if {v.substrate for v in found} >= {"egress", "watch", "exec"}:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sp.run(env + ["enforce", workload.key, "--remove", "--reason", "test done"], cwd=ROOT,
               capture_output=True)
        cgfs.remove(rel)
        cgfs.remove_empty_parents(rel)
        allowed.close()
    by_sub = {v.substrate: v for v in found}
    assert by_sub["egress"].action == "denied"
    assert by_sub["egress"].behaviour.startswith("connect:tcp:127.0.0.1:")
    assert by_sub["watch"].behaviour == "exec:/bin/true" and by_sub["watch"].action == "alerted"
    # exec is observed and reported, not enforced: /bin/true is outside the policy's execs
    assert by_sub["exec"].behaviour == "exec:/bin/true" and by_sub["exec"].action == "alerted"


def test_an_enforcing_daemon_maps_no_compiler(tmp_path):
    """Every program family compiles in the short-lived loader child: while the daemon enforces
    syscall and egress policies on two workloads (denial probe loaded, egress programs attached),
    its memory maps hold no libbcc, LLVM or clang."""
    from enforcer.policy import EgressRule, Policy, dump_policy
    from sensor.workload import Workload

    cgfs = CgroupFS()
    state = tmp_path / "state"
    env = [sys.executable, "-m", "envelope.cli", "--state-dir", str(state)]
    rels, workloads = [], []
    for i in range(2):
        rel = f"/envelope.test/daemon-maps-{os.getpid()}-{i}"
        w = Workload.host(host_unit_name(rel).strip("/").replace("/", "_"))
        p = Policy(w, mode="enforce", substrates=("syscall", "egress"),
                   syscalls=tuple(sorted({"read", "write", "exit_group", "brk", "mmap", "close"})),
                   egress=(EgressRule("tcp", "127.0.0.1/32", (9,)),))
        f = tmp_path / f"policy-{i}.yaml"
        f.write_text(dump_policy(p, "yaml"))
        r = subprocess.run(env + ["enforce", w.key, "--policy", str(f), "--reason", "test"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rels.append(rel)
        workloads.append(w)
    proc = subprocess.Popen(env + ["--log-json", "daemon", "--metrics-port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    sleepers = []
    try:
        log = LogReader(proc.stderr)
        log.wait_for("ready")
        for rel in rels:
            path, _ = cgfs.make(rel)
            sleepers.append(subprocess.Popen(
                ["/bin/sleep", "30"], preexec_fn=lambda p=path: open(f"{p}/cgroup.procs", "w").write("0")))
        log.wait_for("seccomp denial probe loaded", timeout=60)
        for w in workloads:
            log.wait_until(lambda line, k=w.key: "egress programs attached" in line and k in line,
                           60, f"egress programs attached to {w.key}")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        loaded = sorted({line.split()[-1] for line in maps.splitlines()
                         if len(line.split()) >= 6 and line.split()[-1].startswith("/")})
        compiler = [m for m in loaded if any(k in m for k in ("libbcc", "LLVM", "libclang"))]
        assert compiler == [], compiler
        assert any("libc.so" in m for m in loaded)  # the maps were read for real
    finally:
        for s in sleepers:
            s.kill()
            s.wait()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for w in workloads:
            subprocess.run(env + ["enforce", w.key, "--remove", "--reason", "test done"], cwd=ROOT,
                           capture_output=True)
        for rel in rels:
            cgfs.remove(rel)
        cgfs.remove_empty_parents(rels[0])
