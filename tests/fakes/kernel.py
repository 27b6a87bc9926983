"""An in-memory kernel back end for :class:`enforcer.session.EnforcementSession`.

It keeps what the real one keeps in bpffs and in cgroups: program sets with their rules
(compiled by the real pure compiler, :func:`enforcer.egress_rules.compile_rules`), attachments
per cgroup directory, pins as files under a bpffs directory the test owns, and ring buffers as
lists of raw records. Failures are injected per cgroup or per operation, so the session's
all-or-nothing and rollback logic is tested without root. What it cannot show (that the
kernel really denies) is the privileged tests' job.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from enforcer.egress import PROGRAMS, EgressError, check_pins, make_pin_dir
from enforcer.egress_rules import EgressRuleError, Limits, compile_rules, split_state_word, state_word

_fds = itertools.count(1000)


@dataclass
class Pinned:
    workload: str
    rules: tuple = ()  # trie entries of the active generation
    names: tuple = ()  # name trie entries of the active generation
    generation: int = 0
    mode: str = "observe"
    policy_hash: bytes = b""
    cgroups: dict = field(default_factory=dict)  # cgroup id -> path
    attached: set = field(default_factory=set)  # cgroup paths with the programs attached
    ring: int = 0


class FakeEgressProgram:
    def __init__(self, kernel: "FakeKernel", state: Pinned, pin_dir: Path | None, limits: Limits):
        self.kernel = kernel
        self.st = state
        self.workload = state.workload
        self.pin_dir = pin_dir
        self.limits = limits
        self.prog_ids = {name: next(_fds) for name in PROGRAMS}
        self.closed = False

    @property
    def events_fd(self) -> int:
        return self.st.ring

    def _live(self) -> None:
        if self.closed:
            raise EgressError(f"program set of {self.workload} is closed")

    def attach(self, path) -> bool:
        self._live()
        path = str(path)
        if path in self.kernel.fail_attach:
            raise EgressError(f"attach connect4 to cgroup {path}: Operation not permitted")
        if not Path(path).is_dir():
            raise EgressError(f"open cgroup {path}: No such file or directory")
        self.st.cgroups[os.stat(path).st_ino] = path
        if path in self.st.attached:
            return False
        self.st.attached.add(path)
        return True

    def attached(self, path) -> bool:
        return str(path) in self.st.attached

    def detach(self, path) -> None:
        path = str(path)
        self.st.attached.discard(path)
        for cid, p in list(self.st.cgroups.items()):
            if p == path:
                del self.st.cgroups[cid]

    def write_policy(self, rules, mode, policy_hash=b"", grace=0.0, names=(), *, finish=True):
        self._live()
        if self.kernel.fail_write:
            raise EgressError(f"map rules: update: Argument list too long ({self.workload})")
        try:
            compiled = compile_rules(rules, 1 - self.st.generation, self.limits, names)
        except EgressRuleError as e:
            raise EgressError(str(e)) from e
        self._swap = None if finish else (self.st.generation, self.st.rules, self.st.mode,
                                          self.st.policy_hash, self.st.names)
        self.st.generation = compiled.generation
        self.st.rules = compiled.trie
        self.st.names = compiled.names
        self.st.mode = mode
        self.st.policy_hash = policy_hash
        self.kernel.swaps.append((self.workload, mode, len(compiled.trie)))
        return compiled

    def finish_swap(self) -> None:
        self._swap = None

    def revert_swap(self) -> None:
        swap, self._swap = getattr(self, "_swap", None), None
        if swap is not None:
            (self.st.generation, self.st.rules, self.st.mode, self.st.policy_hash,
             self.st.names) = swap
            self.kernel.swaps.append((self.workload, "reverted", len(self.st.rules)))

    def repin(self) -> None:
        if self.pin_dir is not None:
            make_pin_dir(self.pin_dir)
            for name in PROGRAMS:
                (self.pin_dir / f"prog_{name}").write_text(self.workload)
                os.chmod(self.pin_dir / f"prog_{name}", 0o600)
            self.kernel.pins[self.pin_dir] = self.st

    def set_mode(self, mode: str) -> None:
        self.st.mode = mode

    def verify(self, rules, mode, policy_hash=b"", names=()) -> list[str]:
        problems = []
        if self.st.mode != mode:
            problems.append(f"mode is {self.st.mode}, expected {mode}")
        compiled = compile_rules(rules, self.st.generation, self.limits, names)
        if tuple(compiled.trie) != tuple(self.st.rules):
            problems.append("rules differ")
        if tuple(compiled.names) != tuple(self.st.names):
            problems.append("names differ")
        return problems

    def state(self) -> tuple[int, str]:
        return split_state_word(state_word(self.st.generation, self.st.mode))

    def cgroups(self) -> dict[int, str]:
        return dict(self.st.cgroups)

    def prune_cgroups(self) -> list[str]:
        gone = [p for cid, p in self.st.cgroups.items() if not Path(p).is_dir()]
        for p in gone:
            self.detach(p)
        return gone

    def lost(self) -> int:
        return self.kernel.lost.get(self.workload, 0)

    def unpin(self) -> None:
        if self.pin_dir is None or not self.pin_dir.exists():
            return
        for p in self.pin_dir.iterdir():
            p.unlink()
        self.pin_dir.rmdir()
        self.kernel.pins.pop(self.pin_dir, None)

    def close(self) -> None:
        self.closed = True

    def remove(self) -> None:
        for p in list(self.st.attached):
            self.detach(p)
        self.unpin()
        self.close()


class FakeDenialProbe:
    def __init__(self, kernel: "FakeKernel"):
        self.kernel = kernel
        self.events_fd = next(_fds)
        kernel.rings[self.events_fd] = []
        self.watched: dict[int, tuple] = {}
        self.totals: dict[bytes, int] = {}  # the kernel's ``counts``: key -> calls so far
        self.sockets_restricted: dict[int, bool] = {}

    def watch(self, cgroup_id, mode, deny_errno, allowed_syscalls=(), restrict_sockets=False):
        self.watched[cgroup_id] = (mode, deny_errno, tuple(sorted(allowed_syscalls)))
        self.sockets_restricted[cgroup_id] = restrict_sockets

    def unwatch(self, cgroup_id):
        self.watched.pop(cgroup_id, None)

    def counts(self) -> list[tuple[bytes, int]]:
        return list(self.totals.items())

    def forget(self, key: bytes) -> None:
        self.totals.pop(key, None)

    def lost(self) -> int:
        return 0

    def uncounted(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FakeFileDenialProbe:
    """The Landlock refusal probe: watched cgroup ids and a ring of EV_FILE_DENIAL records."""

    def __init__(self, kernel: "FakeKernel"):
        self.kernel = kernel
        self.events_fd = next(_fds)
        kernel.rings[self.events_fd] = []
        self.watched: set[int] = set()

    def watch(self, cgroup_id):
        self.watched.add(cgroup_id)

    def unwatch(self, cgroup_id):
        self.watched.discard(cgroup_id)

    def lost(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FakeRingReader:
    def __init__(self, kernel: "FakeKernel"):
        self.kernel = kernel
        self.callbacks: dict[int, object] = {}

    def add(self, fd, callback, size=None):
        self.callbacks[fd] = callback

    def remove(self, fd):
        self.callbacks.pop(fd, None)

    def drain(self, limit=None) -> int:
        n = 0
        for fd, cb in self.callbacks.items():
            ring = self.kernel.rings.get(fd, [])
            while ring and (limit is None or n < limit):
                cb(ring.pop(0))
                n += 1
        return n

    def poll(self, timeout_ms=0, limit=None) -> int:
        return self.drain(limit)

    def close(self):
        self.callbacks = {}


class FakeKernel:
    """The back end. ``fail_attach`` (cgroup paths) and ``fail_write`` inject failures."""

    def __init__(self):
        self.pins: dict[Path, Pinned] = {}
        self.rings: dict[int, list[bytes]] = {}
        self.fail_attach: set[str] = set()
        self.fail_write = False
        self.lost: dict[str, int] = {}
        self.swaps: list[tuple] = []
        self.loads = 0
        self.probes: list[FakeDenialProbe] = []
        self.moved: list[tuple[int, str]] = []  # (pid, cgroup path) moved by the session
        self.gone_pids: set[int] = set()
        self.unmovable_pids: set[int] = set()  # moves refused (outside the cgroup namespace)
        self.killed: list[int] = []
        self.file_probes: list[FakeFileDenialProbe] = []

    def _state(self, workload: str) -> Pinned:
        st = Pinned(workload, ring=next(_fds))
        self.rings[st.ring] = []
        return st

    def load_egress(self, workload: str, pin_dir: Path | None, limits: Limits):
        self.loads += 1
        st = self._state(workload)
        if pin_dir is not None:
            if pin_dir.exists() and any(pin_dir.iterdir()):
                raise EgressError(f"{pin_dir} already holds pinned objects; adopt or remove them first")
            make_pin_dir(pin_dir)
            for name in PROGRAMS:
                (pin_dir / f"prog_{name}").write_text(workload)
                os.chmod(pin_dir / f"prog_{name}", 0o600)  # what BPF_OBJ_PIN gives a pin
            self.pins[pin_dir] = st
        return FakeEgressProgram(self, st, pin_dir, limits)

    def adopt_egress(self, pin_dir: Path, limits: Limits):
        st = self.pins.get(pin_dir)
        if st is None:
            raise EgressError(f"adopt {pin_dir}: No such file or directory")
        check_pins(pin_dir)
        return FakeEgressProgram(self, st, pin_dir, limits)

    def pinned_egress(self, bpffs: Path) -> list[Path]:
        from enforcer.egress import pinned_sets
        return pinned_sets(bpffs)

    def denial_probe(self):
        p = FakeDenialProbe(self)
        self.probes.append(p)
        return p

    def file_denial_probe(self):
        p = FakeFileDenialProbe(self)
        self.file_probes.append(p)
        return p

    def ring_reader(self):
        return FakeRingReader(self)

    def move_task(self, pid, cgroup_path):
        if pid in self.gone_pids:
            raise ProcessLookupError(3, "No such process")
        if pid in self.unmovable_pids:
            raise FileNotFoundError(2, "No such file or directory")
        self.moved.append((pid, cgroup_path))

    def kill_task(self, pid):
        if pid in self.gone_pids:
            raise ProcessLookupError(3, "No such process")
        self.killed.append(pid)

    # -- what the kernel would do --

    def state_of(self, pin_dir: Path) -> Pinned:
        return self.pins[pin_dir]

    def emit(self, fd: int, record: bytes) -> None:
        """A record in a ring buffer, as the programs would submit it."""
        self.rings.setdefault(fd, []).append(record)
