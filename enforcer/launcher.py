"""Putting the static Landlock launcher in front of a container's command.

No container runtime applies Landlock, so the container's first process must: the launcher
(``enforcer/launcher/envelope-launch.c``, built static by ``make setup`` into
``build/envelope-launch``) reads a ruleset file (:mod:`enforcer.landlock_formats`), enforces it
and execs the real command. Two pure rewrites put it in place:

* :func:`oci_with_launcher`, for an OCI runtime spec (``config.json``): bind-mount the launcher
  and the ruleset read-only at ``/.envelope/`` and prefix ``process.args``.
* :func:`pod_with_launcher`, for a pod template: an ``initContainer`` copies the launcher from
  Envelope's image into an ``emptyDir``, the rulesets come from a ConfigMap
  (:func:`ruleset_configmap`), both are mounted read-only, and each wrapped container's
  ``command`` is prefixed. A pod spec that leaves ``command`` to the image needs the image's
  ENTRYPOINT and CMD passed in (a pod-spec rewrite cannot see them).

**Seccomp.** runc loads the container's seccomp filter before it execs the launcher, so the
launcher's syscalls (the ``landlock_*`` calls among them) must be allowed by the container's
profile: :data:`LAUNCHER` lists them as a runtime-completeness set, named
``runtime-completeness:envelope-launch``; pass :func:`seccomp_allowances` as ``extra_allow`` to
:func:`enforcer.seccomp.compile_oci`. :func:`oci_with_launcher` refuses a spec whose seccomp
profile would kill the launcher.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from .runtime import RuntimeSet

MOUNT_DIR = "/.envelope"
LAUNCHER_NAME = "envelope-launch"
RULESET_NAME = "ruleset"
BUILD_PATH = Path(__file__).resolve().parent.parent / "build" / LAUNCHER_NAME
IMAGE_PATH = "/usr/local/lib/envelope/envelope-launch"  # where Envelope's image carries it

LAUNCHER = RuntimeSet(
    runtime="envelope-launch",
    measured_with="envelope-launch (gcc -static, glibc 2.36), Linux 6.18 x86_64: strace on the host and "
                  "SCMP_ACT_LOG inside runc (tests/privileged/test_landlock_runc.py re-measures it)",
    syscalls=MappingProxyType({
        # static glibc start-up
        "arch_prctl": "required: static glibc start-up (TLS)",
        "set_tid_address": "required: static glibc start-up",
        "set_robust_list": "required: static glibc start-up",
        "rseq": "required: glibc 2.35+ registers restartable sequences",
        "prlimit64": "required: static glibc start-up (stack limit)",
        "readlink": "required: static glibc start-up reads /proc/self/exe",
        "getrandom": "required: glibc seeds its allocator and stack protector",
        "brk": "required: malloc",
        "mprotect": "required: RELRO after relocation",
        "mmap": "precaution: malloc of a large ruleset file",
        "munmap": "precaution: malloc of a large ruleset file",
        "mremap": "precaution: realloc of a large ruleset file",
        # reading the ruleset and opening the rule objects
        "openat": "required: the ruleset file, and every rule object (O_PATH)",
        "read": "required: the ruleset file",
        "close": "required: rule objects after landlock_add_rule",
        "newfstatat": "required: fstat of each rule object (file or directory?)",
        "fstat": "precaution: fstat on libcs that do not go through newfstatat",
        "fcntl": "required for children rules: fdopendir checks the directory fd",
        "getdents64": "required for children rules: listing the directory",
        # Landlock
        "landlock_create_ruleset": "required: ABI probe and the ruleset",
        "landlock_add_rule": "required: one call per rule object",
        "landlock_restrict_self": "required: enforcing the ruleset",
        "prctl": "required: PR_SET_NO_NEW_PRIVS",
        # handing over
        "write": "required: reports on stderr (skipped objects, gaps, errors)",
        "execve": "required: exec of the container command",
        "exit_group": "error path: exit after reporting a failure",
    }),
)


class LauncherSpecError(ValueError):
    """A spec or template the launcher cannot be put into; the message names the field."""


def seccomp_allowances() -> dict[str, str]:
    """``extra_allow`` for :func:`enforcer.seccomp.compile_oci`: the launcher's syscalls."""
    return {name: LAUNCHER.rule for name in LAUNCHER.names()}


def launcher_binary() -> Path:
    """The built launcher; an error with the fix when it is missing."""
    if not BUILD_PATH.is_file():
        raise LauncherSpecError(f"{BUILD_PATH} not found; fix: run `make setup` (it builds the static launcher)")
    return BUILD_PATH


def _seccomp_blocks_launcher(seccomp: Mapping | None) -> list[str]:
    if not seccomp or seccomp.get("defaultAction") in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
        return []
    allowed = set()
    for rule in seccomp.get("syscalls") or []:
        if rule.get("action") in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG") and not rule.get("args"):
            allowed.update(rule.get("names") or [])
    return sorted(n for n in LAUNCHER.names() if n not in allowed)


