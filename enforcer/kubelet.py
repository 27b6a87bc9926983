"""Compiled seccomp profiles in the kubelet's seccomp directory, for ``type: Localhost``.

A workload's profile goes to ``<kubelet seccomp dir>/envelope/<namespace>/<file>.json`` where
``<file>`` is ``<kind>_<name>_<container>`` (kind lowered; ``_`` cannot occur in Kubernetes
names, so the three parts never run together ambiguously). The pod spec refers to it by the
path relative to the seccomp dir, :func:`localhost_profile`::

    securityContext:
      seccompProfile:
        type: Localhost
        localhostProfile: envelope/agents/deployment_research-agent_main.json

Changing the pod spec is the user's rollout: Envelope writes the file on every node and reports
the value in the policy status; the kubelet reads the file when it starts a container.

Safety: the host root and the kubelet dir are trusted configuration. Below them, every
directory is opened relative to its parent with ``O_NOFOLLOW``, so a symlink planted under
``envelope/`` cannot redirect a write outside it; names are checked against the Kubernetes
name rules before any path is built. Writes are atomic: a temporary file in the same directory,
fsync, rename over the old file, fsync of the directory; an unchanged profile is not rewritten.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import structlog

from sensor.workload import Workload

log = structlog.get_logger("envelope.kubelet")

SUBDIR = "envelope"
NAME_MAX = 255
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_NOFOLLOW = _O_DIR | os.O_NOFOLLOW


class SeccompWriteError(Exception):
    """A profile that cannot be written, read or removed; the message names the workload and path."""


def _check_workload(w: Workload) -> None:
    if not (len(w.namespace) <= 63 and _DNS_LABEL.match(w.namespace)):
        raise SeccompWriteError(f"{w.key}: namespace {w.namespace!r} is not a Kubernetes namespace name")
    if not (len(w.name) <= 253 and _DNS_SUBDOMAIN.match(w.name)) or ".." in w.name:
        raise SeccompWriteError(f"{w.key}: name {w.name!r} is not a Kubernetes object name")
    if not (len(w.container) <= 63 and _DNS_LABEL.match(w.container)):
        raise SeccompWriteError(f"{w.key}: container {w.container!r} is not a Kubernetes container name")
    if not _KIND.match(w.kind):
        raise SeccompWriteError(f"{w.key}: kind {w.kind!r} is not a Kubernetes kind")


def profile_filename(workload: Workload) -> str:
    """``<kind>_<name>_<container>.json``; a name too long for one path component is cut and
    given a hash of the workload key."""
    _check_workload(workload)
    kind = workload.kind.lower()
    name = f"{kind}_{workload.name}_{workload.container}.json"
    if len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(workload.key.encode()).hexdigest()[:16]
    room = NAME_MAX - len(f"{kind}__{workload.container}.json") - len(digest) - 1
    return f"{kind}_{workload.name[:room].rstrip('.-')}-{digest}_{workload.container}.json"


def localhost_profile(workload: Workload) -> str:
    """The pod spec's ``seccompProfile.localhostProfile`` value for ``workload``."""
    return f"{SUBDIR}/{workload.namespace}/{profile_filename(workload)}"


def render(profile: Any) -> bytes:
    """The bytes written for a compiled profile: a ``CompiledSeccomp`` (its ``to_json()``), an
    OCI seccomp mapping (sorted, indented JSON), or JSON text/bytes taken as they are."""
    if hasattr(profile, "to_json"):
        data = profile.to_json()
    elif isinstance(profile, Mapping):
        data = json.dumps(profile, indent=2, sort_keys=True) + "\n"
    elif isinstance(profile, (str, bytes)):
        data = profile
    else:
        raise SeccompWriteError(f"not a seccomp profile: {type(profile).__name__}")
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SeccompWriteError(f"seccomp profile is not JSON: {e}") from None
    if not isinstance(doc, dict) or "defaultAction" not in doc:
        raise SeccompWriteError("seccomp profile has no defaultAction (want an OCI linux.seccomp object)")
    return raw


def join_under(root: Path, path: Path | str) -> Path:
    """``path`` (absolute on the host) seen from ``root`` (where the host's / is mounted),
    refusing ``..`` components."""
    p = PurePosixPath(path)
    if ".." in p.parts:
        raise SeccompWriteError(f"{path}: '..' is not allowed in a host path")
    rel = p.relative_to("/") if p.is_absolute() else p
    return Path(root) / rel


@dataclass(frozen=True)
class WriteResult:
    workload: Workload
    path: Path
    localhost_profile: str
    digest: str  # sha256:<hex> of the file's bytes
    changed: bool


