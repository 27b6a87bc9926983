"""The request capture: ``bpf/http.c`` as a sensor extension, and what its records become.

What it does, per watched cgroup (a cgroup the pump bound to a workload session):

- the sensor's sys_enter hook (:data:`sensor.probes.HOOK_SOCKET`) runs ``http_syscall`` for the
  cgroup's write, writev, sendto, sendmsg, connect and close; other cgroups pay nothing for it;
- ``http_connect4/6`` (cgroup sock_addr) tie each TCP socket the cgroup connects to its
  (process, fd), cookie and destination; ``http_ingress`` (cgroup skb) sees the first bytes of a
  plaintext response; ``http_egress`` drops the packets of a socket whose request was refused;
  all four linked to the cgroup itself;
- every libssl (and executable with OpenSSL's functions) the cgroup's processes map, found
  through ``/proc/PID/maps`` and reached through ``/proc/PID/root``, gets uprobes on
  ``SSL_write``, ``SSL_write_ex``, ``SSL_read``, ``SSL_read_ex`` and ``SSL_do_handshake`` (and
  return probes), once per library file (a uprobe lives on the file's inode, for every process
  that maps it), attached from this process with ``perf_event_open`` on program fds the loader
  child compiled: no LLVM here. Where on each function is :func:`sensor.tlsstack.probe_sites`'
  choice: an instruction the kernel emulates, which with OpenSSL 3 is the first one of the
  function ``SSL_read_ex``/``SSL_write_ex`` call (a single-stepped one costs ~15 µs a hit here);
- each process's TLS stack is classified (:mod:`sensor.tlsstack`): those the probes cannot see
  are blind spots of the workload.

Records come back through the ``captures`` ring and are put together into exchanges
(:mod:`sensor.httpexchange`, which redacts them), then into behaviour keys: ``http:METHOD
host/path status`` (:mod:`sensor.httpkeys`), ``aws:`` keys for SigV4-signed requests
(:func:`sensor.awscall.observe`), and the ``model`` fingerprint input of model API requests
(:mod:`sensor.modelapi`). Violations (requests judged outside a policy in the probe) go to the
``violations`` ring, which the enforcement session reads (:mod:`enforcer.http_enforce`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import structlog

from . import kernel, tlsstack
from .events import HttpCaptureEvent, HttpConnEvent
from .httpexchange import Exchange, ExchangeAssembler
from .httpkeys import http_key, judgeable, normalize_host, request_path
from .kernel import (BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET_EGRESS,
                     BPF_CGROUP_INET_INGRESS, Family, Map, Program)
from .mirrors import (HTTP_C_ALPHA, HTTP_C_DASH, HTTP_C_DIGIT, HTTP_C_END, HTTP_C_HEX, HTTP_C_OTHER,
                      HTTP_C_SLASH, HTTP_C_UNDER, HTTP_LOSS_IOV, HTTP_LOSS_READ, HTTP_LOSS_RING_CAPTURE,
                      HTTP_LOSS_RING_CONN, HTTP_LOSS_RING_VIOLATION, HTTP_MODE_OBSERVE, HttpCgroup)

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "http.c"
SCAN_INTERVAL = 1.0  # seconds between looks at the watched cgroups' processes
#: (entry program, return program) per libssl function probed, at the sites
#: :func:`sensor.tlsstack.probe_sites` chooses.
PROBES = {
    "SSL_write": ("http_ssl_write", "http_ssl_done"),
    "SSL_write_ex": ("http_ssl_write_ex", "http_ssl_done"),
    "SSL_read": ("http_ssl_read", "http_ssl_read_done"),
    "SSL_read_ex": ("http_ssl_read_ex", "http_ssl_read_done"),
    "SSL_do_handshake": ("http_ssl_handshake", "http_ssl_done"),
}
#: The judging steps, by program array (tail-call index = position).
TAILS = {
    "tails_raw": ("http_scan_raw", "http_judge_raw", "http_path_raw", "http_violate_raw"),
    "tails_kprobe": ("http_scan_kprobe", "http_judge_kprobe", "http_path_kprobe", "http_violate_kprobe"),
}
#: Programs linked to each watched cgroup.
CGROUP_PROGRAMS = (("http_connect4", BPF_CGROUP_INET4_CONNECT), ("http_connect6", BPF_CGROUP_INET6_CONNECT),
                   ("http_ingress", BPF_CGROUP_INET_INGRESS), ("http_egress", BPF_CGROUP_INET_EGRESS))
MAPS = ("cgroups", "sockets", "conns", "blocked", "edges", "ctab", "loss", "tails_raw", "tails_kprobe",
        "captures", "violations")
LOSS_NAMES = {HTTP_LOSS_RING_CAPTURE: "ringbuf_full_capture", HTTP_LOSS_RING_CONN: "ringbuf_full_conn",
              HTTP_LOSS_RING_VIOLATION: "ringbuf_full_violation", HTTP_LOSS_READ: "user_memory_unreadable",
              HTTP_LOSS_IOV: "iovecs_beyond_capture"}


def family(base_cflags: Sequence[str], ringbuf_pages: int = 256, violation_pages: int = 16) -> Family:
    programs = [Program(p, "raw_tracepoint") for p in ("http_syscall", *TAILS["tails_raw"])]
    programs += [Program(p, "uprobe") for p in TAILS["tails_kprobe"]]
    programs += [Program(p, "uprobe") for p in sorted({x for pair in PROBES.values() for x in pair})]
    programs += [Program(fn, "cgroup_skb" if "gress" in fn else "cgroup_sock_addr", "", at)
                 for fn, at in CGROUP_PROGRAMS]
    cflags = tuple(base_cflags) + (f"-DHTTP_RINGBUF_PAGES={ringbuf_pages}",
                                   f"-DHTTP_VIOLATION_PAGES={violation_pages}")
    return Family("http", str(SOURCE), cflags, tuple(programs), MAPS, setup="sensor.httpcapture:seed_maps",
                  fix="needs raw tracepoints, uprobes and cgroup BPF; run `envelope doctor`")


def character_table() -> bytes:
    """``ctab``: the class of each byte, as the probe's path scan reads it (:mod:`sensor.mirrors`)."""
    t = bytearray(256)
    for c in range(256):
        ch = chr(c)
        if "0" <= ch <= "9":
            t[c] = HTTP_C_DIGIT
        elif ch in "abcdefABCDEF":
            t[c] = HTTP_C_HEX
        elif ("a" <= ch <= "z") or ("A" <= ch <= "Z"):
            t[c] = HTTP_C_ALPHA
        elif ch == "-":
            t[c] = HTTP_C_DASH
        elif ch == "_":
            t[c] = HTTP_C_UNDER
        elif ch == "/":
            t[c] = HTTP_C_SLASH
        elif ch in " ?#\r\n\0":
            t[c] = HTTP_C_END
        else:
            t[c] = HTTP_C_OTHER
    return bytes(t)


