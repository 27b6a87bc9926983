"""What this kernel and host can do for the sensor, found by asking them, not by version.

Every check tries the real thing where it can: it creates a map, loads a two-instruction
program, opens a raw tracepoint, links a cgroup program into a scratch cgroup. Version numbers
lie on distribution and vendor kernels (features are backported, or configured out), so the
only trustworthy answer is the kernel's own. Each check returns a :class:`Check` with ``ok``,
a ``detail`` of what was found and a ``fix`` that says what to do.

The ``bpf(2)`` commands come from :mod:`sensor.kernel`, the one kernel binding.
"""

from __future__ import annotations

import bisect
import os
import platform
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .kernel import (
    BPF_CGROUP_INET4_CONNECT, BPF_LSM_MAC, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF,
    BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_PROG_TYPE_KPROBE, BPF_PROG_TYPE_LSM, BPF_PROG_TYPE_RAW_TRACEPOINT,
    BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, BpfError, close_fds, link_create, map_create,
    open_cgroup, prog_load, raw_tracepoint_open, uprobe_open,
)

# r0 = 1; exit
_RETURN_ONE = bytes.fromhex("b700000001000000" "9500000000000000")
_RETURN_ZERO = bytes.fromhex("b700000000000000" "9500000000000000")

# r1 = 9; call bpf_send_signal; r0 = 0; exit
_SEND_SIGNAL = bytes.fromhex("b701000009000000" "850000006d000000" "b700000000000000" "9500000000000000")
# r2 = -1; call bpf_override_return (r1 is the context); r0 = 0; exit
_OVERRIDE_RETURN = bytes.fromhex("b702000000000000" "850000003a000000" "b700000000000000" "9500000000000000")

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# Tracepoints and the fields of each that bpf/sensor.c reads.
TRACEPOINTS = {
    "sched/sched_process_exec": ("filename", "pid", "old_pid"),
    "sched/sched_process_fork": ("parent_pid", "child_pid"),
    "sched/sched_process_exit": ("pid", "group_dead"),
    "cgroup/cgroup_attach_task": (),
    "cgroup/cgroup_transfer_tasks": (),
    "cgroup/cgroup_rmdir": ("root", "id"),
    "raw_syscalls/sys_enter": ("id", "args"),
}
#: The tracepoint bpf/capabilities.c reads as a raw tracepoint, with its TP_STRUCT fields in the
#: order of its TP_PROTO arguments (include/trace/events/capability.h): the program reads
#: argument 3 (cap) and 4 (ret).
CAPABILITY_TRACEPOINT = "capability/cap_capable"
CAPABILITY_FIELDS = ("cred", "target_ns", "capable_ns", "cap", "ret")


# ---- BTF: enough of the format to find a function's type id -----------------------------------

_BTF_KIND_EXTRA = {  # bytes after struct btf_type, as (fixed, per vlen)
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0), 8: (0, 0),
    9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0), 15: (0, 12),
    16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12),
}
BTF_KIND_FUNC = 12


def btf_func_id(name: str, path: str = "/sys/kernel/btf/vmlinux") -> int | None:
    """The BTF type id of function ``name`` in the kernel's BTF, or None."""
    data = Path(path).read_bytes()
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from(
        "<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        return None
    types = hdr_len + type_off
    strs = hdr_len + str_off
    want = name.encode()
    off, end, tid = types, types + type_len, 1
    while off < end:
        name_off, info, _ = struct.unpack_from("<III", data, off)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        if kind == BTF_KIND_FUNC:
            s = strs + name_off
            if data[s:s + len(want) + 1] == want + b"\0":
                return tid
        fixed, per = _BTF_KIND_EXTRA.get(kind, (0, 0))
        off += 12 + fixed + per * vlen
        tid += 1
    return None


# ---- checks -----------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def tracefs_path() -> Path | None:
    for p in TRACEFS_CANDIDATES:
        if Path(p, "events").is_dir():
            return Path(p)
    return None


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, f"euid {os.geteuid()}",
                 "" if ok else "run as root (or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")


def check_bpf_permission() -> Check:
    try:
        fd = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    except BpfError as e:
        return Check("bpf_permission", False, f"bpf(BPF_MAP_CREATE): {os.strerror(e.errno or 0)}",
                     "run as root; check kernel.unprivileged_bpf_disabled and that no seccomp "
                     "profile or container runtime blocks bpf(2)")
    close_fds([fd])
    return Check("bpf_permission", True, "bpf(2) creates maps")


