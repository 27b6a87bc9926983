"""The kernel's audit stream over netlink: read Landlock denials without auditd.

What works on this kernel (Linux 6.18, measured): Landlock writes its denial records only while
audit is *enabled* (``audit_enabled``; here it is 0 at boot and no auditd runs). Every record
the kernel emits is multicast to the ``AUDIT_NLGRP_READLOG`` group of ``NETLINK_AUDIT``
(readable with ``CAP_AUDIT_READ``), whether or not an auditd holds the unicast channel, so a
reader there coexists with auditd and is not subject to printk rate limiting. ``/dev/kmsg``
gets the same text only when no auditd runs, and rate-limited: it is not used.

* :func:`status` / :func:`set_enabled`: ``AUDIT_GET`` / ``AUDIT_SET`` (``CAP_AUDIT_CONTROL``).
* :class:`AuditLease`: enable audit for as long as any holder (any process on the node) needs it,
  and put back the value found when the last one leaves. Holders are tracked in
  ``/run/envelope/audit-lease.json`` under ``flock``, dead holders are pruned. Enabling audit is
  a node-wide change: every audit record (not only Landlock's) is then produced, and printed to
  the kernel log when no auditd runs; callers record that they did it.
* :class:`AuditReader`: the multicast socket; :meth:`AuditReader.read` drains it into
  ``(type, text)`` records, counting what the kernel dropped (``ENOBUFS``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
from pathlib import Path

NETLINK_AUDIT = 9
AUDIT_GET, AUDIT_SET = 1000, 1001
AUDIT_STATUS_ENABLED = 1
AUDIT_NLGRP_READLOG = 1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
_NLMSGHDR = struct.Struct("=IHHII")
# struct audit_status: mask, enabled, failure, pid, rate_limit, backlog_limit, lost, backlog,
# feature_bitmap (version), backlog_wait_time, backlog_wait_time_actual (u32 each)
_STATUS = struct.Struct("=11I")
_STATUS_FIELDS = ("mask", "enabled", "failure", "pid", "rate_limit", "backlog_limit", "lost", "backlog",
                  "feature_bitmap", "backlog_wait_time", "backlog_wait_time_actual")
LEASE_FILE = Path("/run/envelope/audit-lease.json")
RCVBUF = 8 << 20


class KernelAuditError(OSError):
    """An audit netlink operation that failed; the message says which and how to fix it."""


def _request(msg_type: int, body: bytes = b"", reply: int | None = None) -> list[tuple[int, bytes]]:
    """Send one request; wait for its ACK, or (``reply``) for a message of that type: the audit
    subsystem sends replies from a kernel thread, after the ACK, so a GET is sent without one."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
    try:
        s.bind((0, 0))
        s.settimeout(5.0)
        flags = NLM_F_REQUEST | (0 if reply is not None else NLM_F_ACK)
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, 1, 0) + body)
        out = []
        while True:
            data = s.recv(65536)
            off = 0
            done = False
            while off + _NLMSGHDR.size <= len(data):
                ln, typ, _, _, _ = _NLMSGHDR.unpack_from(data, off)
                payload = data[off + _NLMSGHDR.size: off + ln]
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    done = True
                else:
                    out.append((typ, payload))
                    done = done or typ == reply
                off += (ln + 3) & ~3
            if done:
                return out
    finally:
        s.close()


def status() -> dict:
    """The kernel's audit status (``enabled``: 0 off, 1 on, 2 locked on)."""
    try:
        replies = _request(AUDIT_GET, reply=AUDIT_GET)
    except OSError as e:
        raise KernelAuditError(e.errno, f"audit AUDIT_GET: {e.strerror}; fix: run as root "
                               "(CAP_AUDIT_CONTROL)") from None
    for typ, payload in replies:
        if typ == AUDIT_GET:
            padded = payload + b"\0" * max(0, _STATUS.size - len(payload))
            return dict(zip(_STATUS_FIELDS, _STATUS.unpack_from(padded)))
    raise KernelAuditError(errno.EPROTO, "audit AUDIT_GET: no status in the reply")


def set_enabled(value: int) -> None:
    body = _STATUS.pack(AUDIT_STATUS_ENABLED, value, *([0] * 9))
    try:
        _request(AUDIT_SET, body)
    except OSError as e:
        raise KernelAuditError(e.errno, f"audit AUDIT_SET enabled={value}: {e.strerror}; fix: run as root "
                               "(CAP_AUDIT_CONTROL); enabled=2 means audit is locked and cannot change") from None


class AuditLease:
    """Audit enabled while held, across processes; the prior value is restored by the last holder."""

    def __init__(self, path: Path = LEASE_FILE):
        self.path = Path(path)
        self.held = False
        self.enabled_here = False

    def _locked(self, fn):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                state = {"holders": [], "restore": None}
            state["holders"] = [p for p in state.get("holders", []) if Path(f"/proc/{p}").exists()]
            result = fn(state)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, sort_keys=True))
            os.replace(tmp, self.path)
            return result
        finally:
            os.close(fd)

    def acquire(self) -> "AuditLease":
        def take(state):
            if not state["holders"]:
                cur = status()["enabled"]
                state["restore"] = cur
                if cur == 0:
                    set_enabled(1)
                    self.enabled_here = True
            elif status()["enabled"] == 0:  # someone turned it off under the holders
                set_enabled(1)
            state["holders"].append(os.getpid())
        self._locked(take)
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return

        def drop(state):
            if os.getpid() in state["holders"]:
                state["holders"].remove(os.getpid())
            if not state["holders"]:
                if state.get("restore") == 0 and status()["enabled"] == 1:
                    set_enabled(0)
                state["restore"] = None
        self._locked(drop)
        self.held = False

    def __enter__(self) -> "AuditLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class AuditReader:
    """The ``AUDIT_NLGRP_READLOG`` multicast socket: every audit record the kernel emits."""

    def __init__(self):
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_AUDIT)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
        except OSError as e:
            raise KernelAuditError(e.errno, f"audit multicast socket (NETLINK_AUDIT, AUDIT_NLGRP_READLOG): "
                                   f"{e.strerror}; fix: run with CAP_AUDIT_READ") from None
        self.sock.setblocking(False)
        self.lost = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[tuple[int, str]]:
        """Every record waiting on the socket, as ``(type, text)``."""
        out = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped records: counted, reading goes on
                    self.lost += 1
                    continue
                raise
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                ln, typ, _, _, _ = _NLMSGHDR.unpack_from(data, off)
                if ln < _NLMSGHDR.size:
                    break
                text = data[off + _NLMSGHDR.size: off + ln].rstrip(b"\0").decode(errors="replace")
                out.append((typ, text))
                off += (ln + 3) & ~3

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "AuditReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
