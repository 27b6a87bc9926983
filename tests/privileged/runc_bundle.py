"""Real runc containers that look like Kubernetes pods, for privileged tests.

A bundle has a busybox-static rootfs (``/bin/busybox`` plus one symlink per applet) and a
``config.json`` made by ``runc spec`` and then edited: process args, no terminal, a
kubelet-style ``cgroupsPath`` (``/kubepods/<qos>/pod<uid>/<container id>``), the CRI
annotations containerd writes, and optionally an OCI seccomp profile (``linux.seccomp``).

On this hybrid host (cgroup v1 controllers plus the unified hierarchy at
``/sys/fs/cgroup/unified``) runc's cgroupfs driver creates that exact path in every hierarchy,
the unified one included, and removes the container's own directory on ``runc delete``; the
parent ``pod<uid>``, QoS and ``kubepods`` directories it created stay behind, so
:meth:`RuncContainer.delete` removes the ones that did not exist before. crun refuses hybrid
cgroups, which is why this is runc.

Use::

    with RuncContainer.deployment("agents", "research-agent", "agent",
                                  ["sleep", "300"], tmp_path) as c:
        c.run()                       # foreground runc; c.wait() returns the exit code
        pid = c.wait_running()
        ...
    # killed, deleted, cgroups and bundle removed

or ``c.create(); ...attach things to c.cgroup_path...; c.start()`` when something must be in
place before the first instruction runs.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

BUSYBOX = "/bin/busybox"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
# k8s.io/apimachinery rand alphabet: generated names and pod-template hashes use only these.
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class RuncError(RuntimeError):
    pass


def _runc(*args: str, root: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [RUNC] + (["--root", root] if root else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuncError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def pod_name_for(deployment: str, rng: random.Random | None = None) -> tuple[str, str]:
    """(pod name, pod-template-hash) as a Deployment's ReplicaSet would generate them."""
    rng = rng or random.Random()
    h = "".join(rng.choice(_ALPHABET) for _ in range(10))
    suffix = "".join(rng.choice(_ALPHABET) for _ in range(5))
    return f"{deployment}-{h}-{suffix}", h


def cri_annotations(namespace: str, pod_name: str, container_name: str, pod_uid: str,
                    sandbox_id: str | None = None, image: str = "docker.io/library/busybox:1.35") -> dict:
    """The annotations containerd's CRI plugin puts in a container's OCI spec."""
    return {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": container_name,
        "io.kubernetes.cri.image-name": image,
        "io.kubernetes.cri.sandbox-id": sandbox_id or secrets.token_hex(32),
        "io.kubernetes.cri.sandbox-name": pod_name,
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.sandbox-uid": pod_uid,
    }


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and v2) on this host."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        try:
            sep = f.index("-", 6)
        except ValueError:
            continue
        if f[sep + 1] in ("cgroup", "cgroup2"):
            out.append(Path(f[4]))
    return out


def make_rootfs(rootfs: Path) -> None:
    """A busybox-static root: /bin/busybox and a symlink per applet, plus the usual dirs."""
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox" and not (rootfs / "bin" / a).exists():
            os.symlink("busybox", rootfs / "bin" / a)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")


