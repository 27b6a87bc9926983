"""Landlock denials from Linux audit records: records in, :class:`LandlockDenial` events out.

Landlock ABI 7 logs each denied access as an audit event (measured here on Linux 6.18, audit
enabled, no auditd), made of records that share the event's ``audit(<time>:<serial>)`` stamp::

    type=1423 AUDIT_LANDLOCK_ACCESS  domain=1fe6d85fc blockers=fs.execute,fs.read_file
                                     path="/usr/bin/true" dev="vda" ino=260958
    type=1424 AUDIT_LANDLOCK_DOMAIN  domain=1fe6d85fc status=allocated mode=enforcing pid=8796
                                     uid=0 exe="/usr/bin/python3.11" comm="python3"
                                     (first denial of a domain only: who created it)
    type=1300 AUDIT_SYSCALL          arch=c000003e syscall=59 success=no exit=-13 ... ppid=8754
                                     pid=8796 ... comm="python3" exe="/usr/bin/python3.11"
                                     (when the task has an audit context)
    type=1327 AUDIT_PROCTITLE, type=1320 AUDIT_EOE (end of the event)

A later ``AUDIT_LANDLOCK_DOMAIN`` record with ``status=deallocated denials=N`` closes a domain.
Strings that need it are hex-encoded by audit (no quotes); they are decoded here. For a denied
creation or removal (``fs.make_*``, ``fs.remove_*``, ``fs.refer``) the record names the
directory, not the new name.

Pure: :class:`DenialAssembler` is fed ``(type, text)`` pairs by the reader
(:mod:`enforcer.kernel_audit`) and returns complete denials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sensor import syscalls

AUDIT_SYSCALL = 1300
AUDIT_PROCTITLE = 1327
AUDIT_EOE = 1320
AUDIT_LANDLOCK_ACCESS = 1423
AUDIT_LANDLOCK_DOMAIN = 1424
TYPES = (AUDIT_SYSCALL, AUDIT_PROCTITLE, AUDIT_EOE, AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN)

_STAMP = re.compile(r"^audit\((?P<sec>\d+)\.(?P<ms>\d+):(?P<serial>\d+)\):\s?")
_FIELD = re.compile(r'(?P<k>[a-zA-Z0-9_-]+)=(?:"(?P<q>[^"]*)"|(?P<v>\S*))')
_HEX = re.compile(r"^(?:[0-9A-F]{2})+$")
_STRING_FIELDS = ("path", "comm", "exe", "proctitle", "name")

#: Landlock blocker → file access kind (enforcer.file_patterns.KINDS); ``fs.execute`` is the exec
#: substrate. Kinds checked on a directory are reported with the directory as ``dir/*``.
BLOCKER_KINDS = {
    "fs.read_file": "read", "fs.read_dir": "list", "fs.write_file": "write", "fs.truncate": "truncate",
    "fs.ioctl_dev": "ioctl", "fs.make_reg": "create", "fs.remove_file": "remove", "fs.make_dir": "mkdir",
    "fs.remove_dir": "rmdir", "fs.make_sym": "symlink", "fs.make_fifo": "mkfifo", "fs.make_sock": "mksock",
    "fs.make_char": "mknod", "fs.make_block": "mknod", "fs.refer": "refer",
}
_ON_DIRECTORY = {"create", "remove", "mkdir", "rmdir", "symlink", "mkfifo", "mksock", "mknod", "refer"}


def parse_record(text: str) -> tuple[float, int, dict[str, str]] | None:
    """``(time, serial, fields)`` of one audit record's text, or None when it has no stamp."""
    m = _STAMP.match(text)
    if not m:
        return None
    t = int(m["sec"]) + int(m["ms"]) / 1000.0
    fields: dict[str, str] = {}
    for f in _FIELD.finditer(text[m.end():]):
        k = f["k"]
        if f["q"] is not None:
            v = f["q"]
        else:
            v = f["v"]
            if k in _STRING_FIELDS and _HEX.match(v):
                v = bytes.fromhex(v).decode(errors="replace")
        fields[k] = v
    return t, int(m["serial"]), fields


