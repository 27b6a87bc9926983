"""Envelope benchmarks: the harness's shared parts.

Each benchmark is a module ``bench/bench_<name>.py`` exposing ``run(quick: bool = False) -> dict``
that returns ``{"title", "method", "rows": [{"case": ..., <metrics>}], "ratios", "targets"}``
(optionally ``"notes": [str]`` and ``"unavailable": reason``). ``python -m bench`` runs them all.

This module holds what several benchmarks need: progress lines, a real cgroup v2 to put load in,
the tiny C load generators of ``bench/progs`` compiled at run time, process CPU and memory
readings, and median/spread summaries. The machine is shared and noisy, so every number a
benchmark reports is a median over repeats, with its spread beside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PROGS_DIR = BENCH_DIR / "progs"
CGROUP_PREFIX = "envelope-bench-"

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the run began."""
    print(f"  [{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / |median|) of repeated measurements."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    spread = (hi - lo) / abs(med) if med else None
    return {"median": med, "min": lo, "max": hi, "spread": spread, "n": len(vals)}


def quartiles(values: list[float]) -> list[float] | None:
    """The interquartile range [q1, q3] of ``values`` (None when there are fewer than 2)."""
    vals = sorted(float(v) for v in values if v is not None)
    if len(vals) < 2:
        return None
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return [q[0], q[2]]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def unavailable(title: str, method: str, reason: str, targets: dict | None = None) -> dict:
    """The result of a benchmark that cannot run on this machine yet, with the reason."""
    return {"title": title, "method": method, "rows": [], "ratios": {}, "targets": targets or {},
            "unavailable": reason}


def cgroup_bpf_missing() -> str | None:
    """Why a benchmark that attaches cgroup BPF programs cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (cgroup and BPF attach)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (python3-bpfcc)"
    return None


# --------------------------------------------------------------------------- cgroup v2


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup v2 mount point, read from mountinfo (``/sys/fs/cgroup/unified`` in hybrid mode)."""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    raise RuntimeError(f"no cgroup2 mount in {mountinfo}; mount one with "
                       "`mount -t cgroup2 none /sys/fs/cgroup/unified`")


class Cgroup:
    """A real cgroup v2 directory owned by the benchmark: created on entry, emptied and removed on exit.

    Names carry ``envelope-bench-<pid>-`` so that anything left behind by a killed run can be
    found and swept (see :func:`sweep_cgroups`).
    """

    def __init__(self, name: str, parent: Path | None = None):
        base = parent if parent is not None else cgroup2_mount()
        leaf = name if parent is not None else f"{CGROUP_PREFIX}{os.getpid()}-{name}"
        self.path = base / leaf
        self.path.mkdir()

    @property
    def id(self) -> int:
        """The cgroup id as BPF's ``bpf_get_current_cgroup_id()`` sees it: the directory's inode."""
        return os.stat(self.path).st_ino

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def child(self, name: str) -> "Cgroup":
        return Cgroup(name, parent=self.path)

    def add(self, pid: int) -> None:
        self.procs.write_text(f"{pid}\n")

    def remove(self) -> None:
        remove_cgroup(self.path)

    def __enter__(self) -> "Cgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Kill every process in ``path`` and below, then remove the directories, deepest first."""
    if not path.exists():
        return
    for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup(sub, timeout)
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while True:
        pids = _cgroup_pids(path)
        if not pids:
            break
        if kill_file.exists():
            try:
                kill_file.write_text("1\n")
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"cgroup {path} still has processes {pids} after {timeout}s")
        time.sleep(0.05)
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:  # EBUSY while the last exits are reaped
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot remove cgroup {path}: {e}") from e
            time.sleep(0.05)


def sweep_cgroups(owner_pid: int | None = None) -> list[str]:
    """Remove benchmark cgroups left by ``owner_pid`` (or by any process that no longer exists)."""
    try:
        mount = cgroup2_mount()
    except RuntimeError:
        return []
    removed = []
    for path in mount.glob(f"{CGROUP_PREFIX}*"):
        try:
            pid = int(path.name[len(CGROUP_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == owner_pid or (owner_pid is None and not Path(f"/proc/{pid}").exists()):
            remove_cgroup(path)
            removed.append(str(path))
    return removed


# --------------------------------------------------------------------------- load generators


@dataclass
class Programs:
    """The C programs of ``bench/progs``, compiled with gcc into a temporary directory."""

    dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Programs":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


STATIC_PROGRAMS = {"true_static"}


def build_programs(names: list[str] | None = None) -> Programs:
    """Compile ``bench/progs/<name>.c`` (all of them by default) with gcc -O2 into a temp dir."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not found; install gcc and libc6-dev (make setup)")
    sources = sorted(PROGS_DIR.glob("*.c"))
    if names is not None:
        sources = [PROGS_DIR / f"{n}.c" for n in names]
    progs = Programs(Path(tempfile.mkdtemp(prefix="envelope-bench-progs-")))
    try:
        for src in sources:
            out = progs.dir / src.stem
            cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)]
            if src.stem in STATIC_PROGRAMS:
                cmd.insert(1, "-static")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"gcc {src.name} failed: {proc.stderr.strip()}")
            progs.paths[src.stem] = out
    except BaseException:
        progs.cleanup()
        raise
    return progs


def parse_kv(line: str) -> dict[str, float]:
    """Parse a generator's ``key=value key=value`` summary line into numbers."""
    out = {}
    for part in line.split():
        key, sep, value = part.partition("=")
        if sep:
            out[key] = float(value)
    return out


def kill_process_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- process readings

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def process_rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    return psutil.Process(pid).memory_info().rss


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (gone ones left out)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def process_memory(pid: int) -> dict[str, int]:
    """RSS split into anonymous and file-backed/shared bytes, and PSS, which charges shared
    library pages fairly (psutil: ``shared`` is RssFile + RssShmem)."""
    p = psutil.Process(pid)
    full = p.memory_full_info()
    return {"VmRSS": full.rss, "RssAnon": full.rss - full.shared, "RssFile": full.shared,
            "Pss": full.pss}


def machine() -> dict:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "loadavg_at_start": list(os.getloadavg()),
    }
