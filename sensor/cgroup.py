"""cgroup v2: where it is mounted, cgroup id <-> path, safe create/remove, and container refs.

On cgroup v2 the id that BPF reports (``bpf_get_current_cgroup_id``) is the kernfs node id of
the cgroup directory, which is also its inode number. So ``os.stat(dir).st_ino`` is the id, and
an index built by walking the hierarchy maps ids back to paths.

The hierarchy may be mounted at ``/sys/fs/cgroup`` (unified) or, in hybrid mode, at
``/sys/fs/cgroup/unified``; :func:`find_cgroup2_mount` reads it from ``/proc/self/mountinfo``.

:func:`parse_container_ref` is pure: it turns a cgroup path into a :class:`ContainerRef` for the
kubelet layouts of containerd, CRI-O and docker under the systemd and cgroupfs drivers, e.g.::

    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
    /kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope[/container]
    /kubepods/besteffort/pod<uid>/<id>
    /kubepods/pod<uid>/<id>                               (guaranteed QoS)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class CgroupError(Exception):
    """A cgroup operation failed; the message names the path and the operation."""


# ---- mount discovery -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cgroup2Mount:
    mount_point: str  # where the hierarchy is visible to this process
    root: str  # which cgroup the mount shows ("/" unless bind-mounted from inside)


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_cgroup2_mount(mountinfo: str) -> Cgroup2Mount | None:
    """The cgroup2 mount in a ``/proc/<pid>/mountinfo`` text, preferring ``/sys/fs/cgroup``.

    Each line is ``id parent major:minor root mount_point options [optional...] - fstype source
    super_options``; optional fields end at the lone ``-``.
    """
    found: list[Cgroup2Mount] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= sep + 1 or fields[sep + 1] != "cgroup2":
            continue
        found.append(Cgroup2Mount(_unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[3])))
    if not found:
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        for m in found:
            if m.mount_point == preferred:
                return m
    return found[0]


def cgroup2_mount_point(mountinfo_path: str | os.PathLike = "/proc/self/mountinfo") -> Path:
    """Where cgroup v2 is mounted, read from mountinfo; :class:`CgroupError` if it is not."""
    try:
        text = Path(mountinfo_path).read_text()
    except OSError as e:
        raise CgroupError(f"read {mountinfo_path}: {e}") from e
    m = find_cgroup2_mount(text)
    if m is None:
        raise CgroupError(
            f"no cgroup2 filesystem in {mountinfo_path}; mount one with "
            "`mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid) or boot with "
            "systemd.unified_cgroup_hierarchy=1")
    return Path(m.mount_point)


# ---- ids and paths ---------------------------------------------------------------------------


def cgroup_id(path: str | os.PathLike) -> int:
    """The cgroup v2 id of a cgroup directory (its inode number)."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise CgroupError(f"stat cgroup {path}: {e}") from e


