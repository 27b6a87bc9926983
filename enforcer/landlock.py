"""Landlock in the kernel: probe what this kernel can restrict, build a ruleset from a
:class:`enforcer.landlock_rules.CompiledRuleset`, and enforce it on the calling thread.

ctypes over the three syscalls (``landlock_create_ruleset``, ``landlock_add_rule``,
``landlock_restrict_self``: 444-446 on every architecture) and ``prctl(PR_SET_NO_NEW_PRIVS)``; no
bcc. Every error says which call failed, on what, and how to fix it.

**Probing features, not versions.** :func:`probe` asks the kernel for its ABI version and then
tries every known access right, scope and restrict flag on its own: a right is supported when a
ruleset handling only it can be created; a restrict flag when ``landlock_restrict_self`` on a
non-ruleset fd fails with ``EBADFD`` (flags are checked before the fd) rather than ``EINVAL``.
Measured here (Linux 6.18): ABI 7, errata 0x7, filesystem rights bits 0-15, TCP bind/connect,
both scopes, and the three logging flags.

**Never silently weaker.** :meth:`Ruleset.build` refuses a ruleset that handles a right the
kernel cannot restrict (:class:`LandlockGapError`), unless the caller passes ``allow_gaps=True``;
then those rights are left out and listed in :attr:`Ruleset.gaps`. Objects that do not exist, a
directory where a file rule expected a file, and dir-only rights on a ``tree`` object that is a
file, are skipped and listed in :attr:`Ruleset.skipped` (each only makes the ruleset stricter).

**Order in a child before execve** (``envelope exec``): join the cgroup, then
:meth:`Ruleset.restrict_self` (which sets ``no_new_privs``), then load the seccomp filter, then
``execve``. Landlock goes first so the seccomp filter never has to allow the ``landlock_*``
syscalls; the ruleset is built (every path opened ``O_PATH``) in the parent before ``fork``, so
the child only makes two syscalls for it. In a container the order is the runtime's (runc loads
seccomp before it execs the launcher), so the launcher's syscalls are in the seccomp policy
through :data:`enforcer.launcher.LAUNCHER`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
import struct
from dataclasses import dataclass, field

from sensor.libc import LIBC

from .landlock_rules import (BY_NAME, CHILDREN_OBJECT, FILE_OBJECT, FS_RIGHTS, NET_RIGHTS, RESTRICT_FLAGS,
                             SCOPES, CompiledRuleset, Gap, PathRule, children_exclude_matches, fs_mask)

NR_CREATE_RULESET, NR_ADD_RULE, NR_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION, CREATE_RULESET_ERRATA = 1 << 0, 1 << 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
_ATTR = struct.Struct("=QQQ")  # struct landlock_ruleset_attr {handled_access_fs, handled_access_net, scoped}
_PATH_BENEATH = struct.Struct("=Qi")  # struct landlock_path_beneath_attr {allowed_access; parent_fd} packed


class LandlockError(OSError):
    """A Landlock call that failed; the message names the call, the object and the fix."""


class LandlockUnavailable(LandlockError):
    """This kernel has no usable Landlock."""


class LandlockGapError(LandlockError):
    """The ruleset handles rights this kernel cannot restrict."""

    def __init__(self, err: int, message: str, gaps: tuple[Gap, ...]):
        super().__init__(err, message)
        self.gaps = gaps


def _syscall(nr: int, *args) -> int:
    r = LIBC.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def abi_version() -> int:
    """``landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)``."""
    try:
        return _syscall(NR_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise LandlockUnavailable(errno.ENOSYS, "landlock_create_ruleset: ENOSYS, this kernel has no "
                                      "Landlock; fix: a kernel built with CONFIG_SECURITY_LANDLOCK=y") from None
        if e.errno == errno.EOPNOTSUPP:
            raise LandlockUnavailable(errno.EOPNOTSUPP, "landlock_create_ruleset: EOPNOTSUPP, Landlock is built "
                                      "but not enabled; fix: add landlock to the lsm= boot parameter") from None
        raise LandlockError(e.errno, f"landlock_create_ruleset(VERSION): {e.strerror}") from None


def _create(fs: int, net: int = 0, scoped: int = 0) -> int:
    buf = ctypes.create_string_buffer(_ATTR.pack(fs, net, scoped), _ATTR.size)
    return _syscall(NR_CREATE_RULESET, buf, ctypes.c_size_t(_ATTR.size), ctypes.c_uint32(0))


def _supported(fs: int = 0, net: int = 0, scoped: int = 0) -> bool:
    try:
        fd = _create(fs, net, scoped)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise LandlockError(e.errno, f"landlock_create_ruleset probe: {e.strerror}") from None
    os.close(fd)
    return True


def _flag_supported(bit: int) -> bool | None:
    """None when the probe cannot tell (no no_new_privs and no CAP_SYS_ADMIN: EPERM first)."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _syscall(NR_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(bit))
    except OSError as e:
        return {errno.EBADFD: True, errno.EINVAL: False}.get(e.errno)
    finally:
        os.close(fd)
    raise LandlockError(0, "landlock_restrict_self on /dev/null succeeded; the kernel is not behaving as documented")