class RuncContainer:
    """One runc container built from a bundle; use as a context manager for cleanup."""

    def __init__(self, workdir: str | os.PathLike, args: list[str], *, cgroups_path: str,
                 annotations: dict | None = None, container_id: str | None = None,
                 seccomp: dict | None = None, env: list[str] | None = None,
                 host_network: bool = False, readonly_rootfs: bool = True,
                 runc_root: str | None = None, hostname: str | None = None):
        self.id = container_id or secrets.token_hex(32)
        self.bundle = Path(workdir) / f"bundle-{self.id[:12]}"
        self.args = list(args)
        self.cgroups_path = cgroups_path
        self.annotations = dict(annotations or {})
        self.runc_root = runc_root
        self.stdout_path = self.bundle / "stdout"
        self.stderr_path = self.bundle / "stderr"
        self._proc: subprocess.Popen | None = None
        self._stdio: list = []
        self._created = False
        self._preexisting = self._existing_parents()
        self._build(seccomp, env, host_network, readonly_rootfs, hostname)

    # -- construction --

    @classmethod
    def deployment(cls, namespace: str, deployment: str, container: str, args: list[str],
                   workdir: str | os.PathLike, qos: str = "besteffort", **kw) -> "RuncContainer":
        """A container of a Deployment's pod: kubelet cgroupfs path and containerd annotations."""
        pod_uid = str(uuid.uuid4())
        pod_name, template_hash = pod_name_for(deployment)
        cid = kw.pop("container_id", None) or secrets.token_hex(32)
        qos_part = "" if qos == "guaranteed" else f"/{qos}"
        c = cls(workdir, args, cgroups_path=f"/kubepods{qos_part}/pod{pod_uid}/{cid}",
                annotations=cri_annotations(namespace, pod_name, container, pod_uid), container_id=cid,
                hostname=pod_name, **kw)
        c.pod_uid, c.pod_name, c.template_hash = pod_uid, pod_name, template_hash
        c.namespace, c.deployment_name, c.container_name = namespace, deployment, container
        return c

    def _build(self, seccomp, env, host_network, readonly_rootfs, hostname) -> None:
        self.bundle.mkdir(parents=True)
        make_rootfs(self.bundle / "rootfs")
        _runc("spec", "--bundle", str(self.bundle))
        cfg_path = self.bundle / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = self.args
        if env:
            cfg["process"]["env"] = list(cfg["process"].get("env", [])) + list(env)
        cfg["root"]["readonly"] = readonly_rootfs
        if hostname:
            cfg["hostname"] = hostname[:63]
        cfg["annotations"] = self.annotations
        linux = cfg.setdefault("linux", {})
        linux["cgroupsPath"] = self.cgroups_path
        if host_network:
            linux["namespaces"] = [n for n in linux.get("namespaces", []) if n.get("type") != "network"]
        if seccomp is not None:
            linux["seccomp"] = seccomp
        cfg_path.write_text(json.dumps(cfg, indent=2))
        self.config = cfg

    def _existing_parents(self) -> set[Path]:
        parts = [p for p in self.cgroups_path.split("/") if p]
        out = set()
        for mount in cgroup_mounts():
            for i in range(1, len(parts)):
                d = mount.joinpath(*parts[:i])
                if d.exists():
                    out.add(d)
        return out

    # -- lifecycle --

    def _open_stdio(self):
        out = open(self.stdout_path, "ab")
        err = open(self.stderr_path, "ab")
        self._stdio = [out, err]
        return out, err

    def run(self) -> "RuncContainer":
        """Start in the foreground (runc waits for the container); see :meth:`wait`."""
        out, err = self._open_stdio()
        cmd = [RUNC] + (["--root", self.runc_root] if self.runc_root else []) + [
            "run", "--bundle", str(self.bundle), self.id]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      start_new_session=True)
        self._created = True
        return self

    def create(self) -> "RuncContainer":
        """``runc create``: the cgroup exists and the init waits; :meth:`start` lets it run."""
        out, err = self._open_stdio()
        cmd = [RUNC] + (["--root", self.runc_root] if self.runc_root else []) + [
            "create", "--bundle", str(self.bundle), self.id]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60)
        self._created = True
        if p.returncode != 0:
            raise RuncError(f"runc create {self.id}: exit {p.returncode}: {self.read_stderr()}")
        return self

    def start(self) -> None:
        _runc("start", self.id, root=self.runc_root)

    def state(self) -> dict | None:
        p = _runc("state", self.id, root=self.runc_root, check=False)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)

    def wait_running(self, timeout: float = 30.0) -> int:
        """Wait until the container is created or running; returns its init pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st and st.get("status") in ("created", "running") and st.get("pid"):
                return int(st["pid"])
            if self._proc is not None and self._proc.poll() is not None:
                raise RuncError(f"runc run {self.id} exited {self._proc.returncode}: {self.read_stderr()}")
            time.sleep(0.01)
        raise RuncError(f"container {self.id} not running after {timeout}s: {self.read_stderr()}")

    def wait(self, timeout: float = 60.0) -> int | None:
        """Exit code of a :meth:`run` container; for :meth:`create`d ones, wait until stopped
        and return None (runc does not keep the code)."""
        if self._proc is not None:
            return self._proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st is None or st.get("status") == "stopped":
                return None
            time.sleep(0.02)
        raise RuncError(f"container {self.id} still running after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        _runc("kill", self.id, str(int(sig)), root=self.runc_root, check=False)

    def read_stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def read_stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def state_dir(self) -> Path:
        return Path(self.runc_root or "/run/runc") / self.id

    def cgroup_dirs(self) -> list[Path]:
        """The container's cgroup directory in every hierarchy that has it."""
        rel = self.cgroups_path.strip("/")
        return [m / rel for m in cgroup_mounts() if (m / rel).exists()]

    def delete(self) -> None:
        """Kill, ``runc delete --force``, and remove the parent cgroups runc created."""
        if self._created:
            self.kill()
            if self._proc is not None:
                try:
                    self._proc.wait(30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
            _runc("delete", "--force", self.id, root=self.runc_root, check=False)
            self._created = False
        for f in self._stdio:
            f.close()
        self._stdio = []
        parts = [p for p in self.cgroups_path.split("/") if p]
        for mount in cgroup_mounts():
            for i in range(len(parts), 0, -1):
                d = mount.joinpath(*parts[:i])
                if d in self._preexisting:
                    break
                for _ in range(50):
                    try:
                        os.rmdir(d)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:  # EBUSY while the last task leaves; ENOTEMPTY if shared
                        time.sleep(0.02)
                else:
                    break

    def close(self) -> None:
        try:
            self.delete()
        finally:
            shutil.rmtree(self.bundle, ignore_errors=True)

    def __enter__(self) -> "RuncContainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
