"""The runtimes' container state, read as it appears, so that a short-lived container keeps its
identity however late the daemon gets to its cgroup.

A container's OCI annotations (its pod, namespace and container name) are in the runtime's state
only from ``create`` to ``delete``: a container that runs for milliseconds may be gone, state and
all, before the daemon's loop reads its first event, and its evidence would stay under an
unresolved identity. :class:`RuntimeWatch` watches the runtimes' state roots
(runc's, containerd's and docker's runc roots, containerd's task bundles, CRI-O's userdata:
those :class:`sensor.identity.RuntimeState` reads) with
inotify on a thread of its own: for each new container directory it reads the annotations as
soon as the runtime has written them (:meth:`sensor.identity.RuntimeState.annotations`) and
remembers them, a bounded number of containers, the oldest forgotten first.
:class:`RememberingRuntimeState` is the resolver's view: the live state first, then what was
remembered of a container whose state is gone.

It only ever reads, and it reads what :class:`sensor.identity.RuntimeState` reads; a root that
does not exist yet (a runtime started after the daemon) is looked for again every
:data:`RETRY_ROOTS` seconds. Without inotify (or its limits reached) the daemon works as before,
which the log says once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
import time
from collections import OrderedDict

import structlog

from .identity import _SAFE_ID, HostPathError, RuntimeState, host_path
from .libc import LIBC

log = structlog.get_logger(__name__)

IN_CLOEXEC, IN_NONBLOCK = 0o2000000, 0o4000
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x8, 0x80, 0x100
IN_DELETE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW, IN_ONLYDIR = 0x400, 0x8000, 0x40000000, 0x4000, 0x01000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
ROOT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
CONTAINER_MASK = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_ONLYDIR
RETRY_ROOTS = 10.0
REMEMBERED = 4096  # containers whose annotations are kept


class RuntimeWatch:
    """See the module docstring. :meth:`start` and :meth:`close`; :meth:`remembered` is
    thread-safe."""

    def __init__(self, runtime: RuntimeState, capacity: int = REMEMBERED, cgroupfs=None):
        self.runtime = runtime
        self.capacity = capacity
        self.cgroupfs = cgroupfs  # for the cgroup of a runc container's init (None: found on first use)
        self._paths: OrderedDict[int, str] = OrderedDict()  # cgroup id -> path, of containers read
        self.roots = [*runtime.runc_roots, *runtime.bundle_dirs, *runtime.crio_userdata]
        self._known: OrderedDict[str, tuple[dict, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._fd = -1
        # wd -> (host path, container id, or None for a root; the root's name)
        self._wds: dict[int, tuple[str, str | None, str]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()  # annotations and cgroup both known
        self._watched_roots: set[str] = set()
        self._stop = threading.Event()
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self.counts = {"containers": 0, "remembered": 0, "overflows": 0}

    # -- lifecycle --

    def start(self) -> bool:
        """Start watching; False (logged) when inotify is not available here."""
        fd = LIBC.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            log.warning("runtime state not watched: a short-lived container may lose its identity",
                        error=f"inotify_init1: {os.strerror(e)}")
            return False
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._add_roots()
        self._thread = threading.Thread(target=self._run, name="envelope-runtime-watch", daemon=True)
        self._thread.start()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    # -- what the resolver asks --

    def remembered(self, container_id: str) -> tuple[dict, str] | None:
        with self._lock:
            found = self._known.get(container_id)
            return (dict(found[0]), found[1]) if found else None

    def remembered_path(self, cgroup_id: int) -> str | None:
        """The cgroup path of a container read by the watch, by cgroup id (after it is gone)."""
        with self._lock:
            return self._paths.get(cgroup_id)

    def _cgroup_of(self, container_id: str) -> tuple[str, int] | None:
        """The cgroup of a runc container's init, which exists from ``create`` on."""
        found = self.runtime.runc_state(container_id)
        pid = found[1].get("init_process_pid") if found else None
        if not isinstance(pid, int) or pid <= 0:
            return None
        if self.cgroupfs is None:
            from .identity import cgroupfs_for_host
            try:
                self.cgroupfs = cgroupfs_for_host(self.runtime.host_root)
            except Exception:  # noqa: BLE001 - no cgroup v2 here: annotations only
                return None
        return self.cgroupfs.pid_cgroup(pid)

    # -- the thread --

    def _host(self, path: str) -> str | None:
        try:
            return str(host_path(self.runtime.host_root, path))
        except HostPathError:
            return None

    def _watch(self, path: str, mask: int, container: str | None, root: str = "") -> bool:
        wd = LIBC.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            if e == errno.ENOSPC:
                log.warning("inotify watch limit reached: container state read late",
                            path=path, fix="raise fs.inotify.max_user_watches")
            return False
        self._wds[wd] = (path, container, root)
        return True

    def _add_roots(self) -> None:
        for root in self.roots:
            if root in self._watched_roots:
                continue
            host = self._host(root)
            if host is None or not os.path.isdir(host):
                continue
            if self._watch(host, ROOT_MASK, None, root):
                self._watched_roots.add(root)
                log.debug("runtime state root watched", root=root)

    def _new_container(self, root_host: str, name: str) -> None:
        if not _SAFE_ID.match(name):
            return
        self.counts["containers"] += 1
        path = os.path.join(root_host, name)
        self._watch(path, CONTAINER_MASK, name)
        self._try(name)  # written before the watch was in place
        userdata = os.path.join(path, "userdata")  # CRI-O: <id>/userdata/config.json
        if os.path.isdir(userdata):
            self._watch(userdata, CONTAINER_MASK, name)

    def _try(self, container_id: str) -> None:
        """Read what is there of ``container_id``: its annotations (from whichever runtime wrote
        them first, e.g. containerd's bundle) and its init's cgroup (from runc's state, which may
        come later). Its directories stay watched until both are known, or they are removed."""
        if container_id in self._done:
            return
        with self._lock:
            found = self._known.get(container_id)
        if found is None:
            found = self.runtime.annotations(container_id)
            if found is None:
                return
            with self._lock:
                self._known[container_id] = found
                while len(self._known) > self.capacity:
                    self._known.popitem(last=False)
            self.counts["remembered"] += 1
        cgroup = self._cgroup_of(container_id)
        if cgroup is None:
            return
        with self._lock:
            self._paths[cgroup[1]] = cgroup[0]
            while len(self._paths) > self.capacity:
                self._paths.popitem(last=False)
        self._done[container_id] = None
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)
        for wd, (_, cid, _root) in list(self._wds.items()):  # nothing more to read in its directories
            if cid == container_id:
                LIBC.inotify_rm_watch(self._fd, wd)
                self._wds.pop(wd, None)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_roots = time.monotonic() + RETRY_ROOTS
        while not self._stop.is_set():
            timeout = max(0.0, next_roots - time.monotonic())
            try:
                ready = {fd for fd, _ in poller.poll(timeout * 1000)}
            except OSError as e:
                log.error("runtime state watch stopped: a short-lived container may lose its identity",
                          error=str(e))
                return
            if self._stop.is_set():
                return
            if time.monotonic() >= next_roots:
                self._add_roots()
                next_roots = time.monotonic() + RETRY_ROOTS
            if self._fd in ready:
                try:
                    self._drain()
                except Exception as e:  # noqa: BLE001 - the watch must outlive any one event
                    log.warning("runtime state watch event failed", error=f"{type(e).__name__}: {e}")

    def _drain(self) -> None:
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                raw = buf[off + _EVENT.size: off + _EVENT.size + length]
                off += _EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.counts["overflows"] += 1  # events were dropped: the live read is still there
            return
        where = self._wds.get(wd)
        if where is None:
            return
        path, container, root = where
        if mask & IN_IGNORED:  # removed (a root too: watched again when it is back) or unwatched
            self._wds.pop(wd, None)
            if container is None:
                self._watched_roots.discard(root)
            return
        if container is None:
            if mask & IN_ISDIR and name:
                self._new_container(path, name)
            return
        if mask & IN_ISDIR and name == "userdata":
            self._watch(os.path.join(path, name), CONTAINER_MASK, container)
        if not mask & IN_DELETE_SELF:
            self._try(container)


class RememberingRuntimeState(RuntimeState):
    """:class:`sensor.identity.RuntimeState` that falls back to what a :class:`RuntimeWatch` read
    of a container whose state is gone."""

    def __init__(self, host_root: str | os.PathLike = "/", cgroupfs=None, **kw):
        super().__init__(host_root, **kw)
        self.watch = RuntimeWatch(self, cgroupfs=cgroupfs)

    def annotations(self, container_id: str) -> tuple[dict[str, str], str] | None:
        live = super().annotations(container_id)
        if live is not None:
            return live
        return self.watch.remembered(container_id) if _SAFE_ID.match(container_id) else None

    def remembered_path(self, cgroup_id: int) -> str | None:
        return self.watch.remembered_path(cgroup_id)

