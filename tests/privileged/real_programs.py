"""Real programs nobody here wrote, as Envelope's users run them: recorded over several varied
sessions, derived with the defaults, then held-out legitimate variations and abuses under
``envelope exec --mode enforce``.

Seven programs: nginx and busybox httpd (web servers), redis-server (a key-value store), git
(version control), sqlite3 (an embedded database), ``python3 -m http.server`` (a language
runtime's server) and pip installing from a local wheel directory (a package installer). Their
clients run in the test process, outside the workload's cgroup, on loopback only.

Each program gives six recorded sessions, four held-out legitimate runs (different inputs and
requests, the same kind of work) and its abuses: what an attacker does with the program's own
features (sqlite3's ``.shell``, busybox httpd's CGI and proxy, a malicious sdist for pip) or with
code injected into the process (``workloads/injected.c`` through LD_PRELOAD: spawn /bin/sh,
connect elsewhere, an unused dangerous syscall). A held-out run passes when the program did its
work and nothing was denied; an abuse is denied when the attempt failed (EPERM from seccomp or
the egress programs, EACCES from Landlock) and the denial was reported as a violation.

:class:`Suite` runs them; ``test_real_programs.py`` asserts each case and
``bench/bench_real_programs.py`` measures the rates.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.privileged.listeners import Listener, free_port  # noqa: F401 - Listener: the abuses' target

ROOT = Path(__file__).resolve().parents[2]
ENVELOPE = [sys.executable, "-m", "envelope.cli"]
INJECTED_C = Path(__file__).resolve().parent / "workloads" / "injected.c"
PYTHON = "/usr/bin/python3"  # Debian's, as a user would run it (not this test's venv)
READY_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0


class RunFailed(AssertionError):
    """A legitimate run did not do its work (the message says what went wrong)."""


# ---- clients (the test process, outside the workload) ------------------------------------------


def wait_port(port: int, proc: subprocess.Popen, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RunFailed(f"not listening on {port} after {timeout:g} s")


def fetch(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes, dict]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, data, {k.lower(): v for k, v in r.getheaders()}
    finally:
        if conn is None:
            c.close()


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise RunFailed(what)


def get_ok(port: int, path: str, want: bytes | None = None, **kw) -> bytes:
    status, data, _ = fetch(port, "GET", path, **kw)
    expect(status == 200, f"GET {path}: {status}")
    if want is not None:
        expect(data == want, f"GET {path}: {len(data)} bytes, not the file's {len(want)}")
    return data


def parallel(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise RunFailed(f"{len(errors)} of {n} parallel clients failed: {errors[0]}")


def resp(port: int, *commands: list) -> list:
    """Redis commands over one connection (RESP2); the replies, decoded."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    f = s.makefile("rb")
    out = []
    try:
        payload = b""
        for cmd in commands:
            parts = [str(c).encode() if not isinstance(c, bytes) else c for c in cmd]
            payload += b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        s.sendall(payload)
        for _ in commands:
            out.append(_resp_read(f))
    finally:
        f.close()
        s.close()
    return out