@dataclass(frozen=True)
class LandlockSupport:
    abi: int
    errata: int
    fs: frozenset[str]
    net: frozenset[str]
    scopes: frozenset[str]
    restrict_flags: frozenset[str]
    flags_probed: bool = True  # False: restrict flags inferred from the ABI version

    def to_dict(self) -> dict:
        order = {r.name: i for i, r in enumerate(FS_RIGHTS + NET_RIGHTS + SCOPES + RESTRICT_FLAGS)}
        srt = lambda s: sorted(s, key=order.__getitem__)  # noqa: E731
        return {"abi": self.abi, "errata": self.errata, "fs": srt(self.fs), "net": srt(self.net),
                "scopes": srt(self.scopes), "restrictFlags": srt(self.restrict_flags),
                "flagsProbed": self.flags_probed,
                "missing": srt(set(order) - self.fs - self.net - self.scopes - self.restrict_flags)}


def probe() -> LandlockSupport:
    """What this kernel's Landlock can restrict, asked right by right."""
    abi = abi_version()
    try:
        errata = _syscall(NR_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_ERRATA))
    except OSError:
        errata = 0  # the errata query is ABI 7; older kernels refuse the flag
    fs = frozenset(r.name for r in FS_RIGHTS if _supported(fs=r.bit))
    net = frozenset(r.name for r in NET_RIGHTS if _supported(net=r.bit))
    scopes = frozenset(r.name for r in SCOPES if _supported(scoped=r.bit))
    flags, probed = set(), True
    for r in RESTRICT_FLAGS:
        ok = _flag_supported(r.bit)
        if ok is None:
            probed = False
            ok = abi >= r.abi
        if ok:
            flags.add(r.name)
    return LandlockSupport(abi, errata, fs, net, scopes, frozenset(flags), probed)


# ---- building and enforcing -------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    path: str
    object: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "object": self.object, "reason": self.reason}


def expand_children(rule: PathRule, root: str = "/") -> list[str]:
    """The paths a ``children`` rule grants now: each entry directly inside ``rule.path`` that is
    not a directory (symlinks followed) and whose name matches no ``exclude`` glob."""
    base = os.path.join(root, rule.path.lstrip("/"))
    out = []
    with os.scandir(base) as it:
        for ent in it:
            if children_exclude_matches(ent.name, rule.exclude):
                continue
            try:
                if ent.is_dir(follow_symlinks=True):
                    continue
            except OSError:
                continue
            out.append(rule.path.rstrip("/") + "/" + ent.name)
    return sorted(out)


