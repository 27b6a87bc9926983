"""``make demo``: Envelope's main job, end to end, on the built-in demo agent.

1. record several sessions of the agent doing varied tasks (real BPF, real cgroups), its MCP
   tool calls (mcp-server-git on a repository the demo makes) through ``envelope mcp wrap``;
2. show the profile;
3. derive a policy through the four decisions, MCP included, and explain it;
4. enforce it (the kernel side with ``envelope exec``: seccomp, egress and Landlock; the MCP
   gateway by the workload's mode): a legitimate variation passes, a malicious one has its
   out-of-envelope connect, syscall, shell and credentials read denied and its MCP call on
   another repository refused in-band, and every denial is reported as a violation;
5. verify the audit log.

Every step is a real ``envelope`` command, printed before it runs. The local services the agent
talks to (model API, tool API, resolver, and an "exfiltration" listener) run on loopback only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import demo_agent

AGENT = Path(demo_agent.__file__).resolve()
PYTHON = "/usr/bin/python3"
WORKLOAD = "demo-agent"
SESSIONS = 6
SUBSTRATES = "syscall,egress,exec,file,mcp"


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


def make_repo(path: Path, files: dict[str, str]) -> Path:
    """A git repository with one commit per file (what the agent's git tools work on)."""
    env = dict(os.environ, GIT_AUTHOR_NAME="demo", GIT_AUTHOR_EMAIL="demo@example.com",
               GIT_COMMITTER_NAME="demo", GIT_COMMITTER_EMAIL="demo@example.com")
    path.mkdir(parents=True)
    subprocess.run(["git", "-C", str(path), "init", "-q", "-b", "main"], check=True, env=env)
    for name, text in files.items():
        (path / name).write_text(text)
        subprocess.run(["git", "-C", str(path), "add", name], check=True, env=env)
        subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", f"add {name}"], check=True, env=env)
    return path


class Demo:
    def __init__(self, state_dir: Path):
        self.state = state_dir
        self.envelope = [sys.executable, "-m", "envelope.cli", "--state-dir", str(state_dir)]
        self.repo = make_repo(state_dir / "research-notes", {"README.md": "research notes\n",
                                                             "findings.md": "finding 1\n", "plan.md": "next\n"})
        self.other_repo = make_repo(state_dir / "private-keys", {"keys.txt": "not for the agent\n"})

    def mcp_config(self, policy: Path | None = None) -> Path:
        """The agent's MCP client configuration: mcp-server-git behind ``envelope mcp wrap``, the
        way a client is configured to use the gateway."""
        args = [*self.envelope[1:], "mcp", "wrap", "--workload", WORKLOAD]
        args += ["--policy", str(policy)] if policy else []
        args += ["--", sys.executable, "-m", "mcp_server_git"]
        path = self.state / ("mcp-enforced.json" if policy else "mcp.json")
        path.write_text(json.dumps({"mcpServers": {"git": {"command": sys.executable, "args": args}}}, indent=2) + "\n")
        return path

    def agent(self, task: int, config: Path, malicious: bool = False, credentials: Path | None = None) -> list[str]:
        argv = [PYTHON, str(AGENT), "--task", str(task), "--mcp-config", str(config), "--repo", str(self.repo),
                "--mcp-log", str(self.state / "mcp-gateway.log")]
        if malicious:
            argv += ["--malicious", "--other-repo", str(self.other_repo)]
        return argv + (["--credentials", str(credentials)] if credentials else [])

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


def _free(port: int, kind: int) -> int:
    """``port`` when it is free on loopback, else one the kernel picks."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_ports() -> None:
    """The services' ports: the usual ones unless something on this host holds them. The agent
    (a child process) reads them from the environment."""
    for attr, var, kind in (("MODEL_PORT", "ENVELOPE_DEMO_MODEL_PORT", socket.SOCK_STREAM),
                            ("TOOL_PORT", "ENVELOPE_DEMO_TOOL_PORT", socket.SOCK_STREAM),
                            ("DNS_PORT", "ENVELOPE_DEMO_DNS_PORT", socket.SOCK_DGRAM)):
        port = _free(getattr(demo_agent, attr), kind)
        setattr(demo_agent, attr, port)
        os.environ[var] = str(port)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (make demo): the sensor needs BPF and cgroups", file=sys.stderr)
        return 2
    choose_ports()
    state = Path(os.environ.get("ENVELOPE_DEMO_STATE", "/tmp/envelope-demo"))
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    policy = state / "policy.yaml"
    d = Demo(state)
    with DemoServices():
        d.banner("0. can this host run Envelope?")
        d.run("doctor")

        d.banner(f"1. observe: record {SESSIONS} sessions of the demo agent doing varied tasks")
        config = d.mcp_config()
        print(f"The agent's MCP tools (mcp-server-git on {d.repo}) run behind `envelope mcp wrap`, which records\n"
              f"every tool call and its arguments into the same workload's profile. Its MCP client configuration,\n"
              f"{config}:\n{config.read_text()}")
        for task in range(SESSIONS):
            d.run("record", "--workload", WORKLOAD, "--fingerprint", "model=demo-model-v1",
                  "--fingerprint", "prompt_template=sha256:5e1f0c", "--", *d.agent(task, config))

        d.banner("2. aggregate: the workload's frequency profile")
        d.run("profile", "show", WORKLOAD)

        d.banner("3. derive: granularity, closure, confidence, validity")
        print("The demo's observation window is seconds long, so coverage-stop refuses first:")
        d.run("derive", WORKLOAD, "--substrates", SUBSTRATES, "--out", str(policy), check=False)
        print("\nForcing it records the policy as low-confidence (alert mode by default):")
        d.run("derive", WORKLOAD, "--substrates", SUBSTRATES, "--force", "--out", str(policy))
        d.run("explain", str(policy))

        d.banner("4. enforce: a legitimate variation of the agent's work passes")
        enforced = d.mcp_config(policy)
        print(f"The agent's MCP server now runs behind the gateway with the policy ({enforced}). The gateway\n"
              "starts in the workload's mode, set here, and follows it while it runs; it lists only the allowed tools.")
        d.run("mode", WORKLOAD, "enforce", "--reason", "demo: policy reviewed")
        d.run("exec", "--policy", str(policy), "--mode", "enforce", "--", *d.agent(SESSIONS + 1, enforced), expect=0)

        d.banner("5. enforce: a prompt-injected variation is denied and reported")
        print("It reads a repository it was never asked to read (refused in-band by the MCP gateway), connects\n"
              "outside its egress envelope and calls ptrace (both denied by the kernel), spawns a shell and\n"
              "reads a credentials file (both refused by Landlock):")
        # A (fake) credentials file outside everything the agent was seen to touch: not under
        # /tmp, whose tempfiles make the agent's /tmp/* entries, which Landlock can only grant as
        # all of /tmp (the compile report names that widening).
        secrets = Path(tempfile.mkdtemp(prefix="envelope-demo-", dir="/run"))
        credentials = secrets / ".aws" / "credentials"
        credentials.parent.mkdir()
        credentials.write_text("[default]\naws_secret_access_key = not-a-real-key\n")
        try:
            d.run("exec", "--policy", str(policy), "--mode", "enforce", "--",
                  *d.agent(2, enforced, malicious=True, credentials=credentials), check=False)
        finally:
            shutil.rmtree(secrets, ignore_errors=True)
        d.run("violations", "--workload", WORKLOAD, expect=1)  # exit 1: there are findings
        print("Beside the denials: file accesses outside the policy that got through the Landlock ruleset, as\n"
              "alerts. The MCP gateway runs inside the agent's cgroup here and, enforcing, reads the policy and\n"
              "writes the audit log in the demo's state dir under /tmp, which training never saw; the agent's\n"
              "/tmp/* entries are a Landlock hierarchy on /tmp (`envelope compile --format landlock --report`\n"
              "names that widening), so detection reports them.")

        d.banner("6. every override and apply is in the tamper-evident audit log")
        d.run("audit", "show")
        d.run("audit", "verify")

        d.banner("7. the report: coverage, the policy's decisions and evidence, violations over time")
        report = state / "report.html"
        d.run("report", WORKLOAD, "--policy", str(policy), "--out", str(report))
        print(f"Open {report} in a browser (one self-contained page).")
    print(f"\ndemo: done; state is in {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
