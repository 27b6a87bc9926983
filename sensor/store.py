"""Profile store: one file per workload under ``<state-dir>/profiles/``.

A profile file is framed so damage is found, not loaded::

    "ENVPROF\\x01"        8 bytes, the format and its version
    sha256                32 bytes, of everything after it
    header length         u32, big-endian
    header                msgpack {"workload": {namespace, kind, name, container}, "size": n}
    body                  n bytes: msgpack of Profile.pack()

The header lets the store list workloads without reading whole profiles, and carries the key
the file belongs to (file names are bounded and may be hashed, :mod:`sensor.state_dir`). A file
whose digest does not match, whose header or body does not decode, whose name is not its
workload's, or that someone other than root could have written (:func:`read_trusted`) raises
:class:`ProfileStoreError` naming the file. The daemon then quarantines it
(:meth:`ProfileStore.quarantine`: moved to ``profiles/quarantine/``, logged, counted) and
starts the workload afresh; ``envelope profile list`` reports it and lists the others. Files of
the earlier unframed format (a bare msgpack map) are still read, without a digest to check, and
are written framed on the next save.

Writes are atomic (:func:`sensor.state_dir.atomic_write`).

Several writers can hold one workload's profile on a node: the sensor (the daemon or ``record``)
writes its node's contribution, an MCP gateway writes its own. Each writer owns one
contribution: :meth:`ProfileStore.save_contribution` and :meth:`ProfileStore.update` read, change
and write the file under an exclusive lock, so a writer never puts back an old copy of another
writer's contribution. A stored file that cannot be read at that point is quarantined and the
change is made to a fresh profile: a writer never stops on another's damage.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgpack
import structlog

from .profile import Profile
from .state_dir import StateDir, UntrustedFileError, atomic_write, private_dirs, read_trusted
from .workload import Workload

log = structlog.get_logger(__name__)

MAGIC = b"ENVPROF\x01"
_DIGEST = 32
_LEN = struct.Struct(">I")
_FRAME = len(MAGIC) + _DIGEST + _LEN.size
MAX_HEADER = 1 << 16


class ProfileStoreError(Exception):
    """A profile file that cannot be read or written."""


def _damaged(source, detail: str) -> ProfileStoreError:
    return ProfileStoreError(f"{source}: corrupt or truncated profile ({detail}); file left in place")


def encode_profile(profile: Profile) -> bytes:
    """The framed bytes of a profile file (deterministic)."""
    body = msgpack.packb(profile.pack(), use_bin_type=True)
    header = msgpack.packb({"workload": profile.workload.to_dict(), "size": len(body)},
                           use_bin_type=True)
    rest = _LEN.pack(len(header)) + header + body
    return MAGIC + hashlib.sha256(rest).digest() + rest


def _legacy(raw: bytes) -> bool:
    """A bare msgpack map: the unframed format written before the framing."""
    return bool(raw) and (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF))


def _header(raw: bytes, source) -> tuple[dict, int]:
    """The decoded header of framed bytes and where the body starts (no digest check)."""
    if len(raw) < _FRAME or not raw.startswith(MAGIC):
        raise _damaged(source, "no Envelope profile header")
    (n,) = _LEN.unpack_from(raw, len(MAGIC) + _DIGEST)
    if n > MAX_HEADER or _FRAME + n > len(raw):
        raise _damaged(source, "header cut short")
    try:
        header = msgpack.unpackb(raw[_FRAME:_FRAME + n], raw=False)
        Workload.from_dict(header["workload"])
        int(header["size"])
    except Exception as e:  # noqa: BLE001 - any failure to decode is damage
        raise _damaged(source, f"header does not decode: {type(e).__name__}") from None
    return header, _FRAME + n


def peek_workload(raw: bytes, source) -> Workload:
    """The workload a profile file's bytes belong to, from the header alone."""
    if _legacy(raw):
        return decode_profile(raw, source).workload
    header, _ = _header(raw, source)
    return Workload.from_dict(header["workload"])


def decode_profile(raw: bytes, source) -> Profile:
    """A profile from the bytes of a profile file (framed, or a bare msgpack map as written
    before and by ``envelope cluster profile --save``); :class:`ProfileStoreError` names
    ``source`` and what is wrong."""
    if _legacy(raw):
        body = raw
        header = None
    else:
        header, start = _header(raw, source)
        if hashlib.sha256(raw[len(MAGIC) + _DIGEST:]).digest() != raw[len(MAGIC):len(MAGIC) + _DIGEST]:
            raise _damaged(source, "checksum mismatch: changed or damaged after it was written")
        body = raw[start:]
        if len(body) != int(header["size"]):
            raise _damaged(source, f"body is {len(body)} bytes, the header says {header['size']}")
    try:
        profile = Profile.unpack(msgpack.unpackb(body, raw=False, strict_map_key=False))
    except Exception as e:  # noqa: BLE001 - any failure to decode is damage
        raise _damaged(source, f"{type(e).__name__}: {str(e)[:200]}") from None
    if header is not None and Workload.from_dict(header["workload"]) != profile.workload:
        raise _damaged(source, "header and body name different workloads")
    return profile


def _named(filename: str, suffix: str) -> Workload | None:
    """The workload an unhashed file name says (for reporting a file whose content is damaged)."""
    try:
        return Workload.parse(StateDir.workload_of(filename, suffix) or "")
    except ValueError:
        return None


@dataclass
class StoredFile:
    """A file in the profile directory, as the listing found it."""

    path: Path
    workload: Workload | None = None
    error: str = ""