@dataclass(frozen=True)
class LandlockDenial:
    """One access Landlock refused: what, on which path, by which process."""

    time: float
    serial: int
    domain: str
    blockers: tuple[str, ...]
    path: str
    pid: int | None = None
    ppid: int | None = None
    comm: str = ""
    exe: str = ""
    syscall: str = ""
    exit: int | None = None
    dev: str = ""
    ino: int | None = None
    creator: dict = field(default_factory=dict, compare=False, hash=False)  # domain creator, when logged

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({BLOCKER_KINDS[b] for b in self.blockers if b in BLOCKER_KINDS}))

    def behaviours(self) -> tuple[str, ...]:
        """Behaviour keys of what was refused: ``exec:PATH`` for an exec (which Landlock checks as
        execute and read), ``file:KIND:PATH``, or ``file:KIND:DIR/*`` for an operation checked on
        the directory (the audit record does not name the entry)."""
        if "fs.execute" in self.blockers:
            return (f"exec:{self.path}",)
        out = []
        for k in self.kinds:
            if k in _ON_DIRECTORY:
                out.append(f"file:{k}:{self.path.rstrip('/')}/*")
            else:
                out.append(f"file:{k}:{self.path}")
        return tuple(out)

    def to_dict(self) -> dict:
        return {"time": self.time, "serial": self.serial, "domain": self.domain, "blockers": list(self.blockers),
                "path": self.path, "pid": self.pid, "ppid": self.ppid, "comm": self.comm, "exe": self.exe,
                "syscall": self.syscall, "exit": self.exit, "dev": self.dev, "ino": self.ino,
                "behaviours": list(self.behaviours()), "creator": dict(self.creator)}


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


class DenialAssembler:
    """Groups audit records into events by serial and turns Landlock access events into denials.

    An event is complete at its ``AUDIT_EOE`` record; events of tasks without an audit context
    have none, so :meth:`flush` completes whatever is pending (the reader calls it when the
    socket goes quiet). Counts undecodable records instead of raising.
    """

    def __init__(self):
        self.pending: dict[int, dict] = {}
        self.undecodable = 0
        self.domains: dict[str, dict] = {}  # domain id -> creator fields, as logged

    def feed(self, rtype: int, text: str) -> list[LandlockDenial]:
        if rtype not in TYPES:
            return []
        parsed = parse_record(text)
        if parsed is None:
            self.undecodable += 1
            return []
        t, serial, fields = parsed
        ev = self.pending.setdefault(serial, {"time": t, "access": [], "domain": [], "syscall": None})
        if rtype == AUDIT_LANDLOCK_ACCESS:
            ev["access"].append(fields)
        elif rtype == AUDIT_LANDLOCK_DOMAIN:
            ev["domain"].append(fields)
        elif rtype == AUDIT_SYSCALL:
            ev["syscall"] = fields
        elif rtype == AUDIT_EOE:
            return self._complete(serial)
        return []

    def flush(self) -> list[LandlockDenial]:
        out: list[LandlockDenial] = []
        for serial in sorted(self.pending):
            out += self._complete(serial)
        return out

    def _complete(self, serial: int) -> list[LandlockDenial]:
        ev = self.pending.pop(serial, None)
        if ev is None:
            return []
        for d in ev["domain"]:
            if d.get("status") == "allocated" and d.get("domain"):
                self.domains[d["domain"]] = {k: d[k] for k in ("pid", "uid", "exe", "comm", "mode") if k in d}
        sc = ev["syscall"] or {}
        out = []
        for a in ev["access"]:
            if "blockers" not in a or "domain" not in a:
                self.undecodable += 1
                continue
            nr = _int(sc.get("syscall"))
            out.append(LandlockDenial(
                time=ev["time"], serial=serial, domain=a["domain"],
                blockers=tuple(a["blockers"].split(",")), path=a.get("path", ""),
                pid=_int(sc.get("pid")), ppid=_int(sc.get("ppid")), comm=sc.get("comm", ""),
                exe=sc.get("exe", ""), syscall=syscalls.name(nr) if nr is not None else "",
                exit=_int(sc.get("exit")), dev=a.get("dev", ""), ino=_int(a.get("ino")),
                creator=dict(self.domains.get(a["domain"], {}))))
        return out


def to_violation(denial: LandlockDenial, workload: str):
    """The denial as violations (one per behaviour): ``exec`` denials are the exec substrate's,
    the others the file substrate's."""
    from .violations import Violation
    detail = {"pid": denial.pid, "comm": denial.comm, "exe": denial.exe, "syscall": denial.syscall,
              "path": denial.path, "blockers": list(denial.blockers), "domain": denial.domain,
              "enforcer": "landlock"}
    out = []
    for b in denial.behaviours():
        substrate = "exec" if b.startswith("exec:") else "file"
        out.append(Violation(denial.time, workload, substrate, b, "denied", detail))
    return out
