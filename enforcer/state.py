"""Per-workload enforcement state: mode and re-baseline, under ``<state-dir>/enforce/``.

One JSON file per workload, ``<state-dir>/enforce/modes/<quoted workload key>.json``::

    {"workload": "default/Deployment/agent/main", "mode": "alert", "since": 1795706675.3,
     "actor": "root", "reason": "...", "rebaseline": {"generation": 2, "at": ..., "archive": ...}}

Every change is written atomically and audited (:mod:`enforcer.audit`); if the audit append
fails, the previous state is put back, so no change persists without its audit entry.

Re-baselining moves the workload to alert mode and starts a new observation window: the current
profile file is moved to ``<state-dir>/profiles/archive/<UTC timestamp>/`` and the workload's
``rebaseline.generation`` goes up by one. A running daemon that holds the profile in memory must
compare :func:`rebaseline_generation` with the generation it last saw and start a fresh profile
when it rises, or its next flush writes the old window back.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import structlog

from sensor.state_dir import StateDir, UntrustedFileError, atomic_write, private_dirs
from sensor.store import ProfileStore
from sensor.workload import Workload

from . import audit
from .modes import DEFAULT_MODE, MODES

log = structlog.get_logger(__name__)


class StateError(ValueError):
    """Bad input to a state change (the message is one line for the user)."""


def mode_path(state_dir, workload: Workload) -> Path:
    return StateDir(state_dir).mode(workload.key)


@contextmanager
def locked(state_dir):
    """An exclusive lock on ``<state-dir>/enforce/.lock`` for read-modify-write changes. Taking
    it also makes the state directory's own directories 0700 (:meth:`StateDir.secure`)."""
    layout = StateDir(state_dir)
    private_dirs(layout.enforce)
    try:
        layout.secure()
    except UntrustedFileError as e:
        raise StateError(str(e)) from None
    lock = layout.lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- workloads ------------------------------------------------------------------------------


def known_workloads(state_dir) -> list[Workload]:
    """Workloads with a profile or an enforcement state."""
    found = set(ProfileStore(state_dir).workloads())
    found.update(s["_workload"] for s in _scan_states(state_dir))
    return sorted(found)