def seed_maps(maps: dict[str, int]) -> None:
    """Loader-child setup: the character table the path scan needs from its first run."""
    kernel.Map(maps["ctab"]).update((0).to_bytes(4, "little"), character_table())


# ---- what the capture hands to the aggregator ---------------------------------------------------


@dataclass(slots=True)
class RequestObserved:
    """One exchange as behaviours: its ``http:`` key, ``aws:`` keys, and a model it asked for."""

    ktime: int
    cgroup_id: int
    pid: int
    keys: tuple[str, ...]
    model: str | None = None
    type_name: ClassVar[str] = "http_request"

    def behaviour_keys(self) -> tuple[str, ...]:
        return self.keys

    def fingerprints(self) -> dict[str, str]:
        return {"model": self.model} if self.model else {}


@dataclass(slots=True)
class CoverageObserved:
    """What the capture cannot see for a workload, or the TLS stack one of its executables uses."""

    ktime: int
    cgroup_id: int
    substrate: str = "http"
    finding: str | None = None
    exe: str | None = None
    stack: str | None = None
    type_name: ClassVar[str] = "http_coverage"

    def blind_spots(self) -> dict[str, str]:
        return {self.substrate: self.finding} if self.finding else {}

    def tls_stacks(self) -> dict[str, str]:
        return {self.exe: self.stack} if self.exe and self.stack else {}