@dataclass
class Ruleset:
    """A Landlock ruleset fd built in this process, ready for :meth:`restrict_self`."""

    fd: int
    compiled: CompiledRuleset
    support: LandlockSupport
    gaps: tuple[Gap, ...] = ()
    skipped: list[Skipped] = field(default_factory=list)
    rules_added: int = 0
    restrict_flags: int = 0
    flag_gaps: tuple[str, ...] = ()

    @classmethod
    def build(cls, compiled: CompiledRuleset, support: LandlockSupport | None = None, *,
              allow_gaps: bool = False) -> "Ruleset":
        support = support or probe()
        gaps = compiled.gaps(support.fs)
        if gaps and not allow_gaps:
            raise LandlockGapError(
                errno.EOPNOTSUPP,
                f"Landlock ruleset for {compiled.workload}: this kernel cannot restrict "
                + "; ".join(g.message(support.abi) for g in gaps)
                + "; fix: run on a kernel with Landlock ABI "
                + f"{max(g.abi for g in gaps)} or later, or apply with the gaps listed (allow_gaps)", gaps)
        # gaps (allowed), and rights granted everywhere that this kernel does not know
        drop = [g.right for g in gaps] + sorted(r for r in compiled.unrestricted if r not in set(support.fs))
        effective = compiled.without(drop) if drop else compiled
        if effective.empty:
            raise LandlockError(errno.EINVAL, f"Landlock ruleset for {compiled.workload} handles no right "
                                "(nothing to restrict); fix: include the exec or file substrate")
        try:
            fd = _create(fs_mask(effective.handled_fs))
        except OSError as e:
            raise LandlockError(e.errno, f"landlock_create_ruleset({','.join(effective.handled_fs)}): "
                                f"{e.strerror}; fix: check `envelope doctor` for Landlock support") from None
        flags = 0
        flag_gaps = []
        for name in compiled.restrict_flags:
            if name in support.restrict_flags:
                flags |= BY_NAME[name].bit
            else:
                flag_gaps.append(f"{name} needs Landlock ABI {BY_NAME[name].abi} (denials after exec are "
                                 f"not logged)")
        rs = cls(fd, effective, support, gaps, [], 0, flags, tuple(flag_gaps))
        try:
            for rule in effective.rules:
                rs._add(rule)
        except BaseException:
            rs.close()
            raise
        return rs

    def _add_path(self, path: str, rights: tuple[str, ...], obj: str) -> None:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            self.skipped.append(Skipped(path, obj, f"cannot open: {e.strerror}"))
            return
        try:
            st = os.fstat(pfd)
            is_dir = stat.S_ISDIR(st.st_mode)
            if obj in (FILE_OBJECT, CHILDREN_OBJECT) and is_dir:
                self.skipped.append(Skipped(path, obj, "is a directory: a rule on it would cover its whole tree"))
                return
            if not is_dir:
                dir_only = [r for r in rights if BY_NAME[r].applies_to == "dir"]
                if dir_only:
                    self.skipped.append(Skipped(path, obj, f"not a directory: {','.join(dir_only)} not granted"))
                    rights = tuple(r for r in rights if r not in dir_only)
                    if not rights:
                        return
            attr = ctypes.create_string_buffer(_PATH_BENEATH.pack(fs_mask(rights), pfd), _PATH_BENEATH.size)
            try:
                _syscall(NR_ADD_RULE, ctypes.c_int(self.fd), ctypes.c_int(RULE_PATH_BENEATH), attr,
                         ctypes.c_uint32(0))
            except OSError as e:
                raise LandlockError(e.errno, f"landlock_add_rule({path}, {','.join(rights)}): {e.strerror}; "
                                    f"fix: the ruleset file and this kernel disagree on rights") from None
            self.rules_added += 1
        finally:
            os.close(pfd)

    def _add(self, rule: PathRule) -> None:
        if rule.object == CHILDREN_OBJECT:
            try:
                paths = expand_children(rule)
            except OSError as e:
                self.skipped.append(Skipped(rule.path, rule.object, f"cannot list: {e.strerror}"))
                return
            for p in paths:
                self._add_path(p, rule.rights, FILE_OBJECT)
            return
        self._add_path(rule.path, rule.rights, rule.object)

    def restrict_self(self) -> None:
        """Enforce on the calling thread: ``no_new_privs``, then ``landlock_restrict_self``. Call it
        in the child (after fork), before loading seccomp and before execve."""
        if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
        try:
            _syscall(NR_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(self.restrict_flags))
        except OSError as e:
            raise LandlockError(e.errno, f"landlock_restrict_self: {e.strerror}; fix: the ruleset fd must be "
                                "open in this process (build it before fork)") from None

    def report(self) -> dict:
        return {"workload": self.compiled.workload, "abi": self.support.abi, "rulesAdded": self.rules_added,
                "gaps": [g.message(self.support.abi) for g in self.gaps], "flagGaps": list(self.flag_gaps),
                "skipped": [s.to_dict() for s in self.skipped]}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Ruleset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def preexec(ruleset: Ruleset, then=None):
    """A ``preexec_fn`` that enforces ``ruleset`` in the child, then runs ``then`` (e.g. the seccomp
    filter load, which must come after)."""
    def _run() -> None:
        ruleset.restrict_self()
        if then is not None:
            then()
    return _run


def for_exec(policy, mode: str, *, allow_gaps: bool = False,
             support: LandlockSupport | None = None) -> Ruleset | None:
    """The ruleset ``envelope exec`` enforces in its child, built in the parent before ``fork``:
    the policy's exec entries and the exec review items its review action lets through (with
    what each exec needs: its interpreter, the dynamic loader and, when file reads are handled,
    its libraries) and its file entries.

    None outside enforce mode (Landlock has no log-only mode: alert mode keeps observing and
    reports what enforce would deny) and when the policy includes neither the exec nor the file
    substrate. Raises :class:`LandlockGapError` for a right this kernel cannot restrict unless
    ``allow_gaps``, :class:`LandlockUnavailable` when there is no Landlock at all, and
    :class:`enforcer.landlock_rules.LandlockCompileError` for entries Landlock cannot express."""
    from .exec_needs import resolve
    from .landlock_rules import compile_policy
    if mode != "enforce" or not {"exec", "file"} & set(policy.substrates):
        return None
    admitted = policy.review_admitted() if hasattr(policy, "review_admitted") else None
    if admitted is not None and admitted.execs:  # exec review items alerted: let through, reported
        policy = dataclasses.replace(policy, execs=tuple(sorted(set(policy.execs) | set(admitted.execs))))
    needs = resolve(policy.execs) if "exec" in policy.substrates else {}
    compiled = compile_policy(policy, exec_needs=needs)
    return Ruleset.build(compiled, support, allow_gaps=allow_gaps)
