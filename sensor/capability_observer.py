"""The capability substrate's observation: a sensor extension (:class:`sensor.probes.Extension`)
that loads ``bpf/capabilities.c`` and turns what the kernel counts into ``capability:NAME``
readings.

The kernel counts every capability check per (cgroup, capability, granted or refused, before or
after the cgroup's first exec) in one hash map, cumulatively, with first and last time. Here:

* :meth:`CapabilityObserver.behaviour_counts` reports the **granted** checks as behaviours
  (``capability:NET_BIND_SERVICE``), as :class:`sensor.aggregate.KeyReading`; for the cgroups in
  ``after_exec`` only the checks made from the cgroup's first exec on (a container runtime's own
  setup before it is not the workload's);
* :meth:`CapabilityObserver.refused_counts` reports the **refused** checks the same way: what the
  workload tried without the privilege, evidence kept apart from behaviours (a refused check is
  never admitted into a policy);
* :meth:`CapabilityObserver.loss` reports checks that were not counted (the map was full, a
  capability number this build does not know); :meth:`CapabilityObserver.stats` also counts the
  overcommit-accounting checks left out on purpose (see ``bpf/capabilities.c``);
* :meth:`CapabilityObserver.forget_cgroup` drops the counters of a cgroup that is gone.

The probe is the ``capability:cap_capable`` tracepoint (Linux 6.14+) read as a raw tracepoint, or
on kernels without it a kprobe and kretprobe on ``cap_capable``
(:func:`sensor.features.capability_attach_point`). A kernel with neither has no capability
observation: :func:`available` says why, in one line.
"""

from __future__ import annotations

from typing import Container, Sequence

import structlog

from . import capabilities, features, kernel
from .aggregate import KeyReading
from .kernel import Family, Map, Program
from .mirrors import (CAPS_F_AFTER_EXEC, CAPS_F_REFUSED, CAPS_STAT_MAP_FULL, CAPS_STAT_OVERCOMMIT,
                      CAPS_STAT_STACK_WALKS, CAPS_STAT_UNKNOWN_CAP, U32, U64, CapCount, CapKey)

log = structlog.get_logger(__name__)

SOURCE = kernel.BPF_DIR / "capabilities.c"
LOSS_NAMES = {CAPS_STAT_MAP_FULL: "map_full", CAPS_STAT_UNKNOWN_CAP: "unknown_capability"}


class CapabilityProbeError(RuntimeError):
    """The capability probe cannot run here: ``"<what>: <why>; fix: <action>"``."""


def available() -> tuple[str | None, str]:
    """The attach point on this kernel (``tracepoint``, ``kprobe``) or None, and what was found."""
    return features.capability_attach_point()


def family(how: str, cflags: Sequence[str] = (), attach: bool = True) -> Family:
    """``bpf/capabilities.c`` on ``how`` (``tracepoint`` or ``kprobe``); ``attach`` False loads
    the programs without attaching them (the verifier still checks them)."""
    if how == "tracepoint":
        probes = (Program("raw_tracepoint__cap_capable", "raw_tracepoint", "cap_capable"),)
        flags = ["-DCAPS_KPROBE=0"]
    elif how == "kprobe":
        target = "cap_capable" if attach else ""
        probes = (Program("envelope_cap_capable_entry", "kprobe", target),
                  Program("envelope_cap_capable_return", "kretprobe", target))
        flags = ["-DCAPS_KPROBE=1"]
    else:
        raise CapabilityProbeError(f"capability probe: unknown attach point {how!r}; fix: report this as a bug")
    programs = probes + (Program("raw_tracepoint__sched_process_exec", "raw_tracepoint", "sched_process_exec"),)
    return Family("capabilities", str(SOURCE), (f"-I{kernel.BPF_DIR}", *flags, *cflags), programs,
                  CapabilityObserver.MAPS,
                  fix="run `envelope doctor` (capability_probe: the capability:cap_capable tracepoint, or kprobes)")