def _resp_read(f):
    line = f.readline()
    if not line:
        raise RunFailed("redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RunFailed(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data
    if kind == b"*":
        return [_resp_read(f) for _ in range(int(rest))]
    raise RunFailed(f"bad redis reply {line!r}")


# ---- runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One session, held-out variation or abuse of a program."""

    name: str
    argv: list[str]
    port: int | None = None  # a server: ready when this port accepts; stopped with SIGTERM
    drive: Callable[[], None] | None = None  # the clients' work while a server runs (raises RunFailed)
    check: Callable[[subprocess.CompletedProcess], None] | None = None  # a batch run's outcome
    before: Callable[[], None] | None = None  # set-up outside the workload (a fresh database, a change)
    stdin: Path | None = None
    cwd: Path | None = None
    env: dict = field(default_factory=dict)
    ok_status: tuple[int, ...] = (0,)
    abuses: list["Abuse"] = field(default_factory=list)  # empty for a legitimate run


@dataclass
class Abuse:
    """One abuse a run attempts: the line its attempt reports on stderr ("" when the run itself
    shows nothing), the violation it must leave, and the alert that reports it when it got
    through (a spawn the policy's exec entries let through, reported from the exec substrate)."""

    name: str
    denied: Callable[[dict], bool]
    attempt: str = ""  # "envelope-abuse <what>", whose result must be EPERM or EACCES (REFUSED)
    reported: Callable[[dict], bool] | None = None


@dataclass
class Program:
    name: str
    sessions: list[Run]
    holdouts: list[Run]
    abuses: list[Run]  # runs, each attempting one or more abuses

    def abuse(self, name: str) -> tuple[Run, "Abuse"]:
        for run in self.abuses:
            for a in run.abuses:
                if a.name == name:
                    return run, a
        raise KeyError(name)


@dataclass
class Outcome:
    run: str
    status: int | None
    stdout: str
    stderr: str
    violations: list[dict]
    problem: str = ""  # why a legitimate run did not do its work

    @property
    def denied(self) -> list[dict]:
        return [v for v in self.violations if v["action"] == "denied"]

    @property
    def alerted(self) -> list[dict]:
        return [v for v in self.violations if v["action"] == "alerted"]


class Suite:
    """Runs programs' sessions under ``envelope record`` and their held-out and abuse runs
    under ``envelope exec``, each program in its own state directory."""

    def __init__(self, work: Path, injected_so: Path):
        self.work = work
        self.injected = injected_so
        self.workloads: dict[str, str] = {}

    def state(self, program: str) -> Path:
        d = self.work / program / "state"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def workload(self, program: str) -> str:
        return self.workloads.setdefault(program, f"real-{program}-{os.getpid()}")

    def envelope(self, program: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(ENVELOPE + ["--state-dir", str(self.state(program)), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT, **kw)

    def violations(self, program: str) -> list[dict]:
        from enforcer.violations import ViolationStore
        return [v.to_dict() for v in ViolationStore(self.state(program)).list()]

    def _launch(self, program: str, prefix: list[str], run: Run) -> Outcome:
        if run.before is not None:
            run.before()
        env = {**os.environ, **run.env}
        stdin = open(run.stdin, "rb") if run.stdin else subprocess.DEVNULL
        before = len(self.violations(program))
        proc = subprocess.Popen(ENVELOPE + ["--state-dir", str(self.state(program)), *prefix, "--", *run.argv],
                                cwd=run.cwd or ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        problem = ""
        try:
            if run.port is not None:
                try:
                    wait_port(run.port, proc)
                    if run.drive is not None:
                        run.drive()
                except RunFailed as e:
                    problem = str(e)
                except (OSError, http.client.HTTPException) as e:
                    problem = f"client: {type(e).__name__}: {e}"
                finally:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)  # envelope forwards it to the server
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            problem = problem or f"did not finish within {RUN_TIMEOUT:g} s"
        finally:
            if stdin is not subprocess.DEVNULL:
                stdin.close()
        res = subprocess.CompletedProcess(run.argv, proc.returncode, out, err)
        if not problem and run.check is not None:
            try:
                run.check(res)
            except RunFailed as e:
                problem = str(e)
        if not problem and not run.abuses and proc.returncode not in run.ok_status:
            problem = f"exit status {proc.returncode}: {err.strip().splitlines()[-1:] or ''}"
        return Outcome(run.name, proc.returncode, out, err, self.violations(program)[before:], problem)

    def record(self, program: str, run: Run, session: str) -> Outcome:
        return self._launch(program, ["record", "--workload", self.workload(program), "--session", session,
                                      "-q"], run)

    def derive(self, program: str, *options: str, name: str = "policy") -> Path:
        """The program's policy, derived with the defaults (plus ``options``) and ``--force``."""
        policy = self.work / program / f"{name}.yaml"
        r = self.envelope(program, "derive", self.workload(program), "--force", *options, "--out", str(policy))
        if r.returncode != 0:
            raise RuntimeError(f"derive {program}: {r.stderr}")
        return policy

    def enforce(self, program: str, policy: Path, run: Run) -> Outcome:
        if any(a.attempt for a in run.abuses):
            run.env.setdefault("LD_PRELOAD", str(self.injected))
        return self._launch(program, ["exec", "--policy", str(policy), "--mode", "enforce"], run)


def build_injected(out_dir: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the injected library; run make setup")
    so = out_dir / "injected.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(so), str(INJECTED_C)], check=True)
    return so


def abuse_verdict(outcome: Outcome, abuse: "Abuse") -> tuple[str, str]:
    """("denied", ...) when the abuse failed (:data:`REFUSED`) and the denial was reported;
    ("reported", ...) when it got through and was reported; ("missed", why) otherwise."""
    result = "EPERM"
    if abuse.attempt:
        m = re.search(rf"{re.escape(abuse.attempt)}: (\S+)", outcome.stderr)
        if m is None:
            return "missed", f"the attempt never ran (no {abuse.attempt!r} line on stderr)"
        result = m.group(1)
    seen = ", ".join(sorted({f"{v['action']} {v['behaviour']}" for v in outcome.violations})) or "nothing"
    if result in REFUSED:
        if any(abuse.denied(v) for v in outcome.denied):
            return "denied", seen
        return "missed", f"failed with {result}, but no matching denial reported: {seen}"
    if abuse.reported is not None and any(abuse.reported(v) for v in outcome.alerted):
        return "reported", f"got through ({result}) and was reported: {seen}"
    return "missed", f"got through ({result}) unreported: {seen}"


# ---- the injected abuses, shared by every dynamically linked program --------------------------

#: Where spawning a shell can be denied: creating the process, or its execve (the filter), or
#: the shell's file (Landlock's execute right).
SHELLS = ("exec:/bin/sh", "exec:/usr/bin/sh")
SPAWN = ("syscall:execve", "syscall:execveat", "syscall:clone", "syscall:clone3", "syscall:fork", "syscall:vfork",
         *SHELLS)
#: What a refused abuse fails with: EPERM from seccomp and the egress programs, EACCES from Landlock.
REFUSED = ("EPERM", "EACCES")


def injected(exe: str, match: str, make: Callable[[str, dict], Run], listener_port: int,
             what: tuple[str, ...] = ("shell", "connect", "dangerous")) -> Run:
    """One run of ``exe`` with code injected that spawns a shell, connects elsewhere and makes
    an unused dangerous syscall (``what``, in that order)."""
    checks = {
        "shell": lambda v: v["behaviour"] in SPAWN,
        "connect": lambda v, p=listener_port: v["behaviour"] == f"connect:tcp:127.0.0.1:{p}"
        or (v["behaviour"] == "syscall:connect" and v["detail"].get("destination") == f"127.0.0.1:{p}"),
        "dangerous": lambda v: v["behaviour"] == "syscall:process_vm_readv",
    }
    reported = {"shell": lambda v: v["behaviour"] in SHELLS}
    env = {"ENVELOPE_ABUSE": ",".join(what), "ENVELOPE_ABUSE_EXE": exe, "ENVELOPE_ABUSE_MATCH": match,
           "ENVELOPE_ABUSE_PORT": str(listener_port)}
    r = make("injected", env)
    r.abuses = [Abuse(f"injected-{w}", checks[w], f"envelope-abuse {w}", reported.get(w)) for w in what]
    return r


# ---- nginx -----------------------------------------------------------------------------------

FILES = {
    "index.html": b"<h1>hello</h1>\n",
    "notes.txt": b"plain text notes\n" * 40,
    "docs/a.txt": b"alpha\n" * 100,
    "docs/b.txt": b"bravo\n" * 300,
    "docs/deep/c.json": json.dumps({"k": list(range(200))}).encode(),
    "big.bin": bytes(range(256)) * 8192,  # 2 MiB
    "style.css": b"body { color: #333; }\n" * 50,
}


def write_site(root: Path) -> Path:
    for rel, data in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def site_requests(port: int, kind: str) -> None:
    """The kinds of client work a static web server sees."""
    if kind == "pages":
        get_ok(port, "/", FILES["index.html"])
        get_ok(port, "/notes.txt", FILES["notes.txt"])
        get_ok(port, "/style.css", FILES["style.css"])
        expect(fetch(port, "GET", "/missing.html")[0] == 404, "404 for a missing page")
    elif kind == "big":
        get_ok(port, "/big.bin", FILES["big.bin"])
        status, data, _ = fetch(port, "GET", "/big.bin", headers={"Range": "bytes=100-199"})
        # a server may answer a range with the part (206) or, without range support, the whole
        expect((status, data) in ((206, FILES["big.bin"][100:200]), (200, FILES["big.bin"])),
               f"range request: {status}, {len(data)} bytes")
    elif kind == "tree":
        get_ok(port, "/docs/a.txt", FILES["docs/a.txt"])
        get_ok(port, "/docs/deep/c.json", FILES["docs/deep/c.json"])
        status, _, _ = fetch(port, "HEAD", "/docs/b.txt")
        expect(status == 200, f"HEAD: {status}")
    elif kind == "parallel":
        parallel(6, lambda i: [get_ok(port, p, FILES[p.lstrip("/")])
                               for p in ("/docs/b.txt", "/notes.txt", "/index.html")])
    elif kind == "keepalive":
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            for p in ("/index.html", "/docs/a.txt", "/style.css", "/notes.txt"):
                get_ok(port, p, FILES[p.lstrip("/")], conn=c)
        finally:
            c.close()
    elif kind == "conditional":
        _, _, h = fetch(port, "GET", "/notes.txt")
        since = h.get("last-modified") or "Thu, 01 Jan 2026 00:00:00 GMT"
        status, _, _ = fetch(port, "GET", "/notes.txt", headers={"If-Modified-Since": since})
        expect(status in (200, 304), f"conditional GET: {status}")
    else:
        raise ValueError(kind)


def drive(port: int, *kinds: str) -> Callable[[], None]:
    return lambda: [site_requests(port, k) for k in kinds]


def nginx(work: Path, listener: int) -> Program:
    root = write_site(work / "www")
    (work / "www" / "docs").mkdir(exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        daemon off;
        master_process on;
        worker_processes 2;
        user root;
        pid {work}/nginx.pid;
        error_log {work}/error.log;
        events {{ worker_connections 128; }}
        http {{
          access_log {work}/access.log;
          client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
          uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
          sendfile on;
          server {{ listen 127.0.0.1:{port}; root {root}; autoindex on; }}
        }}
    """))
    argv = ["/usr/sbin/nginx", "-c", str(conf), "-e", str(work / "error.log")]

    def run(name, *kinds, env=None):
        return Run(name, argv, port=port, drive=drive(port, *kinds), env=dict(env or {}))

    def autoindex():
        status, data, _ = fetch(port, "GET", "/docs/")
        expect(status == 200 and b"a.txt" in data, f"autoindex: {status}")

    sessions = [run("pages", "pages"), run("big", "big", "pages"), run("tree", "tree", "pages"),
                run("parallel", "parallel"), run("keepalive", "keepalive", "conditional"),
                run("mixed", "pages", "big", "tree", "keepalive")]
    holdouts = [run("pages-again", "pages", "conditional"), run("big-parallel", "big", "parallel"),
                run("tree-keepalive", "tree", "keepalive"),
                Run("autoindex", argv, port=port, drive=lambda: (autoindex(), site_requests(port, "pages")))]
    return Program("nginx", sessions, holdouts,
                   [injected("nginx", "nginx", lambda n, env: run(n, "pages", env=env), listener)])


# ---- python3 -m http.server ------------------------------------------------------------------


def http_server(work: Path, listener: int) -> Program:
    root = write_site(work / "www")
    port = free_port()
    argv = [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]

    def run(name, *kinds, env=None):
        # SIGTERM ends the interpreter by the signal (143); that is its normal way to stop
        return Run(name, argv, port=port, drive=drive(port, *kinds), env=dict(env or {}), ok_status=(0, 143))

    def listing():
        status, data, _ = fetch(port, "GET", "/docs/")
        expect(status == 200 and b"a.txt" in data, f"directory listing: {status}")

    sessions = [run("pages", "pages"), run("big", "big", "pages"), run("tree", "tree", "pages"),
                run("parallel", "parallel"), run("keepalive", "keepalive", "conditional"),
                run("mixed", "pages", "big", "tree")]
    holdouts = [run("pages-again", "pages", "conditional"), run("big-parallel", "big", "parallel"),
                run("tree-keepalive", "tree", "keepalive"),
                Run("listing", argv, port=port, ok_status=(0, 143),
                    drive=lambda: (listing(), site_requests(port, "pages")))]
    return Program("http.server", sessions, holdouts,
                   [injected("python3.11", "http.server", lambda n, env: run(n, "pages", env=env), listener)])


# ---- busybox httpd ---------------------------------------------------------------------------


def busybox_httpd(work: Path, listener: int) -> Program:
    root = write_site(work / "www")
    cgi = root / "cgi-bin"
    cgi.mkdir(exist_ok=True)
    (cgi / "hello.cgi").write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nhi\\n'\n")
    (cgi / "hello.cgi").chmod(0o755)
    port = free_port()
    conf = work / "httpd.conf"
    conf.write_text("A:127.0.0.1\n")  # loopback clients only
    base = ["/usr/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(root)]

    def run(name, *kinds, conf_file=conf):
        return Run(name, base + ["-c", str(conf_file)], port=port, drive=drive(port, *kinds), ok_status=(0, 143))

    def try_cgi():
        fetch(port, "GET", "/cgi-bin/hello.cgi")  # whatever it answers; the exec is what counts

    sessions = [run("pages", "pages"), run("big", "big", "pages"), run("tree", "tree", "pages"),
                run("parallel", "parallel"), run("keepalive", "keepalive", "conditional"),
                run("mixed", "pages", "big", "tree")]
    holdouts = [run("pages-again", "pages", "conditional"), run("big-parallel", "big", "parallel"),
                run("tree-keepalive", "tree", "keepalive"), run("all", "pages", "tree", "big")]
    # a CGI script dropped into the document root: the server would fork and exec it (busybox is
    # static, so nothing can be injected into it; its proxy feature is not built in Debian's)
    abuse = Run("cgi", base + ["-c", str(conf)], port=port, ok_status=(0, 143), drive=try_cgi,
                abuses=[Abuse("cgi-shell", lambda v: v["behaviour"] in SPAWN or v["substrate"] == "syscall",
                              reported=lambda v: v["behaviour"] == f"exec:{cgi}/hello.cgi")])
    return Program("busybox-httpd", sessions, holdouts, [abuse])


# ---- redis-server ----------------------------------------------------------------------------


def redis(work: Path, listener: int) -> Program:
    port = free_port()
    data = work / "data"
    data.mkdir(exist_ok=True)
    conf = work / "redis.conf"
    conf.write_text(textwrap.dedent(f"""
        bind 127.0.0.1
        port {port}
        dir {data}
        appendonly yes
        appendfsync everysec
        save ""
        daemonize no
        logfile {work}/redis.log
    """))
    argv = ["/usr/bin/redis-server", str(conf)]

    def strings(p=port):
        r = resp(p, ["SET", "greeting", "hello"], ["GET", "greeting"], ["INCRBY", "n", 5], ["APPEND", "greeting", "!"],
                 ["MSET", "a", 1, "b", 2], ["MGET", "a", "b"])
        expect(r[1] == b"hello" and r[5] == [b"1", b"2"], f"strings: {r}")

    def structures(p=port):
        r = resp(p, ["DEL", "l", "h", "z"], ["RPUSH", "l", *range(50)], ["LRANGE", "l", 0, 4],
                 ["HSET", "h", "f1", "v1", "f2", "v2"], ["HGETALL", "h"], ["ZADD", "z", 1, "x", 2, "y"],
                 ["ZRANGE", "z", 0, -1])
        expect(r[2] == [b"0", b"1", b"2", b"3", b"4"] and r[6] == [b"x", b"y"], f"structures: {r}")

    def expiry(p=port):
        resp(p, ["SET", "tmp", "x", "PX", 100], ["EXPIRE", "greeting", 3600], ["TTL", "greeting"])
        time.sleep(0.3)
        expect(resp(p, ["EXISTS", "tmp"])[0] == 0, "PX expiry")

    def bulk(p=port, n=2000):
        cmds = [["SET", f"k:{i}", "v" * (i % 200)] for i in range(n)]
        resp(p, *cmds)
        expect(resp(p, ["DBSIZE"])[0] >= n, "bulk load")

    def bgsave(p=port):
        resp(p, ["BGSAVE"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = resp(p, ["INFO", "persistence"])[0].decode()
            if "rdb_bgsave_in_progress:0" in info and "rdb_last_bgsave_status:ok" in info:
                return
            time.sleep(0.1)
        raise RunFailed("BGSAVE did not finish")

    def rewrite(p=port):
        resp(p, ["BGREWRITEAOF"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = resp(p, ["INFO", "persistence"])[0].decode()
            if "aof_rewrite_in_progress:0" in info and "aof_rewrite_scheduled:0" in info:
                return
            time.sleep(0.1)
        raise RunFailed("BGREWRITEAOF did not finish")

    def scan(p=port):
        cursor, seen = b"0", 0
        while True:
            cursor, keys = resp(p, ["SCAN", cursor, "COUNT", 500])[0]
            seen += len(keys)
            if cursor == b"0":
                break
        expect(seen > 0, "SCAN saw nothing")

    def ready(p=port):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if resp(p, ["PING"]) == ["PONG"]:
                    return
            except RunFailed:  # LOADING: still reading its append-only file
                time.sleep(0.05)
        raise RunFailed("redis never answered PING")

    def fresh():  # each session starts from an empty data directory, as a new replica does
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()

    def run(name, *steps, env=None):
        return Run(name, argv, port=port, drive=lambda: [s() for s in (ready, *steps)], env=dict(env or {}),
                   before=fresh)

    sessions = [run("strings", strings, expiry), run("structures", structures, bgsave),
                run("bulk", bulk, scan), run("persist", strings, bgsave, rewrite),
                run("mixed", structures, bulk, expiry), run("scan-save", strings, scan, bgsave)]
    holdouts = [run("bulk-save", lambda: bulk(n=5000), bgsave), run("rewrite", structures, rewrite),
                run("expiry-scan", structures, expiry, scan), run("all", strings, structures, bulk, bgsave)]
    return Program("redis", sessions, holdouts,
                   [injected("redis-check-rdb", "redis-server", lambda n, env: run(n, strings, env=env), listener)])


# ---- git ----------------------------------------------------------------------------------------


def git(work: Path, listener: int) -> Program:
    repo = work / "repo"
    home = work / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_PAGER": "cat", "PAGER": "cat", "LC_ALL": "C"}
    plain = {**os.environ, **env}

    def g(*args):  # set-up and checks outside the workload, with plain git
        return subprocess.run(["git", "-C", str(repo), *args], env=plain, capture_output=True, text=True, check=True)

    repo.mkdir(exist_ok=True)
    g("init", "-q", "-b", "main")
    g("config", "user.name", "Test Author")
    g("config", "user.email", "author@example.invalid")
    # the agent's checkout runs no background work: with auto-maintenance on, git re-runs
    # itself after a commit, and the policy must then let execve through (a spawned shell is
    # then Landlock's to deny, or only reported where Landlock cannot enforce exec)
    g("config", "gc.auto", "0")
    g("config", "maintenance.auto", "false")
    for i in range(12):
        (repo / f"src/mod{i % 4}.py").parent.mkdir(exist_ok=True)
        with open(repo / f"src/mod{i % 4}.py", "a") as f:
            f.write(f"def f{i}():\n    return {i}\n")
        (repo / "README").write_text(f"revision {i}\n")
        g("add", "-A")
        g("commit", "-q", "-m", f"change {i}")
    counter = [0]

    def change():
        counter[0] += 1
        with open(repo / f"src/mod{counter[0] % 4}.py", "a") as f:
            f.write(f"# edit {counter[0]}\n")
        (repo / f"notes-{counter[0]}.txt").write_text("new file\n")
        g("add", "-A")

    def run(name, *args, before=None, check=None):
        return Run(name, ["/usr/bin/git", *args], cwd=repo, env=dict(env), before=before, check=check)

    def has(text):
        def check(r):
            expect(text in r.stdout, f"output lacks {text!r}")
        return check

    def committed(r):
        expect(g("status", "--porcelain").stdout.strip() == "", "the commit left changes behind")

    sessions = [run("log", "log", "--stat", "-n", "6", check=has("change 11")),
                run("commit", "commit", "-q", "-m", "work", before=change, check=committed),
                run("diff", "diff", "HEAD~4", "--", "src", check=has("def f")),
                run("commit-2", "commit", "-q", "-m", "more work", before=change, check=committed),
                run("show", "show", "HEAD~2", check=has("change")),
                run("status", "status", "--short", "--branch", check=has("## main"))]
    holdouts = [run("log-patch", "log", "-p", "-n", "3", check=has("diff --git")),
                run("commit-3", "commit", "-q", "-m", "held-out work", before=change, check=committed),
                run("diff-stat", "diff", "--stat", "HEAD~6", "HEAD", check=has("files changed")),
                run("show-stat", "show", "--stat", "HEAD~1", check=has("notes-"))]
    return Program("git", sessions, holdouts, [injected(
        "git", "status", lambda n, e: Run(n, ["/usr/bin/git", "status"], cwd=repo, env={**env, **e}), listener)])


# ---- sqlite3 --------------------------------------------------------------------------------------

SQL = {
    "create": """
        CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL);
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
        INSERT INTO items(name, qty, price) SELECT 'item-' || i, i % 17, i * 0.25 FROM n;
        SELECT count(*), sum(qty), round(avg(price), 2) FROM items;
    """,
    "index": """
        CREATE INDEX IF NOT EXISTS items_qty ON items(qty);
        SELECT qty, count(*) FROM items GROUP BY qty ORDER BY qty LIMIT 5;
        SELECT name FROM items WHERE qty = 3 ORDER BY price DESC LIMIT 3;
    """,
    "update": """
        BEGIN;
        UPDATE items SET price = price * 1.1 WHERE qty > 10;
        DELETE FROM items WHERE id % 7 = 0;
        COMMIT;
        SELECT count(*) FROM items;
    """,
    "wal": """
        PRAGMA journal_mode = WAL;
        INSERT INTO items(name, qty, price) SELECT name || '-copy', qty, price FROM items LIMIT 500;
        PRAGMA wal_checkpoint(TRUNCATE);
        SELECT count(*) FROM items;
        PRAGMA journal_mode = DELETE;
    """,
    "vacuum": """
        DELETE FROM items WHERE qty < 5;
        VACUUM;
        SELECT count(*) FROM items;
    """,
    "json": """
        CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, body TEXT);
        INSERT INTO docs(body) SELECT json_object('n', id, 'tags', json_array(name, qty)) FROM items LIMIT 300;
        SELECT json_extract(body, '$.n') FROM docs ORDER BY id DESC LIMIT 2;
    """,
    "dump": ".dump items\n",
    "schema": ".schema\n.tables\n",
    "attach": """
        ATTACH DATABASE '{other}' AS other;
        CREATE TABLE IF NOT EXISTS other.prices AS SELECT id, price FROM items LIMIT 100;
        SELECT count(*) FROM items JOIN other.prices USING (id);
    """,
}


def sqlite3(work: Path, listener: int) -> Program:
    base = work / "base.db"
    subprocess.run(["sqlite3", str(base)], input=SQL["create"], text=True, check=True, capture_output=True)
    scripts = work / "scripts"
    scripts.mkdir(exist_ok=True)

    def script(name: str, *parts: str) -> Path:
        p = scripts / f"{name}.sql"
        p.write_text("\n".join(textwrap.dedent(SQL[x]).format(other=work / f"{name}-other.db") for x in parts))
        return p

    def run(name, *parts):
        db = work / f"{name}.db"

        def fresh():
            shutil.copyfile(base, db)
            for extra in (work / f"{name}-other.db",):
                extra.unlink(missing_ok=True)

        def check(r):
            expect(r.returncode == 0 and "Error" not in r.stderr, f"sqlite3: {r.stderr.strip()[:200]}")
            expect(r.stdout.strip() != "", "no output")
        return Run(name, ["/usr/bin/sqlite3", "-batch", str(db)], stdin=script(name, *parts), before=fresh,
                   check=check)

    sessions = [run("create", "create", "index"), run("update", "update", "index"), run("wal", "wal", "index"),
                run("vacuum", "vacuum", "update"), run("json", "json", "index"), run("dump", "update", "dump")]
    holdouts = [run("h-update-vacuum", "update", "vacuum"), run("h-wal-json", "wal", "json"),
                run("h-schema-dump", "index", "schema", "dump"), run("h-attach", "attach", "update")]
    shell_script = scripts / "abuse-shell.sql"
    shell_script.write_text("SELECT count(*) FROM items;\n.shell true\n")
    # an injected script runs sqlite3's .shell; injected code connects and reads another
    # process's memory
    abuse = injected("sqlite3", "sqlite3", lambda n, env: Run(
        n, ["/usr/bin/sqlite3", "-batch", str(work / "abuse.db")], stdin=shell_script,
        before=lambda: shutil.copyfile(base, work / "abuse.db"), env=env), listener, ("connect", "dangerous"))
    abuse.abuses.insert(0, Abuse("dot-shell", lambda v: v["behaviour"] in SPAWN))
    return Program("sqlite3", sessions, holdouts, [abuse])


# ---- pip, installing from a local wheel directory ----------------------------------------------


def _wheel(out: Path, name: str, version: str, requires: list[str], modules: dict[str, str]) -> None:
    """A pure-Python wheel, laid out as PEP 427 says (the packaging is the test's; pip is the program)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/{m}": body.encode() for m, body in modules.items()}
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    files[f"{dist}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: envelope-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist}/top_level.txt"] = f"{name}\n".encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(out / f"{name}-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in sorted(files.items()):
            z.writestr(zipfile.ZipInfo(path, (2024, 1, 1, 0, 0, 0)), data)


def _evil_sdist(out: Path) -> Path:
    """A source distribution whose build runs code: what a malicious package does at install."""
    buf = io.BytesIO()
    setup = ("import os, socket, subprocess\n"
             "try:\n    socket.create_connection(('127.0.0.1', int(os.environ.get('ENVELOPE_ABUSE_PORT', '9'))), 3)\n"
             "except OSError:\n    pass\n"
             "subprocess.call(['/bin/sh', '-c', 'true'])\n"
             "from setuptools import setup\nsetup(name='evil', version='1.0')\n")
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in (("evil-1.0/setup.py", setup), ("evil-1.0/PKG-INFO", "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            t.addfile(info, io.BytesIO(data.encode()))
    path = out / "evil-1.0.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


def pip(work: Path, listener: int) -> Program:
    wheels = work / "wheels"
    wheels.mkdir(exist_ok=True)
    for name, version, requires in (
            ("alpha", "1.0", []), ("alpha", "2.0", []), ("bravo", "1.0", ["alpha>=1.0"]),
            ("charlie", "1.0", ["bravo", "delta<2"]), ("delta", "1.5", []), ("echo", "0.3", ["alpha==2.0"]),
            ("foxtrot", "1.0", ["charlie", "echo"]), ("golf", "2.1", [])):
        mods = {"__init__.py": f"VERSION = {version!r}\n"} | {f"part{i}.py": f"X = {i}\n" * 20 for i in range(6)}
        _wheel(wheels, name, version, requires, mods)
    evil = _evil_sdist(work)
    counter = [0]

    def run(name, *spec, upgrade=False, reinstall=False):
        target = work / "targets" / name
        cmd = [PYTHON, "-m", "pip", "install", "--isolated", "--no-index", "--no-cache-dir",
               "--disable-pip-version-check", "--find-links", str(wheels), "--target", str(target)]
        if upgrade:
            cmd.append("--upgrade")
        if reinstall:
            cmd.append("--force-reinstall")

        def fresh():
            counter[0] += 1
            if not upgrade:
                shutil.rmtree(target, ignore_errors=True)

        def check(r):
            expect(r.returncode == 0, f"pip: {r.stderr.strip()[-300:]}")
            for s in spec:
                pkg = re.split(r"[<>=]", s)[0]
                expect((target / pkg / "__init__.py").exists(), f"{pkg} not installed")
        return Run(name, cmd + list(spec), before=fresh, check=check, env={"PIP_CONFIG_FILE": os.devnull})

    sessions = [run("one", "alpha"), run("deps", "bravo"), run("tree", "charlie"), run("pinned", "echo"),
                run("upgrade", "alpha==1.0", "golf"), run("reinstall", "delta", "golf", reinstall=True)]
    holdouts = [run("h-deep", "foxtrot"), run("h-pair", "bravo", "golf"), run("h-upgrade", "alpha", upgrade=True),
                run("h-reinstall", "charlie", reinstall=True)]
    # a malicious source distribution, whose build would phone home and run a shell
    sdist = Run("sdist", [PYTHON, "-m", "pip", "install", "--isolated", "--no-index", "--no-cache-dir",
                          "--disable-pip-version-check", "--no-build-isolation", "--target",
                          str(work / "targets" / "evil"), str(evil)],
                env={"PIP_CONFIG_FILE": os.devnull, "ENVELOPE_ABUSE_PORT": str(listener)},
                abuses=[Abuse("malicious-sdist", lambda v: v["action"] == "denied")])

    def injected_run(n, env):  # code injected into pip itself
        r = run(n, "alpha")
        r.env.update(env)
        return r
    return Program("pip", sessions, holdouts, [sdist, injected("python3.11", "pip", injected_run, listener)])


#: The abuses of each program, by name (known before any program is built).
ABUSES = {
    "nginx": ["injected-shell", "injected-connect", "injected-dangerous"],
    "busybox-httpd": ["cgi-shell"],
    "redis": ["injected-shell", "injected-connect", "injected-dangerous"],
    "git": ["injected-shell", "injected-connect", "injected-dangerous"],
    "sqlite3": ["dot-shell", "injected-connect", "injected-dangerous"],
    "http.server": ["injected-shell", "injected-connect", "injected-dangerous"],
    "pip": ["malicious-sdist", "injected-shell", "injected-connect", "injected-dangerous"],
}
HOLDOUTS = 4

#: Every program of the suite, built in a work directory with an abuse listener's port.
PROGRAMS: dict[str, Callable[[Path, int], Program]] = {
    "nginx": nginx, "busybox-httpd": busybox_httpd, "redis": redis, "git": git, "sqlite3": sqlite3,
    "http.server": http_server, "pip": pip,
}


def build_program(name: str, work: Path, listener_port: int) -> Program:
    """Program ``name`` set up in ``work`` (created), its abuses aimed at ``listener_port``."""
    work.mkdir(parents=True, exist_ok=True)
    prog = PROGRAMS[name](work, listener_port)
    assert [a.name for r in prog.abuses for a in r.abuses] == ABUSES[name] and len(prog.holdouts) == HOLDOUTS, name
    return prog
