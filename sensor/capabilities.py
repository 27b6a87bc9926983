"""Linux capabilities: the one table of their numbers and names, and the behaviour keys of the
``capability`` substrate.

Names are the kernel's without the ``CAP_`` prefix, upper case (``NET_BIND_SERVICE``), as
Kubernetes writes them in ``securityContext.capabilities``. Numbers are the kernel's
(``include/uapi/linux/capability.h``; ``tests/unit/test_capabilities.py`` checks this table against
the installed header). A granted capability check is the behaviour ``capability:NET_RAW``.
"""

from __future__ import annotations

from types import MappingProxyType

#: capability number -> name (without ``CAP_``), 0 .. :data:`LAST_CAP`.
NAMES = MappingProxyType({
    0: "CHOWN",
    1: "DAC_OVERRIDE",
    2: "DAC_READ_SEARCH",
    3: "FOWNER",
    4: "FSETID",
    5: "KILL",
    6: "SETGID",
    7: "SETUID",
    8: "SETPCAP",
    9: "LINUX_IMMUTABLE",
    10: "NET_BIND_SERVICE",
    11: "NET_BROADCAST",
    12: "NET_ADMIN",
    13: "NET_RAW",
    14: "IPC_LOCK",
    15: "IPC_OWNER",
    16: "SYS_MODULE",
    17: "SYS_RAWIO",
    18: "SYS_CHROOT",
    19: "SYS_PTRACE",
    20: "SYS_PACCT",
    21: "SYS_ADMIN",
    22: "SYS_BOOT",
    23: "SYS_NICE",
    24: "SYS_RESOURCE",
    25: "SYS_TIME",
    26: "SYS_TTY_CONFIG",
    27: "MKNOD",
    28: "LEASE",
    29: "AUDIT_WRITE",
    30: "AUDIT_CONTROL",
    31: "SETFCAP",
    32: "MAC_OVERRIDE",
    33: "MAC_ADMIN",
    34: "SYSLOG",
    35: "WAKE_ALARM",
    36: "BLOCK_SUSPEND",
    37: "AUDIT_READ",
    38: "PERFMON",
    39: "BPF",
    40: "CHECKPOINT_RESTORE",
})
#: The highest capability number this table (and the kernel it was written for) knows.
LAST_CAP = max(NAMES)
#: name -> number.
NUMBERS = MappingProxyType({name: nr for nr, name in NAMES.items()})
KIND = "capability"


class CapabilityError(ValueError):
    """A capability name or behaviour key that is not one of :data:`NAMES`."""


def number(name: str) -> int:
    """The number of capability ``name`` (``NET_RAW`` -> 13); a clear error for anything else."""
    nr = NUMBERS.get(name) if isinstance(name, str) else None
    if nr is None:
        hint = ""
        if isinstance(name, str):
            bare = name.upper().removeprefix("CAP_")
            if bare in NUMBERS:
                hint = f" (write {bare})"
        raise CapabilityError(f"{name!r} is not a Linux capability name{hint}: names are upper case, "
                              f"without CAP_, as in capabilities(7) (e.g. NET_BIND_SERVICE)")
    return nr


def key(name: str) -> str:
    """The behaviour key of a granted check of ``name``: ``capability:NET_RAW``."""
    number(name)
    return f"{KIND}:{name}"


def name(nr: int) -> str:
    """The name of capability number ``nr`` (13 -> ``NET_RAW``)."""
    try:
        return NAMES[nr]
    except KeyError:
        raise CapabilityError(f"capability number {nr} is not in the table (0..{LAST_CAP})") from None


def key_of(nr: int) -> str:
    """The behaviour key of capability number ``nr``."""
    return f"{KIND}:{name(nr)}"


def parse_key(k: str) -> str:
    """The capability name of ``capability:NAME``."""
    kind, _, name = k.partition(":")
    if kind != KIND:
        raise CapabilityError(f"{k!r} is not a capability behaviour key (capability:NAME)")
    number(name)
    return name