def check_ringbuf() -> Check:
    try:
        fd = map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    except BpfError as e:
        return Check("ringbuf", False, f"BPF_MAP_TYPE_RINGBUF: {os.strerror(e.errno or 0)}",
                     "needs a kernel with BPF ring buffers (CONFIG_BPF_SYSCALL, 5.8 or later)")
    close_fds([fd])
    return Check("ringbuf", True, "ring buffer map created")


def check_raw_tracepoint() -> Check:
    prog = link = None
    try:
        prog = prog_load(BPF_PROG_TYPE_RAW_TRACEPOINT, _RETURN_ZERO)
        link = raw_tracepoint_open("sys_enter", prog)
    except BpfError as e:
        step = "load" if prog is None else "attach to sys_enter"
        return Check("raw_tracepoint", False, f"raw tracepoint {step}: {os.strerror(e.errno or 0)}",
                     "needs BPF raw tracepoints (CONFIG_BPF_EVENTS); syscall counting needs them")
    finally:
        close_fds([link, prog])
    return Check("raw_tracepoint", True, "raw tracepoint program attached to sys_enter")


def check_tracefs() -> Check:
    p = tracefs_path()
    if p is None:
        return Check("tracefs", False, "no tracefs with events/ at " + ", ".join(TRACEFS_CANDIDATES),
                     "mount -t tracefs nodev /sys/kernel/tracing")
    return Check("tracefs", True, f"mounted at {p}")


def parse_tracepoint_fields(format_text: str) -> list[str]:
    """Field names of a tracefs ``format`` file, common_* fields left out."""
    names = []
    for line in format_text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        decl = line[len("field:"):].split(";", 1)[0].strip()
        name = decl.split()[-1].split("[", 1)[0]
        if not name.startswith("common_"):
            names.append(name)
    return names


def check_tracepoints() -> Check:
    base = tracefs_path()
    if base is None:
        return Check("tracepoints", False, "tracefs not mounted",
                     "mount -t tracefs nodev /sys/kernel/tracing")
    problems = []
    for tp, fields in TRACEPOINTS.items():
        fmt = base / "events" / tp / "format"
        try:
            have = set(parse_tracepoint_fields(fmt.read_text()))
        except OSError as e:
            problems.append(f"{tp}: {os.strerror(e.errno or 0)}")
            continue
        missing = [f for f in fields if f not in have]
        if missing:
            problems.append(f"{tp}: no field {', '.join(missing)}")
    if problems:
        return Check("tracepoints", False, "; ".join(problems),
                     "needs CONFIG_TRACEPOINTS with the sched, cgroup and raw_syscalls events")
    return Check("tracepoints", True, f"{len(TRACEPOINTS)} tracepoints with the fields the sensor reads")


def check_cgroup2() -> Check:
    from .cgroup import CgroupError, cgroup2_mount_point
    try:
        mp = cgroup2_mount_point()
    except CgroupError as e:
        return Check("cgroup2", False, str(e),
                     "mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid) or boot with "
                     "systemd.unified_cgroup_hierarchy=1")
    return Check("cgroup2", True, f"mounted at {mp}")


def check_cgroup_bpf() -> Check:
    """Link a sock_addr connect4 program (one that allows everything) into the cgroup v2 root,
    as the sensor's observation programs are, then close the link. Nothing is created: the
    daemon's cgroup mount is read-only in its pod, and the root may be mode 0555 (mkdir there
    would need CAP_DAC_OVERRIDE)."""
    from .cgroup import CgroupError, cgroup2_mount_point
    try:
        mp = cgroup2_mount_point()
    except CgroupError as e:
        return Check("cgroup_bpf", False, str(e), "mount cgroup v2 first (see cgroup2)")
    prog = cg = link = None
    step = "load connect4 program"
    try:
        prog = prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, _RETURN_ONE, BPF_CGROUP_INET4_CONNECT)
        step = f"open {mp}"
        cg = open_cgroup(mp)
        step = "link connect4 into the cgroup v2 root"
        link = link_create(prog, cg, BPF_CGROUP_INET4_CONNECT)
    except OSError as e:
        return Check("cgroup_bpf", False, f"{step}: {os.strerror(e.errno or 0)}",
                     "needs CONFIG_CGROUP_BPF, cgroup v2, and CAP_BPF with CAP_NET_ADMIN; network "
                     "destinations are observed with cgroup sock_addr programs")
    finally:
        close_fds([link, cg, prog])
    return Check("cgroup_bpf", True, "sock_addr program linked into the cgroup v2 root (connect4)")


