"""The audit log: an append-only, hash-chained and authenticated JSONL file at
``<state-dir>/audit.jsonl``.

Every mode change, exception, re-baseline, apply and override is one line::

    {"seq": 7, "time": "2026-11-26T15:27:40.123456Z", "actor": "root", "action": "mode.set",
     "workload": "default/Deployment/agent/main", "reason": "...", "details": {...},
     "prev": "<hash of entry 6>", "hash": "<sha256>", "mac": "<hmac-sha256>"}

``hash`` is the SHA-256 of the entry's canonical JSON without ``hash`` and ``mac`` (keys sorted,
no spaces, UTF-8); ``prev`` is the previous entry's hash (:data:`GENESIS` for the first); ``seq``
counts from 1 without gaps; ``mac`` is the HMAC-SHA256 of ``hash`` under the node's audit key.

What each part catches:

- an edit of any field breaks the entry's hash; an entry edited and re-hashed breaks the next
  entry's ``prev``; deleting or reordering entries breaks ``seq`` and ``prev``;
- a rewrite that recomputes every hash (and appends more) still needs the **key** to write
  ``mac``: ``<state-dir>/keys/audit.key``, 32 random bytes made on first use, 0600 in a 0700
  directory, so a workload (or anyone who is not root on the node) can neither read it nor
  forge an entry;
- removing entries from the end leaves a valid shorter chain, so each append also writes the
  **head** (``seq``, ``hash`` and its own MAC) to ``<state-dir>/audit.head``; ``verify`` needs the
  head to name an entry of the log, with the same hash, and the log to end there. A missing
  head, a missing log, a missing key while entries exist, each is reported: once the key exists,
  the log has been written and must be there;
- root on the node can read the key and rewrite all three files consistently. Against that the
  head is **anchored off the node**: the daemon publishes each new head as a checkpoint of this
  node's ``AuditAnchor`` object (:mod:`enforcer.auditanchor`), whose schema lets checkpoints be
  added and never changed or removed; ``verify`` with the cluster configured checks every
  published checkpoint against the log. What can still be rewritten unnoticed is what was
  appended after the last checkpoint reached the API server.

Appends are durable and safe under concurrent writers: an exclusive ``flock`` on the log
serialises writers (the previous hash is read under the lock), each line is one ``write`` to an
``O_APPEND`` descriptor, then ``fsync``, then the head. A log that ends in a partial line, or whose
last entry does not authenticate, refuses new appends (:class:`AuditError`) rather than chaining
onto damage.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import structlog

from sensor.state_dir import (
    PRIVATE_FILE, StateDir, UntrustedFileError, atomic_write, private_dirs, read_trusted,
)
from sensor.timestamps import iso_time

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
FIELDS = ("seq", "time", "actor", "action", "workload", "reason", "details", "prev", "hash", "mac")
KEY_BYTES = 32


class AuditError(Exception):
    """The audit log cannot be appended to or read."""


def log_path(state_dir) -> Path:
    return StateDir(state_dir).audit_log


def head_path(state_dir) -> Path:
    return StateDir(state_dir).audit_head


def key_path(state_dir) -> Path:
    return StateDir(state_dir).audit_key


def canonical(entry: dict) -> bytes:
    """The bytes an entry's hash covers: canonical JSON of every field except ``hash`` and
    ``mac``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "mac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def entry_mac(key: bytes, digest: str) -> str:
    return hmac.new(key, b"entry:" + digest.encode(), hashlib.sha256).hexdigest()


def head_mac(key: bytes, seq: int, digest: str) -> str:
    return hmac.new(key, f"head:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


def default_actor() -> str:
    """Who is acting: ``ENVELOPE_ACTOR``, else the invoking user (``SUDO_USER`` first)."""
    actor = os.environ.get("ENVELOPE_ACTOR") or os.environ.get("SUDO_USER")
    if not actor:
        try:
            actor = getpass.getuser()
        except (KeyError, OSError):
            actor = f"uid:{os.getuid()}"
    return actor


# ---- the key --------------------------------------------------------------------------------


def read_key(state_dir) -> bytes | None:
    """The audit key, or None when there is none yet; :class:`AuditError` when the file is not
    what it must be (root's, 0600, 32 bytes)."""
    layout = StateDir(state_dir)
    try:
        raw = read_trusted(layout.audit_key, layout.root)
    except FileNotFoundError:
        return None
    except UntrustedFileError as e:
        raise AuditError(f"audit key: {e}") from None
    except OSError as e:
        raise AuditError(f"{layout.audit_key}: cannot read: {e.strerror}") from None
    st = os.stat(layout.audit_key)
    if st.st_mode & 0o077:
        raise AuditError(f"{layout.audit_key}: readable by others (mode {st.st_mode & 0o777:04o}); "
                         f"the key is no longer secret: make a new state directory's log")
    if len(raw) != KEY_BYTES:
        raise AuditError(f"{layout.audit_key}: {len(raw)} bytes, not {KEY_BYTES}")
    return raw


def _key_for_append(state_dir) -> bytes:
    """The key, made on first use (O_EXCL: two first writers agree on one)."""
    key = read_key(state_dir)
    if key is not None:
        return key
    path = key_path(state_dir)
    private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     PRIVATE_FILE)
    except FileExistsError:
        key = read_key(state_dir)
        if key is None:
            raise AuditError(f"{path}: vanished while being made") from None
        return key
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    log.info("audit key created", path=str(path))
    return read_key(state_dir) or b""