def cgroup_id_from_handle(path: str | os.PathLike) -> int:
    """The kernel's cgroup id of ``path`` from its file handle (``name_to_handle_at``).

    For kernfs the handle is the 64-bit node id, the value ``bpf_get_current_cgroup_id``
    returns; this checks, independently of ``stat``, that the inode rule holds here."""
    import ctypes

    from .libc import LIBC

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                    ("f_handle", ctypes.c_ubyte * 8)]

    fh = FileHandle(8, 0)
    mount_id = ctypes.c_int(0)
    AT_FDCWD = -100
    rc = LIBC.name_to_handle_at(AT_FDCWD, os.fsencode(str(path)), ctypes.byref(fh),
                                ctypes.byref(mount_id), 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise CgroupError(f"name_to_handle_at {path}: {os.strerror(err)}")
    if fh.handle_bytes != 8:
        raise CgroupError(f"name_to_handle_at {path}: unexpected handle size {fh.handle_bytes}")
    return int.from_bytes(bytes(fh.f_handle), "little")


def parse_proc_cgroup(text: str) -> str | None:
    """The unified-hierarchy path from a ``/proc/<pid>/cgroup`` text (its ``0::`` line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def normalize_rel(rel: str) -> str:
    """``/a/b`` form of a cgroup path; refuses ``..`` so joins stay inside the hierarchy."""
    parts = [p for p in str(rel).split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise CgroupError(f"cgroup path {rel!r} leaves the hierarchy")
    return "/" + "/".join(parts)


class CgroupFS:
    """One cgroup v2 hierarchy: id/path lookups and safe create/move/remove under it."""

    def __init__(self, mount_point: str | os.PathLike | None = None,
                 proc_root: str | os.PathLike = "/proc"):
        self.root = Path(mount_point) if mount_point is not None else cgroup2_mount_point()
        self.proc_root = Path(proc_root)
        self._by_id: dict[int, str] = {}
        self._owned: dict[str, int] = {}  # cgroup path -> fd holding its ownership lock
        self.walks = 0  # how many full walks were made (index rebuilds)

    # -- paths --

    def abspath(self, rel: str) -> Path:
        rel = normalize_rel(rel)
        return self.root / rel.lstrip("/") if rel != "/" else self.root

    def relpath(self, path: str | os.PathLike) -> str:
        p = Path(path)
        try:
            return normalize_rel(str(p.relative_to(self.root)))
        except ValueError:
            raise CgroupError(f"{path} is not under the cgroup2 mount {self.root}") from None

    def id_of(self, rel: str) -> int:
        cid = cgroup_id(self.abspath(rel))
        self._by_id[cid] = normalize_rel(rel)
        return cid

    # -- index --

    def rebuild_index(self) -> int:
        """Walk the hierarchy and map every cgroup id to its path; returns how many."""
        index: dict[int, str] = {}
        root = str(self.root)
        try:
            index[os.stat(root).st_ino] = "/"
        except OSError as e:
            raise CgroupError(f"stat cgroup2 root {root}: {e}") from e
        stack = [(root, "")]
        while stack:
            d, rel = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue  # removed while walking
            with it:
                for ent in it:
                    try:
                        if not ent.is_dir(follow_symlinks=False):
                            continue
                        ino = ent.inode()
                    except OSError:
                        continue
                    child = f"{rel}/{ent.name}"
                    index[ino] = child
                    stack.append((ent.path, child))
        self._by_id = index
        self.walks += 1
        return len(index)

    def path_of(self, cid: int, rebuild: bool = True) -> str | None:
        """The path of cgroup ``cid``, relative to the mount, or None if it does not exist.

        A hit is checked against the filesystem (ids are not reused while a cgroup exists, but a
        cached path may since have been removed and recreated under a new id)."""
        rel = self._by_id.get(cid)
        if rel is not None and self._still(rel, cid):
            return rel
        if not rebuild:
            return None
        self.rebuild_index()
        return self._by_id.get(cid)

    def _still(self, rel: str, cid: int) -> bool:
        try:
            return os.stat(self.abspath(rel)).st_ino == cid
        except (OSError, CgroupError):
            return False

    # -- processes --

    def pid_cgroup(self, pid: int) -> tuple[str, int] | None:
        """(path, id) of the unified cgroup of ``pid``, or None if the pid is gone.

        The ``0::`` path is relative to the reader's cgroup namespace; the id is read from the
        directory it names, and a path that does not resolve (another namespace) gives None."""
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        rel = parse_proc_cgroup(text)
        if rel is None or "/.." in rel or rel.startswith(".."):
            return None
        try:
            cid = cgroup_id(self.abspath(rel))
        except CgroupError:
            return None
        rel = normalize_rel(rel)
        self._by_id[cid] = rel
        return rel, cid

    def procs(self, rel: str) -> list[int]:
        try:
            text = (self.abspath(rel) / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CgroupError(f"read {self.abspath(rel)}/cgroup.procs: {e}") from e
        return [int(x) for x in text.split()]

    # -- create / move / remove --

    def make(self, rel: str) -> tuple[Path, int]:
        """Create cgroup ``rel`` (and missing parents) and own it; returns (absolute path, id).

        Owning is an exclusive ``flock`` on the cgroup's directory, held by this process (the
        descriptor is close-on-exec, so the workload never holds it) until :meth:`remove` or
        the process's death: :func:`reap_orphans` takes a cgroup whose lock is free for one
        whose owner died."""
        path = self.abspath(rel)
        if path == self.root:
            raise CgroupError("refusing to create the cgroup2 root")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CgroupError(f"mkdir cgroup {path}: {e}") from e
        key = normalize_rel(rel)
        if key not in self._owned:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise CgroupError(f"own cgroup {path}: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._owned[key] = fd
            except BlockingIOError:  # made and owned by someone else already: theirs
                os.close(fd)
        cid = cgroup_id(path)
        self._by_id[cid] = key
        return path, cid

    def disown(self, rel: str) -> None:
        """Give up the ownership lock of a cgroup this process made (done with it)."""
        fd = self._owned.pop(normalize_rel(rel), None)
        if fd is not None:
            os.close(fd)

    def move(self, rel: str, pid: int) -> None:
        """Move ``pid`` (and, as the kernel does, only that thread group) into cgroup ``rel``."""
        procs = self.abspath(rel) / "cgroup.procs"
        try:
            with open(procs, "w") as f:
                f.write(str(pid))
        except OSError as e:
            raise CgroupError(f"move pid {pid} into {procs}: {e}") from e

    def kill_all(self, rel: str) -> None:
        """SIGKILL every process in ``rel`` and its descendants."""
        path = self.abspath(rel)
        kill = path / "cgroup.kill"
        if kill.exists():  # kernel >= 5.14: one write kills the whole subtree
            try:
                kill.write_text("1")
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                log.debug("cgroup.kill failed, falling back to signals", path=str(path), error=str(e))
        for dirpath, _dirs, _files in os.walk(path):
            sub = self.relpath(dirpath)
            for pid in self.procs(sub):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self, rel: str, retries: int = 50, delay: float = 0.02, kill: bool = True) -> None:
        """Kill everything in ``rel`` (if ``kill``) and remove it and its children.

        rmdir of a cgroup fails with EBUSY until its last task has exited; exited tasks leave
        asynchronously, so retry. A missing cgroup is not an error."""
        path = self.abspath(rel)
        if path == self.root:
            raise CgroupError("refusing to remove the cgroup2 root")
        last: OSError | None = None
        for attempt in range(retries):
            if not path.exists():
                self.disown(rel)
                return
            if kill:
                try:
                    self.kill_all(rel)
                except CgroupError as e:
                    log.debug("kill_all failed", path=str(path), error=str(e))
            try:
                for dirpath, dirs, _ in os.walk(path, topdown=False):
                    for d in dirs:
                        _rmdir(Path(dirpath) / d)
                _rmdir(path)
                self.disown(rel)
                return
            except OSError as e:
                last = e
                time.sleep(delay * min(attempt + 1, 10))
        raise CgroupError(f"remove cgroup {path}: still busy after {retries} attempts: {last}")

    def remove_empty_parents(self, rel: str, stop: str = "/") -> None:
        """rmdir the parents of ``rel`` up to (not including) ``stop`` while they are empty."""
        parts = normalize_rel(rel).strip("/").split("/")
        stop_n = normalize_rel(stop)
        for i in range(len(parts) - 1, 0, -1):
            parent = "/" + "/".join(parts[:i])
            if parent == stop_n or not (parent + "/").startswith(stop_n.rstrip("/") + "/"):
                break
            try:
                os.rmdir(self.abspath(parent))
            except FileNotFoundError:
                continue
            except OSError:
                break


#: An empty cgroup younger than this is left to its maker, who may not have locked it yet.
ORPHAN_GRACE = 60.0


def _populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] == "1"
    except OSError:
        pass
    return False


def reap_orphans(prefix: str, cgfs: CgroupFS | None = None, grace: float = ORPHAN_GRACE) -> list[str]:
    """Kill and remove every cgroup directly under ``prefix`` whose owner is gone: no process
    holds its ownership lock (see :meth:`CgroupFS.make`), so whatever runs in it was left
    behind by a recorder or launcher that died (``kill -9``). Everything in it is killed with
    one ``cgroup.kill`` write (the whole subtree), then it is removed. An empty cgroup younger
    than ``grace`` seconds is left alone (its maker may be about to lock it); one with
    processes in it was locked before they were moved in, so a free lock means an orphan.
    Returns the cgroups reaped (relative paths). The one orphan reaper: ``envelope record``
    (prefix ``/envelope.record``) and ``envelope exec`` call it at start."""
    cgfs = cgfs or CgroupFS()
    base = cgfs.abspath(prefix)
    try:
        children = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CgroupError(f"list cgroups under {base}: {e}") from e
    reaped = []
    for name in children:
        rel = normalize_rel(f"{prefix}/{name}")
        if rel in cgfs._owned:
            continue
        path = base / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            populated = _populated(path)
            if not populated and time.time() - os.fstat(fd).st_ctime < grace:
                continue
            log.warning("reaping orphaned cgroup: its owner died", cgroup=rel, populated=populated)
            try:
                cgfs.remove(rel)
            except CgroupError as e:
                log.error("orphaned cgroup not reaped", cgroup=rel, error=str(e))
                continue
            reaped.append(rel)
        finally:
            os.close(fd)
    return reaped


#: Where ``envelope exec`` and ``envelope record`` make their commands' cgroups.
COMMAND_PARENTS = ("/envelope", "/envelope.record")


def reap_command_orphans(cgfs: CgroupFS | None = None) -> list[str]:
    """:func:`reap_orphans` for every command parent (what exec, record and the daemon do when
    they start)."""
    cgfs = cgfs or CgroupFS()
    out: list[str] = []
    for parent in COMMAND_PARENTS:
        out += reap_orphans(parent, cgfs)
    return out


class OrphanGuard:
    """Kills cgroup ``rel`` (``cgroup.kill``) and removes it if its owner dies before
    :meth:`release`: a forked process that waits on a pipe only the owner holds. An owner
    killed with SIGKILL closes the pipe without writing, and the guard ends what it left behind
    at once; :meth:`CgroupFS.reap_orphans` at the next start is the fallback when the guard
    was killed too. Fork it before the owner holds anything the guard should not inherit."""

    def __init__(self, cgfs: "CgroupFS", rel: str):
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the guard: no Python-level cleanup may run here
            try:
                os.close(wfd)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_IGN)
                os.setsid()  # out of the owner's process group and terminal
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # hold none of the owner's pipes open
                    os.dup2(null, fd)
                os.closerange(3, rfd)
                os.closerange(rfd + 1, 1 << 16)
                while True:
                    try:
                        said = os.read(rfd, 1)
                        break
                    except InterruptedError:
                        continue
                if not said:  # the owner is gone without a word
                    try:
                        CgroupFS(cgfs.root).remove(rel)  # a view that owns nothing of the owner's
                    except Exception:  # noqa: BLE001 - the next start reaps it
                        pass
            finally:
                os._exit(0)
        os.close(rfd)
        self.pid = pid
        self._wfd: int | None = wfd

    def release(self) -> None:
        """The owner cleaned up itself: the guard exits without acting."""
        if self._wfd is None:
            return
        try:
            os.write(self._wfd, b"x")
        finally:
            os.close(self._wfd)
            self._wfd = None
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _rmdir(p: Path) -> None:
    try:
        os.rmdir(p)
    except FileNotFoundError:
        pass


# ---- container refs from cgroup paths (pure) -----------------------------------------------

_UID = (r"(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
        r"|[0-9a-f]{32})")
_CID = r"(?P<cid>[0-9a-f]{64})"
_QOS = r"(?P<qos>burstable|besteffort)"

# systemd driver: [<root>-]kubepods[-<qos>]-pod<uid>.slice (kubelet escapes '-' in the uid as '_')
_SYSTEMD_POD = re.compile(rf"^(?:[\w.-]*-)?kubepods(?:-{_QOS})?-pod{_UID}\.slice$")
# containerd with SystemdCgroup on a cgroupfs kubelet (v1 era): one component
#   kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>
_SYSTEMD_COLON = re.compile(
    rf"^(?:[\w.-]*-)?kubepods(?:-{_QOS})?-pod{_UID}\.slice:(?P<rt>cri-containerd|crio|docker):{_CID}$")
_SYSTEMD_CONTAINER = re.compile(rf"^(?P<rt>cri-containerd|crio|docker)-{_CID}\.scope$")
# cgroupfs driver: .../kubepods[/<qos>]/pod<uid>/<id>
_CGROUPFS_POD = re.compile(rf"^pod{_UID}$")
_CGROUPFS_CONTAINER = re.compile(rf"^(?:(?P<rt>crio|docker|cri-containerd)-)?{_CID}$")
_CONMON = re.compile(rf"^crio-conmon-{_CID}(?:\.scope)?$")

RUNTIME_OF_PREFIX = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class ContainerRef:
    """A Kubernetes container as its cgroup path shows it.

    ``runtime`` is ``containerd``, ``cri-o`` or ``docker`` when the path says so, and ``""``
    for the cgroupfs layout, whose leaf is the bare id. ``qos`` is ``guaranteed``,
    ``burstable`` or ``besteffort``. ``pod_uid`` has its dashes restored."""

    runtime: str
    container_id: str
    pod_uid: str
    qos: str
    cgroup_path: str

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "container_id": self.container_id,
                "pod_uid": self.pod_uid, "qos": self.qos, "cgroup_path": self.cgroup_path}


def _uid(raw: str) -> str:
    return raw.replace("_", "-")


def parse_container_ref(path: str) -> ContainerRef | None:
    """The container a cgroup path belongs to, or None for non-container cgroups.

    Pod-level cgroups, CRI-O's ``crio-conmon-<id>`` monitor cgroups and anything outside a
    kubepods hierarchy give None. Sub-cgroups below a container (CRI-O with crun puts the
    processes in ``crio-<id>.scope/container``) belong to that container.
    """
    parts = [p for p in path.split("/") if p]
    for i, comp in enumerate(parts):
        m = _SYSTEMD_COLON.match(comp)
        if m:
            return ContainerRef(RUNTIME_OF_PREFIX[m["rt"]], m["cid"], _uid(m["uid"]),
                                m["qos"] or "guaranteed", path)
        m = _SYSTEMD_POD.match(comp)
        if m and i + 1 < len(parts):
            leaf = parts[i + 1]
            if _CONMON.match(leaf):
                return None
            c = _SYSTEMD_CONTAINER.match(leaf)
            if c:
                return ContainerRef(RUNTIME_OF_PREFIX[c["rt"]], c["cid"], _uid(m["uid"]),
                                    m["qos"] or "guaranteed", path)
            return None
        m = _CGROUPFS_POD.match(comp)
        if m and i + 1 < len(parts):
            qos = "guaranteed"
            if i >= 1 and parts[i - 1] in ("burstable", "besteffort"):
                qos = parts[i - 1]
                anchor = i - 2
            else:
                anchor = i - 1
            if anchor < 0 or not parts[anchor].endswith("kubepods"):
                continue
            leaf = parts[i + 1]
            if _CONMON.match(leaf):
                return None
            c = _CGROUPFS_CONTAINER.match(leaf)
            if c:
                rt = RUNTIME_OF_PREFIX[c["rt"]] if c["rt"] else ""
                return ContainerRef(rt, c["cid"], _uid(m["uid"]), qos, path)
            return None
    return None


def host_unit_name(path: str) -> str:
    """A stable host workload name for a non-container cgroup.

    The innermost systemd unit (``ssh.service``, ``session-3.scope``, ``user@1000.service``)
    when the path has one; CRI-O monitor cgroups collapse to ``crio-conmon``; otherwise the
    path itself (``/`` for the root)."""
    parts = [p for p in path.split("/") if p]
    for comp in reversed(parts):
        if _CONMON.match(comp):
            return "crio-conmon"
        if comp.endswith((".service", ".scope")):
            return comp
    if parts and parts[-1].endswith(".slice"):
        return parts[-1]
    return "/" + "/".join(parts)