class ProfileStore:
    SUFFIX = ".msgpack"

    def __init__(self, state_dir: str | os.PathLike,
                 on_quarantine: Callable[[Path, str], None] | None = None):
        self.layout = StateDir(state_dir)
        self.root = self.layout.profiles
        self.on_quarantine = on_quarantine

    def path_for(self, workload: Workload) -> Path:
        return self.layout.profile(workload.key)

    def save(self, profile: Profile) -> Path:
        path = self.path_for(profile.workload)
        atomic_write(path, encode_profile(profile))
        return path

    @contextmanager
    def _locked(self, workload: Workload):
        """The workload's exclusive lock, for a read, change and write of its file."""
        lock = self.layout.profile_lock(workload.key)
        private_dirs(lock.parent)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load_or_quarantine(self, workload: Workload) -> Profile | None:
        try:
            return self.load(workload)
        except ProfileStoreError as e:
            self.quarantine(self.path_for(workload), str(e))
            return None

    def update(self, workload: Workload, change: Callable[[Profile], None]) -> Profile:
        """Under the workload's lock: load the stored profile (or start one; a stored one that
        cannot be read is quarantined), apply ``change`` to it, write it; returns what was
        written."""
        with self._locked(workload):
            profile = self._load_or_quarantine(workload) or Profile(workload)
            change(profile)
            self.save(profile)
            return profile

    def save_contribution(self, profile: Profile, node: str) -> Profile:
        """Write ``profile``'s contribution ``node`` and keep every other contribution as it is
        stored; ``profile`` is refreshed with the stored ones."""
        mine = profile.nodes[node]

        def put(stored: Profile) -> None:
            stored.nodes[node] = mine

        stored = self.update(profile.workload, put)
        profile.nodes.update(stored.nodes)
        return stored

    def remove_contribution(self, workload: Workload, node: str) -> None:
        """Under the workload's lock: drop contribution ``node``; the file goes with the last one."""
        with self._locked(workload):
            profile = self._load_or_quarantine(workload)
            if profile is None:
                return
            profile.nodes.pop(node, None)
            if profile.nodes:
                self.save(profile)
            else:
                self.remove(workload)

    def load(self, workload: Workload) -> Profile | None:
        path = self.path_for(workload)
        if not os.path.lexists(path):
            return None
        p = self.load_path(path, self.layout.root)
        if p.workload != workload:
            raise ProfileStoreError(f"{path}: holds the profile of {p.workload.key}, not {workload.key}")
        return p

    @staticmethod
    def load_path(path: Path, root=None) -> Profile:
        try:
            raw = read_trusted(path, root)
        except UntrustedFileError as e:
            raise ProfileStoreError(f"{path}: {e}") from e
        except OSError as e:
            raise ProfileStoreError(f"{path}: cannot read: {e.strerror}") from e
        return decode_profile(raw, path)

    def scan(self) -> list[StoredFile]:
        """Every profile file with the workload its header names, or why it cannot be used (a
        damaged header, a name that is not its workload's, an untrusted file)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if not p.name.endswith(self.SUFFIX) or p.name.startswith(".") or not os.path.isfile(p):
                continue
            try:
                raw = read_trusted(p, self.layout.root)
                w = peek_workload(raw, p)
            except (OSError, ProfileStoreError) as e:
                out.append(StoredFile(p, _named(p.name, self.SUFFIX), error=str(e)))
                continue
            if not StateDir.names_key(p.name, self.SUFFIX, w.key):
                out.append(StoredFile(p, w, f"{p}: holds the profile of {w.key}, whose file is "
                                            f"{StateDir.workload_name(w.key, self.SUFFIX)}"))
                continue
            out.append(StoredFile(p, w))
        return out

    def workloads(self) -> list[Workload]:
        """Workloads with a usable profile file (the key from each file's header)."""
        return sorted({f.workload for f in self.scan() if not f.error})

    def find(self, name: str) -> list[Workload]:
        """Workloads matching a full key, ``namespace/name``, or a bare name."""
        matches = []
        for w in self.workloads():
            if name in (w.key, w.name, f"{w.namespace}/{w.name}", f"{w.namespace}/{w.kind}/{w.name}"):
                matches.append(w)
        return matches

    def remove(self, workload: Workload) -> None:
        self.path_for(workload).unlink(missing_ok=True)

    # -- quarantine --

    def quarantine(self, path: Path, reason: str, now: float | None = None) -> Path | None:
        """Move a profile file that cannot be used out of the way, into
        ``profiles/quarantine/<UTC time>-<name>``, log it and report it to ``on_quarantine``.
        Returns where it went (None if it was already gone)."""
        stamp = _dt.datetime.fromtimestamp(time.time() if now is None else now,
                                           _dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest_dir = private_dirs(self.layout.profile_quarantine)
        dest = dest_dir / f"{stamp}-{path.name}"
        n = 1
        while os.path.lexists(dest):
            dest = dest_dir / f"{stamp}-{n}-{path.name}"
            n += 1
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return None
        log.error("profile quarantined", path=str(path), moved_to=str(dest), reason=reason)
        if self.on_quarantine is not None:
            try:
                self.on_quarantine(dest, reason)
            except Exception as e:  # noqa: BLE001 - reporting must not stop the daemon
                log.warning("quarantine report failed", error=str(e))
        return dest

    def quarantined(self) -> list[Path]:
        d = self.layout.profile_quarantine
        return sorted(d.iterdir()) if d.is_dir() else []
