"""The state directory: where everything Envelope keeps on a node lives, and how it is written
and read.

One :class:`StateDir` names every path; nothing else joins names onto the state directory::

    <state-dir>/                            0700, like every directory below it
      profiles/<workload>.msgpack           per-workload profiles (sensor.store)
      profiles/.<workload>.lock             the lock writers of one profile take (sensor.store)
      profiles/archive/<UTC time>/          profiles set aside by a re-baseline
      profiles/quarantine/                  profile files that could not be read, set aside
      enforce/<workload>.yaml               desired enforcement states (enforcer.desired)
      enforce/modes/<workload>.json         per-workload mode and re-baseline (enforcer.state)
      enforce/exceptions.json               exceptions (enforcer.exceptions)
      enforce/.lock                         the lock for read-modify-write changes
      violations.jsonl                      violations (enforcer.violations)
      audit.jsonl, audit.head               the hash-chained audit log (enforcer.audit)
      keys/audit.key                        the audit log's HMAC key (0600)
      cluster/                              what the cluster side remembers across restarts
      sensor.key                            the sensor's key for hashing AWS access key ids (0600)

``<workload>`` is a file name made from the workload key (:meth:`StateDir.workload_name`): the
percent-quoted key when it is short enough, else a readable prefix of it and the SHA-256 of the
whole key. Either way a name is at most :data:`MAX_NAME` bytes and two keys never share one.
The name is only where a file lives: readers take the workload key from the file's content and
refuse a file whose name is not the one its content's key gives.

Writes: :func:`atomic_write` is the one way files here are written (a reader sees the old file or
the new one, never a mix); files are created 0600 and missing directories 0700, whatever the
umask (:func:`private_dirs`).

Reads: :func:`read_trusted` is how the daemon reads a file it acts on (a desired state, a mode,
the exceptions, a profile): the file must be a regular file with one link, owned by root (or
by the user running Envelope), and writable by nobody else, and so must every directory from it
up to the state directory. Anything else raises :class:`UntrustedFileError`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

import structlog

log = structlog.get_logger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
#: The longest file name made from a workload key. Under the 255 bytes of NAME_MAX, leaving
#: room for what is added to a name: ``atomic_write``'s temporary ``.<name>.XXXXXXXX`` and a
#: quarantined file's ``<UTC time>-`` prefix.
MAX_NAME = 200
#: Separates the readable prefix from the digest in a hashed name. ``quote(key, safe="")``
#: always escapes "+", so a hashed name never equals the quoted form of another key.
_HASHED = "+"


class UntrustedFileError(OSError):
    """A state file or directory that someone other than root (or the running user) could have
    written; the message names the path and what is wrong with it."""


def trusted_uids() -> frozenset[int]:
    """Owners whose files Envelope acts on: root, and the user running it."""
    return frozenset({0, os.geteuid()})


def _read_only(path: str | os.PathLike | int) -> bool:
    """Whether the filesystem holding ``path`` is mounted read-only (then nobody can write what
    is on it, whatever the modes say: a ConfigMap volume, for one)."""
    try:
        return bool((os.fstatvfs(path) if isinstance(path, int) else os.statvfs(path)).f_flag
                    & os.ST_RDONLY)
    except OSError:
        return False


def untrusted(st: os.stat_result, *, directory: bool, allow_sticky: bool = False,
              read_only: bool = False) -> str | None:
    """What makes a file or directory untrusted (someone but root could have written it), or
    None."""
    if st.st_uid not in trusted_uids():
        return f"owned by uid {st.st_uid}, not root"
    writable = 0 if read_only else st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (directory and allow_sticky and st.st_mode & stat.S_ISVTX):
        return f"writable by {'group and others' if writable == 0o022 else 'group' if writable == 0o020 else 'others'} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_dirs(path: Path, root: Path | None) -> None:
    """Every directory from ``path``'s parent up to ``root`` (inclusive), and the ancestors of
    ``root``, must be owned by a trusted user and not writable by others; ancestors of ``root``
    may be sticky world-writable directories such as ``/tmp`` (others cannot rename what is in
    them). Raises :class:`UntrustedFileError`."""
    path = Path(os.path.abspath(path))
    root = Path(os.path.abspath(root)) if root is not None else path.parent
    d = path.parent
    inside = True
    while True:
        try:
            st = os.lstat(d)
        except OSError as e:
            raise UntrustedFileError(e.errno, f"{d}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode) and inside:
            raise UntrustedFileError(f"{d}: a symbolic link inside the state directory")
        why = untrusted(st, directory=True, allow_sticky=not inside, read_only=_read_only(d))
        if why:
            raise UntrustedFileError(f"{d}: directory {why}; fix: chown root and chmod go-w")
        if d == root:
            inside = False
        if d.parent == d:
            return
        d = d.parent


def read_trusted(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                 follow: bool = False) -> bytes:
    """The content of a file the daemon acts on, once it is known nobody else could have
    written it (see the module docstring). ``root`` is the state directory the file lives in
    (default: its parent). ``follow`` allows a symbolic link as the last component (a ConfigMap
    mount links ``config.yaml`` into a ``..data`` directory); the file it names is checked.

    Raises :class:`FileNotFoundError` when there is no file and :class:`UntrustedFileError`
    when it is not trusted."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symbolic link
            raise UntrustedFileError(e.errno, f"{path}: a symbolic link; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError(f"{path}: not a regular file; refused")
        why = untrusted(st, directory=False, read_only=_read_only(fd))
        if why:
            raise UntrustedFileError(f"{path}: {why}; refused (fix: chown root and chmod 600 "
                                     f"after checking its content)")
        if st.st_nlink != 1 and not follow:
            raise UntrustedFileError(f"{path}: has {st.st_nlink} hard links; refused")
        check_dirs(Path(os.path.realpath(path)) if follow else path, root)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def private_dirs(path: str | os.PathLike) -> Path:
    """Make ``path`` and its missing parents directories of mode 0700, whatever the umask.
    Existing directories are left as they are (:meth:`StateDir.secure` tightens the state
    directory's own)."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            continue  # made by a concurrent writer
        os.chmod(d, PRIVATE_DIR)
    return path


def _tighten(path: Path) -> None:
    """A state directory that others could write is made 0700 when it is ours, and refused
    (:class:`UntrustedFileError`) when it is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedFileError(f"{path}: not a directory")
    if st.st_uid not in trusted_uids():
        raise UntrustedFileError(f"{path}: directory owned by uid {st.st_uid}, not root; refused")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IRWXO):
        os.chmod(path, PRIVATE_DIR)
        log.warning("state directory was open to others; tightened to 0700", path=str(path),
                    mode=f"{stat.S_IMODE(st.st_mode):04o}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a mix:
    a temporary file (0600) in the same directory, fsync, rename, fsync the directory. Missing
    directories are made 0700."""
    path = Path(path)
    private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


KEY_BYTES = 32


def read_or_create_key(path: Path) -> bytes:
    """The secret key at ``path``, made (random, mode 0600) when there is none: the same key
    across restarts keeps hashes of the same access key id equal."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if len(data) >= KEY_BYTES:
            return data[:KEY_BYTES]
    except FileNotFoundError:
        pass
    key = os.urandom(KEY_BYTES)
    atomic_write(path, key)  # mkstemp makes the file 0600
    try:
        return path.read_bytes()[:KEY_BYTES]  # another writer may have won the race: use its key
    except OSError:
        return key


class StateDir:
    """The layout of one state directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r})"

    # -- workload file names --

    @staticmethod
    def workload_name(workload_key: str, suffix: str) -> str:
        """The file name for ``workload_key``: its percent-quoted form, or, when that would be
        longer than :data:`MAX_NAME` bytes, a prefix of it, ``+`` and the key's SHA-256."""
        quoted = quote(workload_key, safe="")
        if len(quoted) + len(suffix) <= MAX_NAME:
            return quoted + suffix
        digest = hashlib.sha256(workload_key.encode()).hexdigest()
        room = MAX_NAME - len(suffix) - len(digest) - len(_HASHED)
        prefix = quoted[:room]
        cut = prefix.rfind("%", max(len(prefix) - 2, 0))
        if cut >= 0:  # do not end inside a %XX escape
            prefix = prefix[:cut]
        return f"{prefix}{_HASHED}{digest}{suffix}"

    @staticmethod
    def workload_of(filename: str, suffix: str) -> str | None:
        """The workload key a short (unhashed) file name was made from; None for a hashed name
        or a name that is not such a file (readers take the key from the content)."""
        if not filename.endswith(suffix) or filename.startswith(".") or _HASHED in filename:
            return None
        return unquote(filename[: -len(suffix)])

    @classmethod
    def names_key(cls, filename: str, suffix: str, workload_key: str) -> bool:
        """Whether ``filename`` is the name ``workload_key``'s file has (a file found under
        another workload's name is not trusted as that workload's)."""
        return filename == cls.workload_name(workload_key, suffix)

    def secure(self) -> None:
        """Make the state directory and every directory of its layout that exists 0700 (they
        may come from an older version, or from a mkdir under a loose umask); refuse one that
        belongs to someone else."""
        for d in (self.root, self.profiles, self.profile_archive, self.profile_quarantine,
                  self.enforce, self.modes, self.keys, self.cluster, self.outbox):
            _tighten(d)

    def read(self, path: str | os.PathLike) -> bytes:
        """:func:`read_trusted` for a file inside this state directory."""
        return read_trusted(path, self.root)

    # -- paths --

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def profile_archive(self) -> Path:
        return self.profiles / "archive"

    @property
    def profile_quarantine(self) -> Path:
        return self.profiles / "quarantine"

    @property
    def enforce(self) -> Path:
        return self.root / "enforce"

    @property
    def modes(self) -> Path:
        return self.enforce / "modes"

    @property
    def exceptions(self) -> Path:
        return self.enforce / "exceptions.json"

    @property
    def lock(self) -> Path:
        return self.enforce / ".lock"

    @property
    def violations(self) -> Path:
        return self.root / "violations.jsonl"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def audit_head(self) -> Path:
        return self.root / "audit.head"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def audit_key(self) -> Path:
        return self.keys / "audit.key"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def sensor_key(self) -> Path:
        return self.root / "sensor.key"

    def profile(self, workload_key: str) -> Path:
        return self.profiles / self.workload_name(workload_key, ".msgpack")

    def profile_lock(self, workload_key: str) -> Path:
        return self.profiles / ("." + self.workload_name(workload_key, ".lock"))

    def desired(self, workload_key: str) -> Path:
        return self.enforce / self.workload_name(workload_key, ".yaml")

    def mode(self, workload_key: str) -> Path:
        return self.modes / self.workload_name(workload_key, ".json")
