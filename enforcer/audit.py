"""The audit log: an append-only, hash-chained JSONL file at ``<state-dir>/audit.jsonl``.

Every mode change, exception, re-baseline, apply and override is one line::

    {"seq": 7, "time": "2026-11-26T15:27:40.123456Z", "actor": "root", "action": "mode.set",
     "workload": "default/Deployment/agent/main", "reason": "...", "details": {...},
     "prev": "<hash of entry 6>", "hash": "<sha256>"}

``hash`` is the SHA-256 of the entry's canonical JSON without ``hash`` (keys sorted, no spaces,
UTF-8), and ``prev`` is the previous entry's hash (:data:`GENESIS` for the first). ``seq`` counts
from 1 without gaps. Editing any field breaks that entry's hash; deleting or reordering entries
breaks ``seq`` and ``prev``; a torn last line is caught as a partial line.

Removing entries from the end leaves a valid shorter chain, so each append also writes the head
(``seq`` and ``hash`` of the last entry) to ``<state-dir>/audit.head``, atomically; ``verify``
reports a log that ends before its head. A root attacker can rewrite both files; ship the head
off the node (or into a Kubernetes object) for tamper evidence against that.

Appends are durable and safe under concurrent writers: an exclusive ``flock`` on the log
serialises writers (the previous hash is read under the lock), each line is one ``write`` to an
``O_APPEND`` descriptor, then ``fsync``. A log that ends in a partial line refuses new appends
(:class:`AuditError`) rather than chaining onto damage.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from sensor.state_dir import StateDir, atomic_write
from sensor.timestamps import iso_time

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
FIELDS = ("seq", "time", "actor", "action", "workload", "reason", "details", "prev", "hash")


class AuditError(Exception):
    """The audit log cannot be appended to or read."""


def log_path(state_dir) -> Path:
    return StateDir(state_dir).audit_log


def head_path(state_dir) -> Path:
    return StateDir(state_dir).audit_head


def canonical(entry: dict) -> bytes:
    """The bytes an entry's hash covers: canonical JSON of every field except ``hash``."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def default_actor() -> str:
    """Who is acting: ``ENVELOPE_ACTOR``, else the invoking user (``SUDO_USER`` first)."""
    actor = os.environ.get("ENVELOPE_ACTOR") or os.environ.get("SUDO_USER")
    if not actor:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = f"uid:{os.getuid()}"
    return actor


def _last_line(fd: int) -> bytes:
    """The file's last line including its newline (or the partial tail without one)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return b""
    chunk = 4096
    buf = b""
    pos = end
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        # the newline that ends the previous line, not the one ending the last line
        idx = buf.rfind(b"\n", 0, len(buf) - 1)
        if idx >= 0:
            return buf[idx + 1:]
    return buf


def append(state_dir, action: str, *, workload: str | None = None, reason: str = "",
           details: dict | None = None, actor: str | None = None, now: float | None = None) -> dict:
    """Append one entry and return it. Durable on return (fsync'd)."""
    import time

    if not action:
        raise AuditError("audit entry needs an action")
    path = log_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        if last and not last.endswith(b"\n"):
            raise AuditError(f"{path}: ends in a partial line (torn write or truncation); "
                             f"run 'envelope audit verify' and repair before appending")
        if last:
            try:
                prev_entry = json.loads(last)
                seq, prev = int(prev_entry["seq"]) + 1, str(prev_entry["hash"])
            except (ValueError, KeyError, TypeError) as e:
                raise AuditError(f"{path}: last line is not an audit entry ({e}); "
                                 f"run 'envelope audit verify'") from None
        else:
            seq, prev = 1, GENESIS
        entry: dict[str, Any] = {
            "seq": seq,
            "time": iso_time(time.time() if now is None else now, precise=True),
            "actor": actor or default_actor(),
            "action": action,
            "workload": workload,
            "reason": reason,
            "details": details or {},
            "prev": prev,
        }
        entry["hash"] = entry_hash(entry)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        data = line.encode()
        n = os.write(fd, data)
        if n != len(data):
            raise AuditError(f"{path}: short write ({n} of {len(data)} bytes)")
        os.fsync(fd)
        if created:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        atomic_write(head_path(state_dir),
                     (json.dumps({"seq": seq, "hash": entry["hash"]}, sort_keys=True) + "\n").encode())
        log.debug("audit.append", seq=seq, action=action, workload=workload)
        return entry
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Problem:
    line: int  # 1-based line number in the log (0: the file as a whole)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Verification:
    path: Path
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)
    head: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": str(self.path), "entries": self.entries, "ok": self.ok,
                "problems": [{"line": p.line, "message": p.message} for p in self.problems]}