class KubeletSeccompDir:
    """The ``envelope/`` part of one kubelet seccomp directory, seen from ``host_root``."""

    def __init__(self, host_root: Path | str = "/", kubelet_seccomp_dir: Path | str = "/var/lib/kubelet/seccomp"):
        self.root = join_under(Path(host_root), kubelet_seccomp_dir)

    @classmethod
    def from_config(cls, config) -> "KubeletSeccompDir":
        return cls(config.host_root, config.kubelet_seccomp_dir)

    def path_of(self, workload: Workload) -> Path:
        return self.root / localhost_profile(workload)

    # ---- directory walking -------------------------------------------------------------------

    def _open_root(self, create: bool) -> int | None:
        try:
            if create:
                self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            return os.open(self.root, _O_DIR)
        except OSError as e:
            if e.errno == errno.ENOENT and not create:
                return None
            raise SeccompWriteError(f"{self.root}: cannot open the kubelet seccomp dir: {e.strerror}") from e

    def _open_sub(self, dirfd: int, name: str, where: Path, create: bool) -> int | None:
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=dirfd)
            except FileExistsError:
                pass
            except OSError as e:
                raise SeccompWriteError(f"{where / name}: cannot create: {e.strerror}") from e
        try:
            return os.open(name, _O_DIR_NOFOLLOW, dir_fd=dirfd)
        except FileNotFoundError:
            if create:
                raise SeccompWriteError(f"{where / name}: vanished while opening") from None
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SeccompWriteError(f"{where / name}: is a symlink or not a directory; refusing") from e
            raise SeccompWriteError(f"{where / name}: cannot open: {e.strerror}") from e

    def _open_ns_dir(self, namespace: str, create: bool) -> int | None:
        root = self._open_root(create)
        if root is None:
            return None
        try:
            top = self._open_sub(root, SUBDIR, self.root, create)
        finally:
            os.close(root)
        if top is None:
            return None
        try:
            return self._open_sub(top, namespace, self.root / SUBDIR, create)
        finally:
            os.close(top)

    @staticmethod
    def _read_at(dirfd: int, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except (FileNotFoundError, OSError):
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError:
            return None

    # ---- operations --------------------------------------------------------------------------

    def write(self, workload: Workload, profile: Any) -> WriteResult:
        """Write ``workload``'s compiled profile atomically; unchanged content is left alone."""
        fname = profile_filename(workload)
        data = render(profile)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.path_of(workload)
        d = self._open_ns_dir(workload.namespace, create=True)
        try:
            if self._read_at(d, fname) == data:
                return WriteResult(workload, path, localhost_profile(workload), digest, changed=False)
            tmp = f".{fname[:200]}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=d)
                try:
                    os.fchmod(fd, 0o644)  # whatever the umask
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, fname, src_dir_fd=d, dst_dir_fd=d)
                os.fsync(d)
            except OSError as e:
                try:
                    os.unlink(tmp, dir_fd=d)
                except OSError:
                    pass
                raise SeccompWriteError(f"{workload.key}: cannot write {path}: {e.strerror}") from e
        finally:
            os.close(d)
        log.info("seccomp profile written", workload=workload.key, path=str(path), digest=digest)
        return WriteResult(workload, path, localhost_profile(workload), digest, changed=True)

    def read(self, workload: Workload) -> bytes | None:
        d = self._open_ns_dir(workload.namespace, create=False)
        if d is None:
            return None
        try:
            return self._read_at(d, profile_filename(workload))
        finally:
            os.close(d)

    def remove(self, workload: Workload) -> bool:
        """Delete ``workload``'s profile (and its namespace dir once empty). True if one was there."""
        d = self._open_ns_dir(workload.namespace, create=False)
        if d is None:
            return False
        try:
            os.unlink(profile_filename(workload), dir_fd=d)
            removed = True
        except FileNotFoundError:
            removed = False
        except OSError as e:
            raise SeccompWriteError(f"{workload.key}: cannot remove {self.path_of(workload)}: {e.strerror}") from e
        finally:
            os.close(d)
        self._remove_empty(workload.namespace)
        return removed

    def _remove_empty(self, namespace: str) -> None:
        root = self._open_root(create=False)
        if root is None:
            return
        try:
            top = self._open_sub(root, SUBDIR, self.root, create=False)
            if top is None:
                return
            try:
                os.rmdir(namespace, dir_fd=top)
            except OSError:
                pass  # not empty, or gone
            finally:
                os.close(top)
        finally:
            os.close(root)

    def installed(self) -> list[str]:
        """Every ``localhostProfile`` value present under ``envelope/``, sorted."""
        out: list[str] = []
        root = self._open_root(create=False)
        if root is None:
            return out
        try:
            top = self._open_sub(root, SUBDIR, self.root, create=False)
        finally:
            os.close(root)
        if top is None:
            return out
        try:
            for ns in sorted(os.listdir(top)):
                if not _DNS_LABEL.match(ns):
                    continue
                try:
                    d = self._open_sub(top, ns, self.root / SUBDIR, create=False)
                except SeccompWriteError:
                    continue  # a symlink planted here is not ours
                if d is None:
                    continue
                try:
                    out += [f"{SUBDIR}/{ns}/{f}" for f in sorted(os.listdir(d))
                            if f.endswith(".json") and not f.startswith(".")]
                finally:
                    os.close(d)
        finally:
            os.close(top)
        return out

    def write_all(self, profiles: Mapping[Workload, Any]) -> tuple[list[WriteResult], dict[Workload, str]]:
        """Write each workload's profile; one failure does not stop the others."""
        done: list[WriteResult] = []
        failed: dict[Workload, str] = {}
        for w in sorted(profiles):
            try:
                done.append(self.write(w, profiles[w]))
            except SeccompWriteError as e:
                failed[w] = str(e)
                log.warning("seccomp profile not written", workload=w.key, error=str(e))
        return done, failed

    def prune(self, keep: Iterable[Workload]) -> list[str]:
        """Remove profiles under ``envelope/`` of workloads not in ``keep``; returns what went."""
        wanted = {localhost_profile(w) for w in keep}
        gone = []
        for value in self.installed():
            if value in wanted:
                continue
            _, ns, fname = value.split("/", 2)
            d = self._open_ns_dir(ns, create=False)
            if d is None:
                continue
            try:
                os.unlink(fname, dir_fd=d)
                gone.append(value)
            except OSError as e:
                log.warning("stale seccomp profile not removed", profile=value, error=e.strerror)
            finally:
                os.close(d)
            self._remove_empty(ns)
        return gone
