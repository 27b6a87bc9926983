"""A small DNS world for the name tests: a network namespace (made with pyroute2) holding a
real dnsmasq resolver and TCP services on addresses of its loopback device, with an
``/etc/netns/<name>/resolv.conf`` so that ``ip netns exec`` gives every program run in it
(glibc's getaddrinfo through Python's socket, curl, dig) that resolver.

Nothing leaves the namespace: the resolver answers only from its hosts file (``--no-resolv``),
and the services listen only inside it. Rotation rewrites the hosts file and sends dnsmasq
SIGHUP, which re-reads it and drops its cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOLVER = "10.77.0.53"
SERVICE_PORT = 8443

SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 and IPv6 alike
s.bind(("::", int(sys.argv[1]))); s.listen(512)
print("ready", flush=True)
def serve(c):
    try:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class DnsWorld:
    def __init__(self, ttl: int = 30, addresses: tuple[str, ...] = ()):
        from pyroute2 import NetNS, netns
        self.name = f"envl-dns-{os.getpid()}"
        self.ttl = ttl
        self.dir = Path(tempfile.mkdtemp(prefix="envelope-dns-"))
        os.chmod(self.dir, 0o755)  # dnsmasq drops privileges and must read its hosts file
        self.hosts = self.dir / "hosts"
        self.hosts.write_text("")
        self.etc = Path("/etc/netns") / self.name
        self._procs: list[subprocess.Popen] = []
        netns.create(self.name)
        try:
            with NetNS(self.name) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
                for a in (RESOLVER, *addresses):
                    ns.addr("add", index=lo, address=a, prefixlen=128 if ":" in a else 32)
            self.etc.mkdir(parents=True, exist_ok=True)
            (self.etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\noptions attempts:1 timeout:2\n")
            self.dnsmasq = self._start([
                "dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}",
                f"--listen-address={RESOLVER}", "--bind-interfaces", "-p", "53",
                f"--local-ttl={ttl}", "--cache-size=0", f"--pid-file={self.dir / 'dnsmasq.pid'}",
                "--log-facility=-"], stderr=subprocess.DEVNULL)
            self.server = self._start([sys.executable, "-c", SERVER, str(SERVICE_PORT)],
                                      stdout=subprocess.PIPE, text=True)
            if self.server.stdout.readline().strip() != "ready":
                raise RuntimeError("service did not start")
            self._wait_resolver()
        except BaseException:
            self.close()
            raise

    def _start(self, argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self._procs.append(p)
        return p

    def _wait_resolver(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = self.run(["dig", "+short", "+tries=1", "+time=1", "localhost.invalid"], check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("dnsmasq did not answer")

    def set_names(self, names: dict[str, list[str]]) -> None:
        """Answer ``name`` with these addresses from now on (and forget what was cached)."""
        with NetNSAddresses(self.name) as ns:
            for addrs in names.values():
                for a in addrs:
                    ns.ensure(a)
        self.hosts.write_text("".join(f"{a} {n}\n" for n, addrs in names.items() for a in addrs))
        self.dnsmasq.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the world (with its resolver)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def host_argv(self, argv: list[str]) -> list[str]:
        """``argv`` in the world's network and with its resolver, but with the host's mounts
        (``ip netns exec`` mounts a fresh /sys, which hides the cgroup and bpf filesystems):
        for running ``envelope exec`` itself in the world, since its enforced child may no
        longer enter a namespace (the confinement drops CAP_SYS_ADMIN)."""
        script = ('mount --make-rprivate / && mount --bind "$0" /etc/resolv.conf '
                  '&& exec nsenter --net="$1" -- "${@:2}"')
        return ["unshare", "--mount", "bash", "-c", script, str(self.etc / "resolv.conf"),
                f"/run/netns/{self.name}", *argv]

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, check=check,
                              timeout=60, **kw)

    def close(self) -> None:
        from pyroute2 import netns
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        try:
            netns.remove(self.name)
        except OSError:
            pass
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "DnsWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NetNSAddresses:
    """Addresses on the namespace's loopback, added with pyroute2."""

    def __init__(self, name: str):
        from pyroute2 import NetNS
        self.ns = NetNS(name)
        self.lo = self.ns.link_lookup(ifname="lo")[0]
        self.have = {a.get_attr("IFA_ADDRESS") for a in self.ns.get_addr(index=self.lo)}

    def ensure(self, addr: str) -> None:
        if addr not in self.have:
            self.ns.addr("add", index=self.lo, address=addr, prefixlen=128 if ":" in addr else 32)
            self.have.add(addr)

    def __enter__(self) -> "NetNSAddresses":
        return self

    def __exit__(self, *exc) -> None:
        self.ns.close()