# ---- appending --------------------------------------------------------------------------------


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


def _previous(fd: int, path: Path, key: bytes | None) -> tuple[int, str]:
    """(next seq, prev hash) from the log's last line, refusing damage."""
    last = _last_line(fd)
    if not last:
        return 1, GENESIS
    if not last.endswith(b"\n"):
        raise AuditError(f"{path}: ends in a partial line (torn write or truncation); "
                         f"run 'envelope audit verify' and repair before appending")
    try:
        prev_entry = json.loads(last)
        seq, prev = int(prev_entry["seq"]) + 1, str(prev_entry["hash"])
        mac = str(prev_entry["mac"])
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{path}: last line is not an audit entry ({e}); "
                         f"run 'envelope audit verify'") from None
    if key is None:
        raise AuditError(f"{path}: holds entries but the audit key is gone; "
                         f"run 'envelope audit verify'")
    if entry_hash(prev_entry) != prev or not hmac.compare_digest(entry_mac(key, prev), mac):
        raise AuditError(f"{path}: the last entry does not authenticate; "
                         f"run 'envelope audit verify'")
    return seq, prev


def append(state_dir, action: str, *, workload: str | None = None, reason: str = "",
           details: dict | None = None, actor: str | None = None, now: float | None = None) -> dict:
    """Append one entry and return it. Durable on return (fsync'd)."""
    if not action:
        raise AuditError("audit entry needs an action")
    path = log_path(state_dir)
    private_dirs(path.parent)
    key = _key_for_append(state_dir)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        seq, prev = _previous(fd, path, key)
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
        entry["mac"] = entry_mac(key, entry["hash"])
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
        head = {"seq": seq, "hash": entry["hash"], "mac": head_mac(key, seq, entry["hash"])}
        atomic_write(head_path(state_dir), (json.dumps(head, sort_keys=True) + "\n").encode())
        log.debug("audit.append", seq=seq, action=action, workload=workload)
        return entry
    finally:
        os.close(fd)  # releases the lock


def last_entry(state_dir) -> dict | None:
    """The log's last line as an entry (unverified), or None."""
    try:
        fd = os.open(log_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(_last_line(fd) or b"null")
    except ValueError:
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def head(state_dir) -> dict | None:
    """The head as written by the last append (unverified; :func:`verify` checks it)."""
    try:
        data = json.loads(head_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- verifying ----------------------------------------------------------------------------------


@dataclass
class Problem:
    line: int  # 1-based line number in the log (0: the file as a whole)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass(frozen=True)
class Checkpoint:
    """A head published off the node: entry ``seq`` had ``hash``."""

    seq: int
    hash: str
    source: str = ""


@dataclass
class Verification:
    path: Path
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)
    head: dict | None = None
    checkpoints: int = 0  # published checkpoints checked against the log
    anchored: bool = False  # whether an off-node anchor was consulted

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": str(self.path), "entries": self.entries, "ok": self.ok,
                "anchored": self.anchored, "checkpoints": self.checkpoints,
                "problems": [{"line": p.line, "message": p.message} for p in self.problems]}