def _scan_states(state_dir) -> list[dict]:
    """Every readable mode file, with its workload (from the content) under ``_workload``; a
    file that is unreadable, untrusted, or not under its workload's name is logged and left
    out."""
    layout = StateDir(state_dir)
    out = []
    if not layout.modes.is_dir():
        return out
    for p in sorted(layout.modes.glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            data = _parse_state(p, layout.read(p))
            w = Workload.parse(data["workload"])
            if not StateDir.names_key(p.name, ".json", w.key):
                raise StateError(f"{p}: holds the state of {w.key}, whose file is "
                                 f"{StateDir.workload_name(w.key, '.json')}")
        except (OSError, StateError, ValueError) as e:
            log.warning("enforcement state skipped", path=str(p), error=str(e))
            continue
        out.append(dict(data, _workload=w))
    return out


def _parse_state(p: Path, raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise StateError(f"{p}: unreadable enforcement state ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("workload"), str):
        raise StateError(f"{p}: not an enforcement state (no workload)")
    if data.get("mode") not in MODES:
        raise StateError(f"{p}: mode {data.get('mode')!r} is not one of {', '.join(MODES)}")
    return data


def resolve_workload(state_dir, name: str, allow_new: bool = False) -> Workload:
    """A known workload by full key, ``namespace/name``, ``namespace/kind/name`` or bare name.

    With ``allow_new``, a full key ``namespace/kind/name/container`` names a workload that has
    no profile or state yet (setting its mode registers it); a bare name never does.
    """
    if not name:
        raise StateError("workload name is empty")
    matches = [w for w in known_workloads(state_dir)
               if name in (w.key, w.name, f"{w.namespace}/{w.name}", f"{w.namespace}/{w.kind}/{w.name}")]
    if not matches and allow_new and name.count("/") >= 3:
        try:
            return Workload.parse(name)
        except ValueError as e:
            raise StateError(str(e)) from None
    if not matches:
        known = ", ".join(w.key for w in known_workloads(state_dir)[:5]) or "none"
        hint = ("record it, or set its mode with the full key namespace/kind/name/container"
                if not allow_new else "give the full key namespace/kind/name/container to add it")
        raise StateError(f"unknown workload {name!r} (known: {known}); {hint}")
    if len(matches) > 1:
        raise StateError(f"workload {name!r} is ambiguous: {', '.join(w.key for w in matches)}; "
                         f"give the full key")
    return matches[0]


def register(state_dir, workload: Workload, mode: str = DEFAULT_MODE, *, actor: str | None = None,
             reason: str = "registered", now: float | None = None) -> dict:
    """Create a state file for a workload that has none (no-op if it exists)."""
    existing = read_state(state_dir, workload)
    if existing is not None:
        return existing
    return set_mode(state_dir, workload, mode, reason=reason, actor=actor, now=now)


# ---- mode -----------------------------------------------------------------------------------


def read_state(state_dir, workload: Workload) -> dict | None:
    """The workload's state, read only from a file nobody but root could have written and
    that names this workload; anything else is a :class:`StateError`."""
    layout = StateDir(state_dir)
    p = mode_path(state_dir, workload)
    try:
        raw = layout.read(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{p}: unreadable enforcement state ({e})") from None
    data = _parse_state(p, raw)
    if data["workload"] != workload.key:
        raise StateError(f"{p}: holds the state of {data['workload']!r}, not {workload.key!r}")
    return data


def get_mode(state_dir, workload: Workload) -> str:
    """The workload's mode; :data:`DEFAULT_MODE` when it has no state."""
    s = read_state(state_dir, workload)
    return s["mode"] if s else DEFAULT_MODE


def rebaseline_generation(state_dir, workload: Workload) -> int:
    s = read_state(state_dir, workload)
    return int(((s or {}).get("rebaseline") or {}).get("generation", 0))


def _write_audited(state_dir, workload: Workload, new: dict, action: str, reason: str,
                   details: dict, actor: str | None, now: float | None) -> dict:
    """Write ``new`` as the workload's state, audit it, and roll back if the audit fails."""
    path = mode_path(state_dir, workload)
    old_bytes = path.read_bytes() if path.exists() else None
    atomic_write(path, (json.dumps(new, indent=2, sort_keys=True) + "\n").encode())
    try:
        audit.append(state_dir, action, workload=workload.key, reason=reason, details=details,
                     actor=actor, now=now)
    except BaseException:
        if old_bytes is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, old_bytes)
        raise
    return new


def _check_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise StateError("--reason is required and must not be empty")
    if "\n" in reason:
        raise StateError("--reason must be one line")
    return reason


def set_mode(state_dir, workload: Workload, mode: str, *, reason: str, actor: str | None = None,
             now: float | None = None) -> dict:
    """Set the workload's mode (audited as ``mode.set``). Returns the new state."""
    if mode not in MODES:
        raise StateError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    reason = _check_reason(reason)
    now = time.time() if now is None else now
    actor = actor or audit.default_actor()
    with locked(state_dir):
        old = read_state(state_dir, workload) or {}
        new = dict(old)
        new.update(workload=workload.key, mode=mode, since=now, actor=actor, reason=reason)
        return _write_audited(state_dir, workload, new, "mode.set", reason,
                              {"from": old.get("mode"), "to": mode}, actor, now)


def rebaseline(state_dir, workload: Workload, *, reason: str, actor: str | None = None,
               now: float | None = None) -> dict:
    """Move to alert mode and start a new observation window (audited as ``rebaseline``).

    The current profile file, if any, moves to ``profiles/archive/<UTC timestamp>/``.
    """
    reason = _check_reason(reason)
    now = time.time() if now is None else now
    actor = actor or audit.default_actor()
    store = ProfileStore(state_dir)
    with locked(state_dir):
        old = read_state(state_dir, workload) or {}
        src = store.path_for(workload)
        archived = None
        if src.exists():
            stamp = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            archive = StateDir(state_dir).profile_archive
            dest_dir = archive / stamp
            n = 1
            while (dest_dir / src.name).exists():
                dest_dir = archive / f"{stamp}-{n}"
                n += 1
            private_dirs(dest_dir)
            archived = dest_dir / src.name
            os.replace(src, archived)
        gen = int((old.get("rebaseline") or {}).get("generation", 0)) + 1
        new = dict(old)
        new.update(workload=workload.key, mode="alert", since=now, actor=actor, reason=reason,
                   rebaseline={"generation": gen, "at": now,
                               "archive": str(archived) if archived else None})
        try:
            return _write_audited(
                state_dir, workload, new, "rebaseline", reason,
                {"from": old.get("mode"), "to": "alert", "generation": gen,
                 "archived_profile": str(archived) if archived else None}, actor, now)
        except BaseException:
            if archived is not None and not src.exists():
                os.replace(archived, src)
            raise


def all_states(state_dir) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "_workload"} for s in _scan_states(state_dir)]