def verify(state_dir) -> Verification:
    """Check the whole chain; every problem names its line."""
    path = log_path(state_dir)
    result = Verification(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as e:
        raise AuditError(f"{path}: cannot read: {e.strerror}") from e
    try:
        head = json.loads(head_path(state_dir).read_text())
        result.head = head
    except FileNotFoundError:
        head = None
    except (OSError, ValueError) as e:
        result.problems.append(Problem(0, f"{head_path(state_dir)}: unreadable head ({e})"))
        head = None
    if not raw:
        if head and int(head.get("seq", 0)) > 0:
            result.problems.append(Problem(0, f"log is empty but its head records {head['seq']} "
                                              f"entries: truncated or deleted"))
        return result
    lines = raw.split(b"\n")
    partial = lines[-1] != b""
    if not partial:
        lines = lines[:-1]
    prev, want_seq = GENESIS, 1
    last_hash, last_seq = None, 0
    for i, line in enumerate(lines, start=1):
        if partial and i == len(lines):
            result.problems.append(Problem(i, "partial last line (torn write or truncation)"))
            break
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError as e:
            result.problems.append(Problem(i, f"not a JSON audit entry ({e})"))
            prev, want_seq = None, want_seq + 1
            continue
        result.entries += 1
        missing = [k for k in FIELDS if k not in entry]
        extra = sorted(set(entry) - set(FIELDS))
        if missing or extra:
            result.problems.append(Problem(i, f"fields missing {missing} or unexpected {extra}"))
        seq = entry.get("seq")
        if seq != want_seq:
            what = "reordered" if isinstance(seq, int) and seq < want_seq else "missing or reordered"
            result.problems.append(Problem(i, f"seq {seq}, expected {want_seq}: entries {what}"))
        if prev is not None and entry.get("prev") != prev:
            result.problems.append(Problem(i, "prev does not match the previous entry's hash: "
                                              "an entry before it was removed, edited or reordered"))
        if entry_hash(entry) != entry.get("hash"):
            result.problems.append(Problem(i, "hash mismatch: entry edited"))
        prev = entry.get("hash")
        want_seq = (seq + 1) if isinstance(seq, int) else want_seq + 1
        last_hash, last_seq = entry.get("hash"), seq
    if head is not None and result.ok:
        hseq = head.get("seq")
        if isinstance(hseq, int) and isinstance(last_seq, int) and hseq > last_seq:
            result.problems.append(Problem(len(lines), f"log ends at seq {last_seq} but its head "
                                                       f"records seq {hseq}: entries removed from "
                                                       f"the end"))
        elif hseq == last_seq and head.get("hash") != last_hash:
            result.problems.append(Problem(len(lines), "last entry's hash differs from the head: "
                                                       "log rewritten"))
    return result


def read(state_dir, workload: str | None = None, action: str | None = None) -> list[dict]:
    """Entries in order (unverified; lines that do not parse are skipped), optionally filtered."""
    path = log_path(state_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if not isinstance(e, dict):
            continue
        if workload and e.get("workload") != workload:
            continue
        if action and not str(e.get("action", "")).startswith(action):
            continue
        out.append(e)
    return out
