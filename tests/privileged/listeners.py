"""Loopback listeners for egress tests: accept-and-close on an ephemeral port, or bind (UDP)."""

from __future__ import annotations

import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Listener:
    """Accepts and closes connections on an ephemeral port (TCP), or just binds (UDP);
    ``accepted`` counts the connections it took."""

    def __init__(self, host: str = "127.0.0.1", kind=socket.SOCK_STREAM):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, kind)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.kind = kind
        self.accepted = 0
        if kind == socket.SOCK_STREAM:
            self.sock.listen(512)
            self.thread = threading.Thread(target=self._accept, daemon=True)
            self.thread.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
                self.accepted += 1
                c.close()
            except OSError:
                return

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