class CapabilityObserver:
    """The sensor extension of the capability substrate (see the module docstring)."""

    name = "capabilities"
    rings: tuple[str, ...] = ()
    substrates = ("capability",)
    phases = True
    MAPS = ("cap_counts", "cap_stats")

    def __init__(self, max_keys: int = 16384, max_cgroups: int = 16384, how: str | None = None,
                 ranges: tuple | None = None):
        if how is None:
            how, detail = available()
            if how is None:
                raise CapabilityProbeError(f"capability probe: {detail}; fix: run `envelope doctor`")
        self.how = how
        # cap_capable's address range and overcommit accounting's (sensor.features.overcommit_ranges)
        self.ranges = features.overcommit_ranges() if ranges is None else ranges
        self.flags = [f"-DCAPS_MAX_KEYS={int(max_keys)}", f"-DCAPS_MAX_CGROUPS={int(max_cgroups)}",
                      f"-DCAPS_LAST_CAP={capabilities.LAST_CAP}"]
        if self.ranges:
            (lo, hi), acct = self.ranges
            self.flags += [f"-DCAPS_CAPABLE_LO={lo:#x}ULL", f"-DCAPS_CAPABLE_HI={hi:#x}ULL"]
            for i, (lo, hi) in enumerate(acct[:2]):
                self.flags += [f"-DCAPS_VM_ACCT_LO{i}={lo:#x}ULL", f"-DCAPS_VM_ACCT_HI{i}={hi:#x}ULL"]
        else:
            log.warning("kernel addresses are hidden: overcommit accounting's CAP_SYS_ADMIN checks count "
                        "as capability behaviour", fix="give the sensor CAP_SYSLOG, or kernel.kptr_restrict=0")
        self._counts: Map | None = None
        self._stats: Map | None = None
        self._wall = None

    # ---- the Extension protocol -----------------------------------------------------------

    def family(self, base_cflags: Sequence[str]) -> Family:
        return family(self.how, self.flags)

    def attached(self, loaded: kernel.Loaded, sensor) -> None:
        self._counts = Map(loaded.maps["cap_counts"], "cap_counts")
        self._stats = Map(loaded.maps["cap_stats"], "cap_stats")
        self._wall = sensor.wall_time

    def tick(self) -> None:
        pass

    def behaviour_counts(self, after_exec: Container[int] = ()) -> dict[int, dict[str, KeyReading]]:
        """Granted checks: cgroup id -> ``capability:NAME`` -> cumulative reading."""
        return self._readings(refused=False, after_exec=after_exec)

    def refused_counts(self, after_exec: Container[int] = ()) -> dict[int, dict[str, KeyReading]]:
        """Refused checks: cgroup id -> ``capability:NAME`` -> cumulative reading."""
        return self._readings(refused=True, after_exec=after_exec)

    def loss(self) -> dict[str, int]:
        if self._stats is None:
            return {}
        return {name: self._stats.percpu_sum(U32.pack(i)) for i, name in LOSS_NAMES.items()}

    def stats(self) -> dict[str, int]:
        """The loss counters, ``overcommit`` (CAP_SYS_ADMIN checks of overcommit accounting left out
        on purpose: not behaviour, not loss) and ``stack_walks`` (CAP_SYS_ADMIN checks whose caller
        the slow path found; the others took the learnt stack layout)."""
        if self._stats is None:
            return {}
        return {**self.loss(), "overcommit": self._stats.percpu_sum(U32.pack(CAPS_STAT_OVERCOMMIT)),
                "stack_walks": self._stats.percpu_sum(U32.pack(CAPS_STAT_STACK_WALKS))}

    def forget_cgroup(self, cgroup_id: int) -> None:
        """The cgroup is gone (its last counts were read): drop its counters."""
        if self._counts is None:
            return
        prefix = U64.pack(cgroup_id)
        for raw in [k for k in self._counts.keys() if k.startswith(prefix)]:
            self._counts.delete(raw)

    def close(self) -> None:
        self._counts = self._stats = None  # the sensor closes the fds it received

    # ---- kernel keys -> readings --------------------------------------------------------------

    def _readings(self, refused: bool, after_exec: Container[int]) -> dict[int, dict[str, KeyReading]]:
        if self._counts is None:
            return {}
        sums: dict[int, dict[str, list]] = {}
        for raw, val in self._counts.items():
            cg, cap, flags = CapKey.unpack_tuple(raw)
            if bool(flags & CAPS_F_REFUSED) != refused or cap not in capabilities.NAMES:
                continue
            if cg in after_exec and not flags & CAPS_F_AFTER_EXEC:
                continue  # before the cgroup's first exec: the runtime's or launcher's setup
            count, first, last = CapCount.unpack_tuple(val)
            per = sums.setdefault(cg, {})
            key = capabilities.key_of(cap)
            cur = per.get(key)
            if cur is None:
                per[key] = [count, first, last]
            else:
                cur[0] += count
                cur[1] = min(cur[1], first)
                cur[2] = max(cur[2], last)
        wall = self._wall
        return {cg: {k: KeyReading(c, wall(f), wall(l)) for k, (c, f, l) in sorted(per.items())}
                for cg, per in sums.items()}
