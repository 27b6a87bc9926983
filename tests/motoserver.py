"""A real moto server on 127.0.0.1 over HTTPS, with IAM authorization on, for tests.

moto authorizes every request once its ``INITIAL_NO_AUTH_ACTION_COUNT`` first requests have been
served (every authenticated HTTP request counts, whatever it is). The server is started with
the exact number of bootstrap requests the caller will make unauthenticated (creating the admin
identity), and readiness is checked with a TLS handshake only, never an HTTP request, so no probe
uses up the count. The certificate is made by trustme for 127.0.0.1; clients verify it against
the test CA.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import trustme

STARTUP_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, workdir: Path, no_auth_requests: int):
        self.workdir = workdir
        self.no_auth_requests = no_auth_requests
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "moto.log"
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self._cert = workdir / "server.pem"
        self._key = workdir / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(self._cert))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self._cert), append=True)
        cert.private_key_pem.write_to_path(str(self._key))

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(self.no_auth_requests),
                   AWS_DEFAULT_REGION="us-east-1", MOTO_PORT=str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port),
             "-c", str(self._cert), "-k", str(self._key)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw:
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return  # TLS handshake done: serving, and no HTTP request was made
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server not ready after {STARTUP_SECONDS:.0f} s")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