def oci_with_launcher(spec: Mapping, *, launcher_source: str, ruleset_source: str,
                      mount_dir: str = MOUNT_DIR) -> dict:
    """A copy of OCI runtime ``spec`` whose process starts under the launcher.

    ``launcher_source`` and ``ruleset_source`` are host paths, bind-mounted read-only (``nosuid``,
    ``nodev``; the ruleset also ``noexec``) at ``<mount_dir>/envelope-launch`` and
    ``<mount_dir>/ruleset``. ``process.args`` becomes ``[launcher, --ruleset, ruleset, --, *args]``.
    Applying it twice changes nothing more.
    """
    out = copy.deepcopy(dict(spec))
    proc = out.get("process")
    if not isinstance(proc, dict) or not isinstance(proc.get("args"), list) or not proc["args"]:
        raise LauncherSpecError("process.args: missing or empty; the launcher needs the command to exec")
    launcher = f"{mount_dir}/{LAUNCHER_NAME}"
    ruleset = f"{mount_dir}/{RULESET_NAME}"
    if proc["args"][0] == launcher:
        return out
    for src, what in ((launcher_source, "launcher_source"), (ruleset_source, "ruleset_source")):
        if not isinstance(src, str) or not src.startswith("/"):
            raise LauncherSpecError(f"{what}: {src!r} is not an absolute host path")
    blocked = _seccomp_blocks_launcher((out.get("linux") or {}).get("seccomp"))
    if blocked:
        raise LauncherSpecError(
            f"linux.seccomp: the profile denies what the launcher needs ({', '.join(blocked)}); fix: compile it "
            f"with extra_allow=enforcer.launcher.seccomp_allowances() ({LAUNCHER.rule})")
    mounts = [m for m in out.get("mounts") or [] if m.get("destination") not in (launcher, ruleset)]
    mounts += [
        {"destination": launcher, "type": "bind", "source": launcher_source,
         "options": ["bind", "ro", "nosuid", "nodev"]},
        {"destination": ruleset, "type": "bind", "source": ruleset_source,
         "options": ["bind", "ro", "nosuid", "nodev", "noexec"]},
    ]
    out["mounts"] = mounts
    proc["args"] = [launcher, "--ruleset", ruleset, "--", *proc["args"]]
    return out


# ---- Kubernetes pod templates -----------------------------------------------------------------

VOLUME_BIN = "envelope-launcher"
VOLUME_RULESETS = "envelope-rulesets"
INIT_NAME = "envelope-launcher-install"


def ruleset_configmap(name: str, namespace: str, rulesets: Mapping[str, str]) -> dict:
    """The ConfigMap carrying one ruleset file per container (key: container name)."""
    if not rulesets:
        raise LauncherSpecError("rulesets: empty (one ruleset file per wrapped container)")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "envelope"}},
            "data": {k: rulesets[k] for k in sorted(rulesets)}}


def pod_with_launcher(template: Mapping, *, image: str, configmap: str, containers: Sequence[str] | None = None,
                      image_config: Mapping[str, Mapping[str, list]] | None = None,
                      mount_dir: str = MOUNT_DIR) -> dict:
    """A copy of pod ``template`` (``{metadata, spec}``) whose ``containers`` (default: all) start
    under the launcher, with rulesets from ConfigMap ``configmap`` (keys: container names).

    ``image_config`` gives, per container without a ``command``, its image's ``entrypoint`` and
    ``cmd`` (the pod spec cannot see them). The launcher is copied from ``image`` (Envelope's
    image, which carries it at :data:`IMAGE_PATH`) by an init container into a memory
    ``emptyDir``, mounted read-only with the ConfigMap. Applying it twice changes nothing more.
    """
    out = copy.deepcopy(dict(template))
    spec = out.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise LauncherSpecError("spec.containers: missing or empty")
    names = [c.get("name") for c in spec["containers"]]
    wanted = list(containers) if containers is not None else names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise LauncherSpecError(f"containers: {', '.join(unknown)} not in spec.containers ({', '.join(names)})")
    bin_dir, rs_dir = f"{mount_dir}/bin", f"{mount_dir}/rulesets"
    launcher = f"{bin_dir}/{LAUNCHER_NAME}"
    image_config = image_config or {}
    for c in spec["containers"]:
        if c.get("name") not in wanted or (c.get("command") or [None])[0] == launcher:
            continue
        name = c["name"]
        command = c.get("command")
        if not command:
            cfg = image_config.get(name)
            if not cfg or not cfg.get("entrypoint") and not cfg.get("cmd"):
                raise LauncherSpecError(
                    f"spec.containers[{name}].command: not set, so the image's ENTRYPOINT runs, which a pod-spec "
                    f"rewrite cannot see; fix: set command in the pod spec, or pass image_config for {name}")
            command = list(cfg.get("entrypoint") or [])
            if "args" not in c and cfg.get("cmd"):
                c["args"] = list(cfg["cmd"])
            if not command:  # CMD only: it becomes the command line
                command, c["args"] = list(c.get("args") or []), []
        c["command"] = [launcher, "--ruleset", f"{rs_dir}/{name}", "--", *command]
        mounts = [m for m in c.get("volumeMounts") or [] if m.get("name") not in (VOLUME_BIN, VOLUME_RULESETS)]
        mounts += [{"name": VOLUME_BIN, "mountPath": bin_dir, "readOnly": True},
                   {"name": VOLUME_RULESETS, "mountPath": rs_dir, "readOnly": True}]
        c["volumeMounts"] = mounts
    volumes = [v for v in spec.get("volumes") or [] if v.get("name") not in (VOLUME_BIN, VOLUME_RULESETS)]
    volumes += [{"name": VOLUME_BIN, "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
                {"name": VOLUME_RULESETS, "configMap": {"name": configmap, "defaultMode": 0o444}}]
    spec["volumes"] = volumes
    inits = [i for i in spec.get("initContainers") or [] if i.get("name") != INIT_NAME]
    inits.insert(0, {
        "name": INIT_NAME, "image": image,
        "command": ["cp", IMAGE_PATH, f"/install/{LAUNCHER_NAME}"],
        "volumeMounts": [{"name": VOLUME_BIN, "mountPath": "/install"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 65532, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}},
    })
    spec["initContainers"] = inits
    return out