def exchange_behaviours(ex: Exchange, aws_catalog=None, s3_endpoints: tuple[str, ...] = ()
                        ) -> tuple[RequestObserved | None, list[str]]:
    """The behaviours of one (redacted) exchange, and findings about what was not decoded.

    Pure apart from ``aws_catalog`` (a :class:`sensor.awsmodels.ServiceCatalog`, built once at the
    edge; None: SigV4 requests give only their ``http:`` key)."""
    from . import awscall, credentials, modelapi

    req = ex.request
    notes: list[str] = []
    host = normalize_host(req.host, ex.tls)
    path = request_path(req.target)
    why = judgeable(req.method, host, path)
    if why and (not host or not path.startswith("/")):
        return None, [f"a request that cannot be keyed: {why}"]
    keys = [http_key(req.method, host, path, ex.status)]
    if why:
        notes.append(f"{req.method} {host}{path[:80]}: the probe cannot judge it ({why})")
    if aws_catalog is not None and credentials.sigv4_signed(req):
        call = awscall.observe(req, aws_catalog, s3_endpoints)
        if isinstance(call, awscall.AwsCall):
            keys += call.keys()
        else:
            notes.append(f"an AWS request not decoded ({call.kind}: {call.reason})")
    model = None
    mc = modelapi.model_call(req)
    if mc is not None:
        model = mc.model
        if model is None:
            notes.append(f"a {mc.api} model API request whose model was not read ({mc.reason})")
    return RequestObserved(ex.ktime, ex.cgroup_id, ex.pid, tuple(keys), model), notes


# ---- the extension --------------------------------------------------------------------------------


@dataclass
class _Watched:
    path: str
    links: list[int] = field(default_factory=list)
    mode: int = HTTP_MODE_OBSERVE
    root: int = 0
    gen: int = 0


@dataclass
class _Library:
    path: str          # how this process reaches it (/proc/PID/root/...)
    fds: list[int]
    pids: set[int] = field(default_factory=set)
    pinned: bool = False  # hooked for the host, kept while the capture runs


