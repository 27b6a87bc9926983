"""Sensitive paths: what file closure never widens into, and Landlock rules never cover by accident.

A path on this list is allowed only when it was observed exactly, with that access kind, above
the confidence threshold (closure in :mod:`enforcer.file_closure`, confidence in
:mod:`enforcer.derive`); no ``dir/*`` or ``dir/**`` entry is ever derived whose paths could
include one, and the Landlock compiler refuses a hierarchy rule that
would cover one (:mod:`enforcer.landlock_rules`).

Patterns are globs over whole paths (:func:`enforcer.file_patterns.glob_matches`): ``*`` stays
within one component, ``/**`` at the end covers the directory and everything beneath it. Home
directories are spelled for ``/root`` and ``/home/*``. Each entry says why it is there; the list
is deliberately about credentials and other workloads' state, not about "system files" in
general (``/etc/passwd`` is world-readable by design and needed by libc).
"""

from __future__ import annotations

from dataclasses import dataclass

from .file_patterns import FilePattern, glob_intersects, glob_matches, pattern_glob

HOMES = ("/root", "/home/*")

_HOME_ENTRIES = (
    (".ssh/**", "SSH keys, agent sockets, known hosts and authorized_keys"),
    (".aws/**", "AWS credentials and config (static keys, SSO caches)"),
    (".azure/**", "Azure CLI tokens"),
    (".config/gcloud/**", "Google Cloud credentials and access tokens"),
    (".kube/**", "kubeconfig files: cluster credentials"),
    (".docker/config.json", "registry credentials"),
    (".netrc", "plain-text machine passwords (curl, git, ftp)"),
    (".git-credentials", "git's stored credentials"),
    (".config/git/credentials", "git's stored credentials (XDG location)"),
    (".config/gh/hosts.yml", "GitHub CLI tokens"),
    (".gnupg/**", "GnuPG private keys"),
    (".pgpass", "PostgreSQL passwords"),
    (".my.cnf", "MySQL client passwords"),
    (".npmrc", "npm registry tokens"),
    (".pypirc", "PyPI upload tokens"),
    (".vault-token", "HashiCorp Vault token"),
    (".terraform.d/credentials.tfrc.json", "Terraform Cloud tokens"),
    (".config/openai/**", "model API keys stored by CLI tools"),
    (".cache/huggingface/token", "Hugging Face access token"),
)

_SYSTEM_ENTRIES = (
    ("/etc/shadow", "password hashes"),
    ("/etc/shadow-", "password hashes (backup)"),
    ("/etc/gshadow", "group password hashes"),
    ("/etc/gshadow-", "group password hashes (backup)"),
    ("/etc/sudoers", "privilege escalation rules"),
    ("/etc/sudoers.d/**", "privilege escalation rules"),
    ("/etc/ssh/ssh_host_*_key", "SSH host private keys"),
    ("/etc/ssl/private/**", "TLS private keys"),
    ("/etc/pki/**", "TLS keys and trust stores (RHEL layout)"),
    ("/etc/kubernetes/**", "node kubeconfigs and cluster PKI"),
    ("/var/lib/kubelet/**", "kubelet PKI, and every pod's volumes including Secrets"),
    ("/var/run/secrets/**", "mounted Secrets: the Kubernetes service-account token "
                            "(kubernetes.io/serviceaccount), EKS pod identity, and others"),
    ("/run/secrets/**", "mounted Secrets (/var/run is /run on most distributions)"),
    ("/proc/*/root/**", "another process's root: other containers' filesystems"),
    ("/proc/*/cwd/**", "another process's working directory"),
    ("/proc/*/environ", "another process's environment (tokens in env variables)"),
    ("/proc/*/mem", "another process's memory"),
    ("/proc/*/fd/**", "another process's open files"),
    ("/proc/kcore", "kernel memory"),
    ("/run/containerd/**", "containerd state, sockets and bundles"),
    ("/var/run/containerd/**", "containerd state, sockets and bundles"),
    ("/var/lib/containerd/**", "container images and snapshots"),
    ("/run/runc/**", "runc container state"),
    ("/run/crio/**", "CRI-O state and socket"),
    ("/var/run/crio/**", "CRI-O state and socket"),
    ("/var/lib/containers/**", "container storage (CRI-O, podman)"),
    ("/run/containers/**", "container runtime state (CRI-O, podman)"),
    ("/var/lib/docker/**", "docker state and container filesystems"),
    ("/run/docker.sock", "docker API: root on the node"),
    ("/var/run/docker.sock", "docker API: root on the node"),
    ("/var/lib/envelope/**", "Envelope's own state: policies, audit log, violations"),
)


@dataclass(frozen=True)
class SensitivePath:
    pattern: str
    reason: str

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "reason": self.reason}


def _build() -> tuple[SensitivePath, ...]:
    out = [SensitivePath(p, r) for p, r in _SYSTEM_ENTRIES]
    for home in HOMES:
        out += [SensitivePath(f"{home}/{p}", r) for p, r in _HOME_ENTRIES]
    return tuple(sorted(out, key=lambda s: s.pattern))


#: The default list, sorted by pattern.
SENSITIVE: tuple[SensitivePath, ...] = _build()


def sensitive_match(path: str, sensitive: tuple[SensitivePath, ...] = SENSITIVE) -> SensitivePath | None:
    """The first sensitive pattern covering ``path``, or None."""
    for s in sensitive:
        if glob_matches(s.pattern, path):
            return s
    return None


def sensitive_overlaps(pattern: FilePattern | str,
                       sensitive: tuple[SensitivePath, ...] = SENSITIVE) -> list[SensitivePath]:
    """Every sensitive pattern that shares at least one path with ``pattern``."""
    glob = pattern if isinstance(pattern, str) else pattern_glob(pattern)
    return [s for s in sensitive if glob_intersects(glob, s.pattern)]
