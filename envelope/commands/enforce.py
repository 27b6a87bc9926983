"""``envelope enforce NAME --policy POLICY [--mode MODE] [--cgroup PATH ...] [--reason TEXT]``

Applies a policy's egress enforcement to every cgroup of workload NAME, present and future:

* the desired state (policy + mode) is written to ``<state-dir>/enforce/<workload>.yaml``, where
  the daemon picks it up and attaches the pinned programs to the workload's new cgroups;
* the workload's current cgroups (found by resolving every populated cgroup's identity, plus
  any ``--cgroup`` given) get the programs now, all or nothing: if one attach fails, nothing
  changes;
* the mode is recorded with ``enforcer.state`` and the apply is audited;
* in enforce mode it first says how many behaviours sit in review and what happens to them when
  they recur (:mod:`envelope.review_notice`).

``envelope enforce NAME --remove --reason TEXT`` detaches, unpins and forgets the workload.
Seccomp is enforced where the process starts: the container runtime reads the OCI profile
(``envelope compile --format oci-seccomp``) and ``envelope exec`` loads the filter itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from ..errors import UserError
from ..output import add_output_option, emit

log = structlog.get_logger(__name__)


def register(sub) -> None:
    p = sub.add_parser("enforce", help="enforce a policy on every cgroup of a workload (pinned egress programs)")
    p.add_argument("name", help="workload: name or full key (must be the policy's workload)")
    p.add_argument("--policy", help="policy file (YAML or JSON)")
    p.add_argument("--mode", choices=["observe", "alert", "enforce"], help="override the policy's mode")
    p.add_argument("--cgroup", action="append", default=[], metavar="PATH",
                   help="also apply to this cgroup (absolute, or relative to the cgroup2 mount)")
    p.add_argument("--reason", default="", help="why (goes to the audit log)")
    p.add_argument("--remove", action="store_true", help="stop enforcing: detach, unpin, forget")
    add_output_option(p)
    p.set_defaults(func=cmd_enforce)


def _matches(workload, name: str) -> bool:
    return name in (workload.key, workload.name, f"{workload.namespace}/{workload.name}",
                    f"{workload.namespace}/{workload.kind}/{workload.name}")


def workload_cgroups(workload, host_root: str | os.PathLike = "/") -> list[str]:
    """Populated cgroups whose resolved identity is ``workload``."""
    from sensor.cgroup import CgroupFS
    from sensor.identity import Resolver, cgroupfs_for_host
    cgfs: CgroupFS = cgroupfs_for_host(host_root)
    resolver = Resolver(cgfs, host_root)
    out = []
    for dirpath, _dirs, files in os.walk(cgfs.root):
        if "cgroup.procs" not in files or Path(dirpath) == cgfs.root:
            continue
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except OSError:
            continue
        if not pids:
            continue
        try:
            ident = resolver.resolve(os.stat(dirpath).st_ino, int(pids[0]))
        except Exception as e:  # an unresolvable cgroup is not this workload
            log.debug("identity resolution failed", cgroup=dirpath, error=str(e))
            continue
        if ident.workload == workload:
            out.append(dirpath)
    return sorted(out)


def cmd_enforce(args, config) -> int:
    from enforcer import state
    from enforcer.egress import EgressError
    from enforcer.session import ApplyError, EnforcementSession
    from enforcer.policy import PolicyError, load_policy
    from sensor.cgroup import CgroupError, cgroup2_mount_point
    from sensor.workload import Workload

    enforcer = EnforcementSession(config.state_dir, pinned=True, bpffs=config.bpffs)
    if args.remove:
        if not args.reason:
            raise UserError("--reason is required with --remove")
        try:
            key = state.resolve_workload(config.state_dir, args.name).key
        except state.StateError:
            try:
                key = Workload.parse(args.name).key
            except ValueError:
                raise UserError(f"unknown workload {args.name!r}; give its full key") from None
        try:
            removed = enforcer.remove(key, reason=args.reason)
        except (ApplyError, EgressError) as e:
            raise UserError(str(e) if isinstance(e, ApplyError) else f"remove {key}: {e}") from None
        finally:
            enforcer.close()
        print(f"{key}: {'enforcement removed' if removed else 'was not enforced'}")
        return 0

    if not args.policy:
        raise UserError("--policy is required")
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        raise UserError(str(e)) from None
    if not _matches(policy.workload, args.name):
        raise UserError(f"policy {args.policy} is for {policy.workload.key}, not {args.name!r}")
    mode = args.mode or policy.mode
    if mode == "enforce":  # before anything starts: what happens to the behaviours in review
        import sys
        from ..review_notice import review_notice
        for line in review_notice(policy, exec_paths_enforced=False, execve_denied=False):
            print(line, file=sys.stderr)
    try:
        root = cgroup2_mount_point()
    except CgroupError as e:
        raise UserError(str(e)) from None
    paths = []
    for c in args.cgroup:
        p = Path(c) if c.startswith(str(root)) else root / c.lstrip("/")
        if not p.is_dir():
            raise UserError(f"--cgroup {c}: {p} is not a cgroup directory")
        paths.append(str(p))
    try:
        found = workload_cgroups(policy.workload, config.host_root)
    except Exception as e:
        log.warning("could not enumerate the workload's cgroups", error=str(e))
        found = []
    paths = sorted(set(paths) | set(found))
    reason = args.reason or f"envelope enforce --policy {args.policy}"
    try:
        results = enforcer.apply(policy, mode, paths, reason=reason)
    except (ApplyError, EgressError, PolicyError) as e:
        raise UserError(str(e)) from None
    finally:
        enforcer.close()
    try:
        if state.get_mode(config.state_dir, policy.workload) != mode:
            state.set_mode(config.state_dir, policy.workload, mode, reason=reason)
    except state.StateError as e:
        raise UserError(str(e)) from None
    data = {"workload": policy.workload.key, "mode": mode, "cgroups": [r.to_dict() for r in results]}
    emit(data, args.output, [[r.cgroup, "attached" if r.attached else "already attached"] for r in results]
         or [["(none yet)", "the daemon attaches new cgroups as they appear"]], ["cgroup", "result"])
    return 0
