"""``make demo``: Envelope's main job, end to end, on the built-in demo agent.

1. record several sessions of the agent doing varied tasks (real BPF, real cgroups);
2. show the profile;
3. derive a policy through the four decisions, and explain it;
4. enforce it: a legitimate variation passes, a malicious one has its out-of-envelope connect
   and syscall denied, and both denials are reported as violations;
5. verify the audit log.

Every step is a real ``envelope`` command, printed before it runs. The local services the agent
talks to (model API, tool API, resolver, and an "exfiltration" listener) run on loopback only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from . import demo_agent

AGENT = Path(demo_agent.__file__).resolve()
PYTHON = "/usr/bin/python3"
WORKLOAD = "demo-agent"
SESSIONS = 6


class DemoServices:
    """Loopback TCP and UDP responders standing in for the agent's model and tool APIs."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()

    def _tcp(self, addr: str, port: int, reply: bytes) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        s.settimeout(0.2)
        self.sockets.append(s)

        def serve():
            while not self.stopping.is_set():
                try:
                    c, _ = s.accept()
                except (socket.timeout, OSError):
                    continue
                with c:
                    c.settimeout(2)
                    try:
                        c.recv(256)
                        c.sendall(reply)
                    except OSError:
                        pass
        self.threads.append(threading.Thread(target=serve, daemon=True))

    def _udp(self, port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        s.settimeout(0.2)
        self.sockets.append(s)

        def serve():
            while not self.stopping.is_set():
                try:
                    _, peer = s.recvfrom(256)
                    s.sendto(b"127.0.0.1", peer)
                except (socket.timeout, OSError):
                    continue
        self.threads.append(threading.Thread(target=serve, daemon=True))

    def __enter__(self):
        self._tcp("127.0.0.1", demo_agent.MODEL_PORT, b"use tools ls, cat, date")
        self._tcp("127.0.0.1", demo_agent.TOOL_PORT, b"ok")
        self._tcp(*demo_agent.EXFIL, b"thanks")
        self._udp(demo_agent.DNS_PORT)
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=2)
        for s in self.sockets:
            s.close()


class Demo:
    def __init__(self, state_dir: Path):
        self.state = state_dir
        self.envelope = [sys.executable, "-m", "envelope.cli", "--state-dir", str(state_dir)]

    def run(self, *args: str, check: bool = True, expect: int | None = None) -> int:
        shown = " ".join(shlex.quote(a) for a in args)
        print(f"\n$ envelope {shown}", flush=True)
        rc = subprocess.run(self.envelope + list(args)).returncode
        if expect is not None and rc != expect:
            raise SystemExit(f"demo: `envelope {shown}` exited {rc}, expected {expect}")
        if check and expect is None and rc != 0:
            raise SystemExit(f"demo: `envelope {shown}` failed with exit {rc}")
        return rc

    @staticmethod
    def banner(text: str) -> None:
        print(f"\n==== {text} ====", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (make demo): the sensor needs BPF and cgroups", file=sys.stderr)
        return 2
    state = Path(os.environ.get("ENVELOPE_DEMO_STATE", "/tmp/envelope-demo"))
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    policy = state / "policy.yaml"
    d = Demo(state)
    with DemoServices():
        d.banner("0. can this host run Envelope?")
        d.run("doctor")

        d.banner(f"1. observe: record {SESSIONS} sessions of the demo agent doing varied tasks")
        for task in range(SESSIONS):
            d.run("record", "--workload", WORKLOAD, "--fingerprint", "model=demo-model-v1",
                  "--fingerprint", "prompt_template=sha256:5e1f0c", "--", PYTHON, str(AGENT),
                  "--task", str(task))

        d.banner("2. aggregate: the workload's frequency profile")
        d.run("profile", "show", WORKLOAD)

        d.banner("3. derive: granularity, closure, confidence, validity")
        print("The demo's observation window is seconds long, so coverage-stop refuses first:")
        d.run("derive", WORKLOAD, "--out", str(policy), check=False)
        print("\nForcing it records the policy as low-confidence (alert mode by default):")
        d.run("derive", WORKLOAD, "--force", "--out", str(policy))
        d.run("explain", str(policy))

        d.banner("4. enforce: a legitimate variation of the agent's work passes")
        d.run("exec", "--policy", str(policy), "--mode", "enforce", "--",
              PYTHON, str(AGENT), "--task", str(SESSIONS + 1), expect=0)

        d.banner("5. enforce: a prompt-injected variation is denied and reported")
        d.run("exec", "--policy", str(policy), "--mode", "enforce", "--",
              PYTHON, str(AGENT), "--task", "2", "--malicious", check=False)
        d.run("violations", "--workload", WORKLOAD, expect=1)  # exit 1: there are findings

        d.banner("6. every override and apply is in the tamper-evident audit log")
        d.run("audit", "show")
        d.run("audit", "verify")
    print(f"\ndemo: done; state is in {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