def check_btf() -> Check:
    p = Path("/sys/kernel/btf/vmlinux")
    if not p.exists():
        return Check("btf", False, "no /sys/kernel/btf/vmlinux",
                     "the file substrate reads each call's arguments with bpf_task_pt_regs, which needs "
                     "BTF (CONFIG_DEBUG_INFO_BTF=y); it also enables fentry and LSM programs", required=False)
    return Check("btf", True, f"{p} ({p.stat().st_size} bytes)", required=False)


#: The syscalls whose exits the file substrate's programs read (bpf/files.c; open, rename and the
#: other legacy calls are absent on some architectures, which is fine).
FILE_EXITS = ("openat", "openat2", "execve", "execveat", "unlinkat", "mkdirat", "renameat2", "linkat",
              "symlinkat", "mknodat")


def check_file_tracepoints() -> Check:
    base = tracefs_path()
    if base is None:
        return Check("file_tracepoints", False, "tracefs not mounted", "mount -t tracefs nodev /sys/kernel/tracing",
                     required=False)
    missing = []
    for sc in FILE_EXITS:
        fmt = base / "events" / "syscalls" / f"sys_exit_{sc}" / "format"
        try:
            fields = set(parse_tracepoint_fields(fmt.read_text()))
        except OSError:
            missing.append(sc)
            continue
        if not {"__syscall_nr", "ret"} <= fields:
            missing.append(sc)
    if missing:
        return Check("file_tracepoints", False, f"no syscalls:sys_exit_* tracepoint for {', '.join(missing)}",
                     "the file substrate needs CONFIG_FTRACE_SYSCALLS; without it set observe_files: false",
                     required=False)
    return Check("file_tracepoints", True, f"syscalls:sys_exit_* of {len(FILE_EXITS)} file syscalls, "
                 "each with __syscall_nr and ret", required=False)


def check_kernel_headers() -> Check:
    rel = os.uname().release
    base = Path("/lib/modules") / rel
    for sub in ("build", "source"):
        if (base / sub / "include" / "linux" / "kconfig.h").exists():
            target = os.path.realpath(base / sub)
            return Check("kernel_headers", True, f"{base / sub} -> {target}")
    return Check("kernel_headers", False, f"no {base}/build/include/linux/kconfig.h",
                 "run `make setup` (installs linux-headers-amd64 and links it at "
                 f"{base}/build; BCC compiles against it)")


def check_bcc() -> Check:
    """Found without importing it: importing bcc maps libbcc (LLVM) into this process."""
    import importlib.util
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return Check("bcc", False, "python module bcc not found",
                     "apt-get install python3-bpfcc and use a venv made with "
                     "--system-site-packages (PyPI's 'bcc' is an unrelated package)")
    where = Path(spec.origin).parent
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", _read(where / "version.py"))
    return Check("bcc", True, f"bcc {m.group(1) if m else '(version unknown)'} from {where}")


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def check_arch() -> Check:
    m = platform.machine()
    ok = m == "x86_64"
    return Check("arch", ok, m, "" if ok else
                 "the syscall table and entry-frame offsets in the sensor are x86_64 only")


def kprobes_available() -> bool:
    """The kprobe PMU, through which BCC attaches kprobes owned by a file descriptor."""
    return Path("/sys/bus/event_source/devices/kprobe/type").exists()


def check_kprobes() -> Check:
    base = tracefs_path()
    pmu = kprobes_available()
    events = base is not None and (base / "kprobe_events").exists()
    ok = pmu or events
    return Check("kprobes", ok, "kprobe PMU or kprobe_events present" if ok else
                 "no kprobe PMU and no kprobe_events", "" if ok else
                 "not needed where the capability:cap_capable tracepoint exists: the sensor relies on "
                 "tracepoints and raw tracepoints, and uses a kprobe only as the capability probe's "
                 "fallback", required=False)


