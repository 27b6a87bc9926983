"""Measure the node daemon's syscalls with Envelope itself and write its seccomp profile.

Run as root from the repository root (after ``make setup``)::

    .venv/bin/python scripts/measure_daemon_seccomp.py [--sessions 3] [--seconds 20]

Each session is one ``envelope record --workload envelope-daemon -- envelope daemon``: the
daemon, its loader child (BCC's compile of every program family) and anything else it starts are
one recorded cgroup tree. While it runs, the daemon is taken through its job against the fake
Kubernetes API server of tests/fakes (pods watched, WorkloadProfile objects published, a
LeastPrivilegePolicy applied with its seccomp file written and its status reported, then deleted
(its pins removed), audit heads anchored), with a policy enforced from the CLI on a cgroup that
appears later (pinned programs adopted and attached, a forbidden connect denied and reported, a
corrupt profile quarantined), an exception, a mode change and a re-baseline followed, metrics and
health scraped, and a clean shutdown on SIGTERM (final flush and publish).

Then ``envelope derive`` (syscalls only, every syscall seen admitted: ``--min-count 1
--min-sessions 1``, structural closure with its companion groups) writes
``daemonset/seccomp/envelope-daemon.policy.yaml``, and ``envelope compile --format oci-seccomp``
(with runc's runtime-completeness syscalls) writes ``daemonset/seccomp/envelope-daemon.json``,
the profile the DaemonSet's init container installs for the kubelet. Review the diff like code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.apiserver import FakeApiServer  # noqa: E402

OUT = ROOT / "daemonset" / "seccomp"
NODE = "measure-node"


def envelope(cfg: Path, state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "envelope.cli", "--config", str(cfg), "--state-dir", str(state),
                        *args], cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"envelope {' '.join(args)}: {r.stderr.strip()}")
    return r


def in_cgroup(path: Path):
    return lambda: open(path / "cgroup.procs", "w").write("0")


def session(n: int, seconds: float, work: Path, kube: FakeApiServer) -> None:
    from enforcer.leastprivilegepolicy import policy_to_cr
    from enforcer.policy import EgressRule, Policy, dump_policy
    from sensor.cgroup import CgroupFS
    from sensor.workload import Workload

    state = work / "state"  # the recording's state: where the profile of the daemon goes
    dstate = work / f"daemon-state-{n}"  # the recorded daemon's own state
    cfg = work / "daemon.yaml"
    cgfs = CgroupFS()
    rel = f"/envelope.measure/{os.getpid()}-{n}"
    w = Workload.host(rel.strip("/").replace("/", "_"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    policy = work / "policy.yaml"
    policy.write_text(dump_policy(Policy(w, mode="enforce", substrates=("egress",),
                                         egress=(EgressRule("tcp", "127.0.0.1/32", (port,)),))))
    envelope(cfg, dstate, "enforce", w.key, "--policy", str(policy), "--reason", "measure")
    pod_w = Workload("agents", "Deployment", "measured", "main")
    cr = policy_to_cr(Policy(pod_w, mode="alert", substrates=("syscall", "egress"),
                             syscalls=("read", "write"), egress=(EgressRule("tcp", "10.0.0.0/8", (443,)),)))
    kube.put(dict(cr, metadata=dict(cr["metadata"], name=f"measured-{n}")))
    # a profile the daemon cannot read, for it to quarantine when it binds the workload's cgroup
    from sensor.store import ProfileStore
    bad = ProfileStore(dstate).path_for(w)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"ENVPROF\x01" + os.urandom(64))
    os.chmod(bad, 0o600)
    rec = subprocess.Popen(
        [sys.executable, "-m", "envelope.cli", "--state-dir", str(state), "record", "--workload", "envelope-daemon",
         "--session", f"measure-{n}", "-q", "--",
         sys.executable, "-m", "envelope.cli", "--config", str(cfg), "--state-dir", str(dstate), "--log-json",
         "daemon", "--metrics-port", "0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # the daemon logs on: keep its pipe from filling
        for line in rec.stderr:
            lines.append(line)
            if '"ready"' in line:
                ready.set()
    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(180):
        rec.kill()
        raise SystemExit("the daemon did not start:\n" + "".join(lines[-20:]))
    port_line = json.loads(next(x for x in lines if "metrics endpoint listening" in x))
    try:
        path, _ = cgfs.make(rel)
        script = ("import socket, time\ntime.sleep(1)\n"
                  f"socket.create_connection(('127.0.0.1', {port})).close()\n"
                  "s = socket.socket()\ntry:\n"
                  f"    s.connect(('127.0.0.1', {port - 1}))\nexcept OSError:\n    pass\n")
        subprocess.run(["/usr/bin/python3", "-c", script], preexec_fn=in_cgroup(path), check=False)
        envelope(cfg, dstate, "exception", "add", w.key, "--allow", f"connect:tcp:127.0.0.1:{port - 1}",
                 "--ttl", "1h", "--reason", "measure")
        envelope(cfg, dstate, "mode", w.key, "alert", "--reason", "measure")
        envelope(cfg, dstate, "rebaseline", w.key, "--reason", "measure")
        end = time.monotonic() + seconds
        deleted = False
        while time.monotonic() < end:
            if not deleted and time.monotonic() > end - seconds / 2:  # the cluster policy goes
                kube.delete("envelope.dev", "leastprivilegepolicies", "agents", f"measured-{n}")
                deleted = True
            for what in ("metrics", "healthz", "readyz"):
                urllib.request.urlopen(f"http://127.0.0.1:{port_line['port']}/{what}", timeout=5).read()
            subprocess.run(["/usr/bin/python3", "-c", "import os; os.getppid()"], preexec_fn=in_cgroup(path))
            time.sleep(1)
        rec.send_signal(signal.SIGTERM)  # record passes it on: the daemon's clean shutdown
        if rec.wait(timeout=120) != 0:
            raise SystemExit(f"the daemon exited with {rec.returncode}:\n" + "".join(lines[-20:]))
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
        envelope(cfg, dstate, "enforce", w.key, "--remove", "--reason", "measure done", check=False)
        cgfs.remove(rel)
        cgfs.remove_empty_parents(rel)
        listener.close()
    print(f"session {n}: recorded", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    work = Path(tempfile.mkdtemp(prefix="envelope-measure-"))
    bpffs = work / "bpf"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        with FakeApiServer() as kube:
            kubeconfig = kube.kubeconfig(work / "kubeconfig")
            (work / "daemon.yaml").write_text(
                f"bpffs: {bpffs}\ncluster: 'on'\nkubeconfig: {kubeconfig}\nnode_name: {NODE}\n"
                f"profile_namespace: envelope-system\nhost_root: /\nkubelet_seccomp_dir: {work / 'kubelet'}\n"
                f"flush_interval: 2.0\npolicy_sync_interval: 2.0\n")
            for n in range(args.sessions):
                session(n, args.seconds, work, kube)
        state = work / "state"
        policy = OUT / "envelope-daemon.policy.yaml"
        OUT.mkdir(exist_ok=True)
        envelope(work / "daemon.yaml", state, "derive", "host/Unit/envelope-daemon/main", "--substrates", "syscall",
                 "--min-count", "1", "--min-sessions", "1", "--force", "--out", str(policy))
        text = policy.read_text().replace("name: envelope-daemon-main", "name: envelope-daemon")
        policy.write_text(text)
        envelope(work / "daemon.yaml", state, "compile", str(policy), "--format", "oci-seccomp", "--mode", "enforce",
                 "--runtime", "runc", "--out", str(OUT / "envelope-daemon.json"))
        n = len(json.loads((OUT / "envelope-daemon.json").read_text())["syscalls"])
        print(f"wrote {policy.relative_to(ROOT)} and daemonset/seccomp/envelope-daemon.json ({n} rules)",
              file=sys.stderr)
    finally:
        subprocess.run(["umount", str(bpffs)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
