"""A tiny agent for the name tests: resolves names with glibc (Python's socket.getaddrinfo)
and talks to what they resolve to; connects to hard-coded addresses when told to. Prints one
JSON line per step: {"step", "target", "address", "ok", "errno"}.

    name_agent.py NAME:PORT ... [@ADDRESS:PORT ...]
"""

import errno
import json
import socket
import sys


def talk(addr: str, port: int) -> tuple[bool, int]:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(100).endswith(b"ok"), 0
    except OSError as e:
        return False, e.errno or 0
    finally:
        s.close()


for arg in sys.argv[1:]:
    target, _, port = arg.rpartition(":")
    port = int(port)
    if target.startswith("@"):
        ok, err = talk(target[1:], port)
        print(json.dumps({"step": "connect", "target": arg, "address": target[1:], "ok": ok,
                          "errno": errno.errorcode.get(err, err) if err else None}), flush=True)
        continue
    try:
        infos = socket.getaddrinfo(target, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        print(json.dumps({"step": "resolve", "target": arg, "ok": False, "errno": str(e)}), flush=True)
        continue
    addr = infos[0][4][0]
    ok, err = talk(addr, port)
    print(json.dumps({"step": "connect", "target": arg, "address": addr, "ok": ok,
                      "errno": errno.errorcode.get(err, err) if err else None}), flush=True)