def verify(state_dir, checkpoints: Iterable[Checkpoint] | None = None) -> Verification:
    """Check the whole chain, its MACs and its head, and, when ``checkpoints`` (heads published
    off the node) are given, that the log holds each of them. Every problem names its line."""
    path = log_path(state_dir)
    result = Verification(path)
    try:
        raw = path.read_bytes()
        exists = True
    except FileNotFoundError:
        raw, exists = b"", False
    except OSError as e:
        raise AuditError(f"{path}: cannot read: {e.strerror}") from e
    try:
        key = read_key(state_dir)
    except AuditError as e:
        result.problems.append(Problem(0, str(e)))
        key = None
        key_broken = True
    else:
        key_broken = False
    hpath = head_path(state_dir)
    head_entry: dict | None = None
    try:
        head_entry = json.loads(hpath.read_text())
        if not isinstance(head_entry, dict):
            raise ValueError("not an object")
        result.head = head_entry
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        result.problems.append(Problem(0, f"{hpath}: unreadable head ({e})"))
        head_entry = {}

    lines = raw.split(b"\n") if raw else []
    partial = bool(lines) and lines[-1] != b""
    if lines and not partial:
        lines = lines[:-1]
    if not lines:
        if key is not None or key_broken:
            what = "missing" if not exists else "empty"
            result.problems.append(Problem(0, f"log is {what} but its key exists, so entries were "
                                              f"written: deleted or truncated"))
        if head_entry:
            result.problems.append(Problem(0, f"log is empty but its head records "
                                              f"{head_entry.get('seq')} entries: truncated or deleted"))
    elif key is None and not key_broken:
        result.problems.append(Problem(0, f"{key_path(state_dir)} is missing: the entries cannot "
                                          f"be authenticated (key deleted?)"))

    prev, want_seq = GENESIS, 1
    by_seq: dict[int, str] = {}
    last_seq: Any = 0
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
        if seq != want_seq or isinstance(seq, bool):
            what = "reordered" if isinstance(seq, int) and seq < want_seq else "missing or reordered"
            result.problems.append(Problem(i, f"seq {seq}, expected {want_seq}: entries {what}"))
        if prev is not None and entry.get("prev") != prev:
            result.problems.append(Problem(i, "prev does not match the previous entry's hash: "
                                              "an entry before it was removed, edited or reordered"))
        digest = entry_hash(entry)
        if digest != entry.get("hash"):
            result.problems.append(Problem(i, "hash mismatch: entry edited"))
        elif key is not None and not (isinstance(entry.get("mac"), str)
                                      and hmac.compare_digest(entry_mac(key, digest), entry["mac"])):
            result.problems.append(Problem(i, "MAC does not authenticate: entry written without "
                                              "the audit key"))
        prev = entry.get("hash")
        want_seq = (seq + 1) if isinstance(seq, int) and not isinstance(seq, bool) else want_seq + 1
        if isinstance(seq, int):
            by_seq.setdefault(seq, str(entry.get("hash")))
        last_seq = seq
    n_lines = len(lines)

    if lines and head_entry is None:
        result.problems.append(Problem(0, f"{hpath} is missing: the end of the log cannot be "
                                          f"checked (head deleted?)"))
    elif lines and head_entry:
        hseq, hhash = head_entry.get("seq"), head_entry.get("hash")
        if not isinstance(hseq, int) or not isinstance(hhash, str):
            result.problems.append(Problem(0, f"{hpath}: not a head (seq, hash)"))
        else:
            if key is not None and not (isinstance(head_entry.get("mac"), str) and hmac.compare_digest(
                    head_mac(key, hseq, hhash), head_entry["mac"])):
                result.problems.append(Problem(0, f"{hpath}: MAC does not authenticate: head "
                                                  f"written without the audit key"))
            if hseq not in by_seq:
                result.problems.append(Problem(n_lines, f"log ends at seq {last_seq} but its head "
                                                        f"records seq {hseq}: entries removed"))
            elif by_seq[hseq] != hhash:
                result.problems.append(Problem(n_lines, f"entry {hseq}'s hash differs from the "
                                                        f"head's: log rewritten"))
            elif isinstance(last_seq, int) and last_seq > hseq:
                result.problems.append(Problem(n_lines, f"{last_seq - hseq} entries after the head "
                                                        f"(seq {hseq}): appended without the head "
                                                        f"(an interrupted append, or a rewrite)"))

    if checkpoints is not None:
        result.anchored = True
        for cp in sorted(checkpoints, key=lambda c: c.seq):
            result.checkpoints += 1
            where = f" ({cp.source})" if cp.source else ""
            if cp.seq not in by_seq:
                result.problems.append(Problem(0, f"checkpoint seq {cp.seq} published off the "
                                                  f"node{where} is not in the log: entries removed "
                                                  f"or the log replaced"))
            elif by_seq[cp.seq] != cp.hash:
                result.problems.append(Problem(0, f"entry {cp.seq} differs from the checkpoint "
                                                  f"published off the node{where}: history "
                                                  f"rewritten"))
    return result


def read(state_dir, workload: str | None = None, action: str | None = None) -> list[dict]:
    """Entries in order (unverified; lines that do not parse are skipped), optionally filtered."""
    path = log_path(state_dir)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raw = path.read_bytes().decode("utf-8", errors="replace")
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