def kallsyms_text(path: str = "/proc/kallsyms") -> dict[str, tuple[int, int]]:
    """Kernel text symbols -> (start, end) address, the end being the next higher symbol address;
    empty when the addresses are hidden (kptr_restrict, no CAP_SYSLOG: every address reads 0)."""
    starts: list[tuple[int, str]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("t", "T"):
                    starts.append((int(parts[0], 16), parts[2]))
    except OSError:
        return {}
    addrs = sorted({a for a, _ in starts})
    if not addrs or addrs[-1] == 0:
        return {}
    out = {}
    for addr, name in starts:
        i = bisect.bisect_right(addrs, addr)
        if addr and i < len(addrs) and name not in out:
            out[name] = (addr, addrs[i])
    return out


def raw_tracepoint_works(name: str) -> bool:
    """Whether a raw tracepoint program attaches to ``name`` (tried, then detached)."""
    prog = link = None
    try:
        prog = prog_load(BPF_PROG_TYPE_RAW_TRACEPOINT, _RETURN_ZERO)
        link = raw_tracepoint_open(name, prog)
        return True
    except BpfError:
        return False
    finally:
        close_fds([link, prog])


def capability_attach_point() -> tuple[str | None, str]:
    """How ``bpf/capabilities.c`` can see capability checks on this kernel, and what was found:
    ``"tracepoint"`` (capability:cap_capable with the expected arguments, as a raw tracepoint),
    ``"kprobe"`` (no such tracepoint, but kprobes and a ``cap_capable`` symbol), or None."""
    base = tracefs_path()
    fmt = base / "events" / CAPABILITY_TRACEPOINT / "format" if base is not None else None
    if fmt is not None and fmt.exists():
        fields = tuple(parse_tracepoint_fields(_read(fmt)))
        if fields != CAPABILITY_FIELDS:
            return None, (f"tracepoint {CAPABILITY_TRACEPOINT} has fields {', '.join(fields)}, not the "
                          f"{', '.join(CAPABILITY_FIELDS)} the probe reads")
        if raw_tracepoint_works("cap_capable"):
            return "tracepoint", f"raw tracepoint cap_capable ({CAPABILITY_TRACEPOINT}: cap, ret)"
        return None, "tracepoint cap_capable exists but a raw tracepoint program does not attach to it"
    if kprobes_available() and "cap_capable" in kallsyms_names():
        return "kprobe", f"no {CAPABILITY_TRACEPOINT} tracepoint: kprobe and kretprobe on cap_capable"
    return None, (f"no {CAPABILITY_TRACEPOINT} tracepoint (Linux 6.14+) and no kprobes (CONFIG_KPROBES) to "
                  f"fall back to")


def kallsyms_names(path: str = "/proc/kallsyms") -> set[str]:
    """Every kernel text symbol name (names are listed even when addresses are hidden)."""
    out = set()
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("t", "T"):
                    out.add(parts[2])
    except OSError:
        pass
    return out


#: Where overcommit accounting asks for CAP_SYS_ADMIN (see bpf/capabilities.c).
VM_ACCOUNTING_FUNCTIONS = ("security_vm_enough_memory_mm", "cap_vm_enough_memory")


def overcommit_ranges() -> tuple[tuple[int, int], tuple[tuple[int, int], ...]] | None:
    """The address range of ``cap_capable`` and those of :data:`VM_ACCOUNTING_FUNCTIONS`, which
    ``bpf/capabilities.c`` tells apart by them; None when kallsyms hides addresses or lacks one."""
    syms = kallsyms_text()
    acct = tuple(syms[f] for f in VM_ACCOUNTING_FUNCTIONS if f in syms)
    if "cap_capable" not in syms or not acct:
        return None
    return syms["cap_capable"], acct


def check_capability_probe() -> Check:
    how, detail = capability_attach_point()
    if how is None:
        return Check("capability_probe", False, detail,
                     "the capability substrate is not observed: sessions are recorded without it and "
                     "derive leaves it out; a kernel with the capability:cap_capable tracepoint (6.14+) "
                     "or with kprobes observes it", required=False)
    if overcommit_ranges() is None:
        return Check("capability_probe", True,
                     f"{detail}; kernel addresses are hidden (kptr_restrict or no CAP_SYSLOG), so overcommit "
                     f"accounting's CAP_SYS_ADMIN checks count as behaviour", required=False)
    return Check("capability_probe", True, f"{detail}; overcommit accounting's CAP_SYS_ADMIN checks left out",
                 required=False)


def check_uprobes() -> Check:
    """A uprobe on a file runs a program: what the request capture's TLS side needs."""
    prog = fd = None
    try:
        prog = prog_load(BPF_PROG_TYPE_KPROBE, _RETURN_ZERO)
        fd = uprobe_open(prog, "/proc/self/exe", 0)
    except BpfError as e:
        return Check("uprobes", False, f"uprobe with a BPF program: {e}",
                     "TLS requests cannot be observed; needs CONFIG_UPROBE_EVENTS and the uprobe PMU "
                     "(/sys/bus/event_source/devices/uprobe)", required=False)
    finally:
        close_fds([fd, prog])
    return Check("uprobes", True, "a uprobe runs a BPF program (perf_event_open + PERF_EVENT_IOC_SET_BPF)",
                 required=False)


def uprobe_actions() -> dict[str, str]:
    """What a program on a uprobe may do to the process it stopped, asked of the kernel:
    ``send_signal`` (``bpf_send_signal``, the request capture's enforce action) and
    ``override_return`` (make the probed call fail instead). Each is ``yes`` or why not."""
    out: dict[str, str] = {}
    prog = None
    try:
        prog = prog_load(BPF_PROG_TYPE_KPROBE, _SEND_SIGNAL)
        out["send_signal"] = "yes"
    except BpfError as e:
        out["send_signal"] = f"refused by the verifier ({os.strerror(e.errno or 0)})"
    finally:
        close_fds([prog])
    prog = fd = None
    try:
        prog = prog_load(BPF_PROG_TYPE_KPROBE, _OVERRIDE_RETURN)
        fd = uprobe_open(prog, "/proc/self/exe", 0)
        out["override_return"] = "yes"
    except BpfError as e:
        what = "load" if prog is None else "attach to a uprobe"
        out["override_return"] = f"{what} refused ({os.strerror(e.errno or 0)})"
    finally:
        close_fds([fd, prog])
    return out


def check_uprobe_actions() -> Check:
    acts = uprobe_actions()
    ok = acts.get("send_signal") == "yes"
    detail = "; ".join(f"bpf_{k}: {v}" for k, v in acts.items())
    return Check("uprobe_actions", ok, detail,
                 "" if ok else "the http substrate cannot enforce (its enforce action is a signal "
                               "from the probe); alert mode still reports", required=False)


def _check_btf_prog(name: str, prog_type: int, attach_type: int, func: str, fix: str) -> Check:
    try:
        btf_id = btf_func_id(func)
    except OSError as e:
        return Check(name, False, f"read BTF: {os.strerror(e.errno or 0)}", fix, required=False)
    if btf_id is None:
        return Check(name, False, f"no BTF function {func}", fix, required=False)
    fd = None
    try:
        fd = prog_load(prog_type, _RETURN_ZERO, attach_type, btf_id)
    except BpfError as e:
        return Check(name, False, f"load {name} program on {func}: {os.strerror(e.errno or 0)}", fix,
                     required=False)
    finally:
        close_fds([fd])
    return Check(name, True, f"{name} program loads on {func}", required=False)


def check_fentry() -> Check:
    return _check_btf_prog("fentry", BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, "do_nanosleep",
                           "not used: the sensor relies on tracepoints and raw tracepoints")


def check_lsm() -> Check:
    return _check_btf_prog("lsm", BPF_PROG_TYPE_LSM, BPF_LSM_MAC, "bpf_lsm_bprm_check_security",
                           "exec can be observed but not enforced; enforcing it needs BPF-LSM "
                           "(CONFIG_BPF_LSM=y and 'bpf' in the lsm= boot parameter)")


CHECKS = (check_root, check_arch, check_bcc, check_bpf_permission, check_kernel_headers,
          check_tracefs, check_tracepoints, check_raw_tracepoint, check_ringbuf, check_cgroup2,
          check_cgroup_bpf, check_btf, check_kprobes, check_capability_probe, check_file_tracepoints,
          check_fentry, check_lsm, check_uprobes, check_uprobe_actions)


def run_checks() -> list[Check]:
    out = []
    for fn in CHECKS:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - a broken check reports, it does not abort
            out.append(Check(fn.__name__.removeprefix("check_"), False,
                             f"check failed: {type(e).__name__}: {e}", "report this as a bug"))
    return out


def failed_required(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.required and not c.ok]