class HttpCapture:
    """The request capture as a :class:`sensor.probes.Extension` (see the module docstring).

    ``key`` is the sensor's key for hashing AWS access key ids. ``host_libssl``: also hook the
    libssl this process's Python uses (the host's), as soon as the capture is attached, so host
    processes are seen from their first request even before their first scan.

    ``tls_responses``: probe ``SSL_read``/``SSL_read_ex`` too (entry and return), for the status of
    TLS responses and to see a TLS response begin (what ends a request whose body length is not
    declared). Those probes fire once per TLS record read, in every process that maps the
    library: about 0.7 µs a record on an emulated instruction (0.4 µs entry, 0.24 µs return,
    plus a map lookup; reads of a connection that awaits no answer's head are not followed),
    30 µs where the instruction is single-stepped (BENCHMARKS.md). Off, TLS requests are still
    captured and judged, their status is not known, and a request sent after a chunked request
    body on the same TLS connection is not judged."""

    name = "http"
    rings = ("captures",)

    def __init__(self, key: bytes, *, ringbuf_pages: int = 256, violation_pages: int = 16,
                 scan_interval: float = SCAN_INTERVAL, host_libssl: bool = True, aws: bool = True,
                 tls_responses: bool = True,
                 s3_endpoints: tuple[str, ...] = (), proc: str = "/proc"):
        self.key = key
        self.ringbuf_pages = ringbuf_pages
        self.violation_pages = violation_pages
        self.scan_interval = scan_interval
        self.host_libssl = host_libssl
        self.aws = aws
        self.tls_responses = tls_responses
        self.s3_endpoints = tuple(s3_endpoints)
        self.proc = proc
        self.assembler = ExchangeAssembler(key)
        self.loaded: kernel.Loaded | None = None
        self.sensor = None
        self.maps: dict[str, Map] = {}
        self.watched: dict[int, _Watched] = {}
        self.libraries: dict[tuple[int, int], _Library] = {}
        self._exe_facts: dict[tuple[int, int], tlsstack.ElfFacts] = {}
        self._lib_facts: dict[tuple[int, int], tlsstack.ElfFacts] = {}
        self._pids: dict[int, tuple[int, float]] = {}  # pid -> (cgroup id, last scan)
        self._untls: set[int] = set()  # pids whose last scan found no TLS stack
        self._rescanned: set[int] = set()  # pids rescanned for a TLS capture (once per pid)
        self._stacks: set[tuple[int, str, str]] = set()
        self._notes: set[tuple[int, str]] = set()
        self._made: list = []
        self._next_scan = 0.0
        self._catalog = None
        self.counts = {"exchanges": 0, "findings": 0, "probes_attached": 0, "probes_single_stepped": 0,
                       "probe_errors": 0}

    # -- Extension --

    def family(self, base_cflags: Sequence[str]) -> Family:
        return family(base_cflags, self.ringbuf_pages, self.violation_pages)

    def attached(self, loaded: kernel.Loaded, sensor) -> None:
        from .probes import HOOK_SOCKET
        self.loaded = loaded
        self.sensor = sensor
        self.maps = {n: Map(fd, n) for n, fd in loaded.maps.items()}
        for array, progs in TAILS.items():
            for i, name in enumerate(progs):
                self.maps[array].update(i.to_bytes(4, "little"), loaded.programs[name].to_bytes(4, "little"))
        sensor.set_hook(HOOK_SOCKET, loaded.programs["http_syscall"])
        if self.host_libssl:
            self._hook_own_libssl()

    def _hook_own_libssl(self) -> None:
        import ssl  # noqa: F401 - maps the host's libssl into this process, where it can be found
        for path in tlsstack.mapped_files(os.getpid(), self.proc):
            if tlsstack.is_libssl(path):
                lib = self._hook_library(path)
                if lib is not None:
                    lib.pinned = True

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + self.scan_interval
        self.assembler.expire(time.monotonic_ns())
        self._scan()

    def behaviour_counts(self) -> dict:
        return {}  # everything this capture sees arrives through its ring

    def loss(self) -> dict[str, int]:
        m = self.maps.get("loss")
        if m is None:
            return {}
        return {name: m.percpu_sum(i.to_bytes(4, "little")) for i, name in LOSS_NAMES.items()}

    def consume(self, ev) -> bool:
        if isinstance(ev, HttpCaptureEvent):
            self.assembler.on_capture(ev)
        elif isinstance(ev, HttpConnEvent):
            self.assembler.on_conn(ev)  # these wake the consumer at once: the process still runs
        else:
            return False
        late_tls = ev.tls and ev.pid in self._untls and ev.pid not in self._rescanned
        if ev.pid and ev.cgroup_id in self.watched and (ev.pid not in self._pids or late_tls):
            if late_tls:
                self._rescanned.add(ev.pid)  # at most once: later changes wait for the periodic scan
            # a process seen first by a connection or what it sent, or using TLS although its
            # last scan found no TLS library (it loaded one since, e.g. Python's lazy ``import
            # ssl``): look at its TLS stack while it runs
            self._pids[ev.pid] = (ev.cgroup_id, time.monotonic())
            self._scan_process(ev.cgroup_id, ev.pid)
        return True

    def events(self) -> list:
        exchanges, findings = self.assembler.take()
        out, self._made = self._made, []
        for ex in exchanges:
            self.counts["exchanges"] += 1
            obs, notes = exchange_behaviours(ex, self._aws_catalog(ex), self.s3_endpoints)
            if obs is not None:
                out.append(obs)
            for n in notes:
                out += self._note(ex.ktime, ex.cgroup_id, n)
        for f in findings:
            self.counts["findings"] += 1
            out += self._note(f.ktime, f.cgroup_id, f"{self._exe(f.pid)}: {f.detail}" if f.pid else f.detail)
        return out

    def _aws_catalog(self, ex: Exchange):
        if not self.aws:
            return None
        from .credentials import sigv4_signed
        if self._catalog is None and sigv4_signed(ex.request):
            from .awsmodels import ServiceCatalog
            self._catalog = ServiceCatalog()  # loaded at the first signed request only
        return self._catalog

    def _note(self, ktime: int, cgroup_id: int, text: str, substrate: str = "http") -> list:
        if (cgroup_id, text) in self._notes:
            return []
        self._notes.add((cgroup_id, text))
        return [CoverageObserved(ktime, cgroup_id, substrate, text)]

    def close(self) -> None:
        self.assembler.flush()
        for cg in list(self.watched):
            self.unwatch(cg)
        for lib in self.libraries.values():
            kernel.close_fds(lib.fds)
        self.libraries = {}
        for m in self.maps.values():
            m.fd = -1  # the fds belong to `loaded`, which the sensor closes
        self.maps = {}

    # -- watched cgroups --

    def watch(self, cgroup_id: int, path: str | None) -> None:
        """Start capturing cgroup ``cgroup_id`` (at ``path``): links, the syscall hook, probes."""
        if cgroup_id in self.watched or not path or self.loaded is None:
            return
        from .probes import HOOK_SOCKET
        w = _Watched(path)
        cfd = kernel.open_cgroup(path)
        try:
            for fn, attach in CGROUP_PROGRAMS:
                w.links.append(kernel.link_create(self.loaded.programs[fn], cfd, attach))
        except kernel.BpfError:
            kernel.close_fds(w.links)
            raise
        finally:
            os.close(cfd)
        self.watched[cgroup_id] = w
        self._write_cgroup(cgroup_id, w)
        self.sensor.hook_cgroup(cgroup_id, 1 << HOOK_SOCKET)
        self._scan_cgroup(cgroup_id, w, time.monotonic())

    def unwatch(self, cgroup_id: int) -> None:
        w = self.watched.pop(cgroup_id, None)
        if w is None:
            return
        if self.sensor is not None and self.sensor.attached:
            self.sensor.hook_cgroup(cgroup_id, 0)
        if "cgroups" in self.maps:
            self.maps["cgroups"].delete(cgroup_id.to_bytes(8, "little"))
        kernel.close_fds(w.links)
        for pid in [p for p, (cg, _) in self._pids.items() if cg == cgroup_id]:
            self._pid_gone(pid)

    def _write_cgroup(self, cgroup_id: int, w: _Watched) -> None:
        self.maps["cgroups"].update(cgroup_id.to_bytes(8, "little"),
                                    HttpCgroup.pack(mode=w.mode, root=w.root, gen=w.gen))

    def set_rules(self, cgroup_id: int, path: str, mode: int, root: int, gen: int) -> None:
        """Judge cgroup ``cgroup_id``'s requests in ``mode`` against the rule graph from
        ``root`` (the enforcement seam; :mod:`enforcer.http_enforce` writes the graph)."""
        if cgroup_id not in self.watched:
            self.watch(cgroup_id, path)
        w = self.watched[cgroup_id]
        w.mode, w.root, w.gen = mode, root, gen
        self._write_cgroup(cgroup_id, w)

    @property
    def violations_fd(self) -> int:
        return self.loaded.maps["violations"]

    # -- processes, libraries, TLS stacks --

    def _scan(self) -> None:
        now = time.monotonic()
        live: set[int] = set()
        for cg, w in list(self.watched.items()):
            live |= self._scan_cgroup(cg, w, now)
        for pid in [p for p in self._pids if p not in live]:
            self._pid_gone(pid)

    def _scan_cgroup(self, cgroup_id: int, w: _Watched, now: float) -> set[int]:
        try:
            with open(os.path.join(w.path, "cgroup.procs")) as f:
                pids = {int(x) for x in f.read().split()}
        except (OSError, ValueError):
            return set()
        for pid in pids:
            seen = self._pids.get(pid)
            if seen is None or now - seen[1] >= self.scan_interval:
                self._pids[pid] = (cgroup_id, now)
                self._scan_process(cgroup_id, pid)
        return pids

    def _scan_process(self, cgroup_id: int, pid: int) -> None:
        mapped = tlsstack.mapped_files(pid, self.proc)
        if not mapped:
            return
        hooked: set[str] = set()
        for path in mapped:
            if tlsstack.is_libssl(path):
                lib = self._hook_library(tlsstack.host_path(pid, path, self.proc))
                if lib is not None:
                    lib.pids.add(pid)
                    hooked.add(path)
        try:
            exe = os.readlink(f"{self.proc}/{pid}/exe")
            st = os.stat(f"{self.proc}/{pid}/exe")
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        facts = self._exe_facts.get(ident)
        if facts is None:
            facts = self._exe_facts[ident] = tlsstack.elf_facts(f"{self.proc}/{pid}/exe")
        stack = tlsstack.classify(mapped, exe, facts, hooked)
        if stack.kind == "none":
            self._untls.add(pid)
        else:
            self._untls.discard(pid)
        if stack.kind in ("openssl-static", "boringssl-static") and stack.observable:
            lib = self._hook_library(f"{self.proc}/{pid}/exe", facts)
            if lib is not None:
                lib.pids.add(pid)
            else:
                stack = tlsstack.TlsStack(stack.kind, stack.library, False)
        key = (cgroup_id, exe, stack.text)
        if key in self._stacks:
            return
        self._stacks.add(key)
        t = time.monotonic_ns()
        self._made.append(CoverageObserved(t, cgroup_id, exe=exe, stack=stack.text))
        if not stack.observable:
            self._made += self._note(t, cgroup_id, f"{exe}: {stack.kind} TLS"
                                     + (f" ({stack.library})" if stack.library and stack.library != exe else "")
                                     + ": its requests over TLS are not observable")

    def _hook_library(self, path: str, facts: tlsstack.ElfFacts | None = None) -> _Library | None:
        """Probes on the SSL_* functions of the file at ``path``, once per file (inode)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        ident = (st.st_dev, st.st_ino)
        lib = self.libraries.get(ident)
        if lib is not None:
            return lib
        if facts is None:
            facts = self._lib_facts.get(ident)
            if facts is None:
                facts = self._lib_facts[ident] = tlsstack.elf_facts(path)
        if not facts.hookable or self.loaded is None:
            return None
        fds: list[int] = []
        sites = [s for s in facts.sites if self.tls_responses or not s.function.startswith("SSL_read")]
        try:
            for site in sites:
                entry, ret = PROBES[site.function]
                fds.append(kernel.uprobe_open(self.loaded.programs[entry], path, site.offset))
                fds.append(kernel.uprobe_open(self.loaded.programs[ret], path, site.offset, retprobe=True))
        except kernel.BpfError as e:
            kernel.close_fds(fds)
            self.counts["probe_errors"] += 1
            log.warning("uprobes on a TLS library failed", library=path, error=str(e))
            return None
        self.counts["probes_attached"] += len(fds)
        self.counts["probes_single_stepped"] += 2 * sum(s.single_step for s in sites)
        lib = self.libraries[ident] = _Library(path, fds)
        log.info("TLS library hooked", library=path, probes=len(fds),
                 sites={s.function: f"{s.offset:#x}" + (" (body)" if s.body else "")
                        + (" (single-stepped)" if s.single_step else "") for s in sites})
        return lib

    def _pid_gone(self, pid: int) -> None:
        self._pids.pop(pid, None)
        self._untls.discard(pid)
        self._rescanned.discard(pid)
        for ident, lib in list(self.libraries.items()):
            lib.pids.discard(pid)
            if not lib.pids and not lib.pinned:
                kernel.close_fds(lib.fds)
                del self.libraries[ident]
                log.info("TLS library unhooked", library=lib.path)

    def _exe(self, pid: int) -> str:
        try:
            return os.readlink(f"{self.proc}/{pid}/exe")
        except OSError:
            return f"pid {pid}"


__all__ = ["CoverageObserved", "HttpCapture", "RequestObserved", "character_table", "exchange_behaviours",
           "family", "seed_maps"]
