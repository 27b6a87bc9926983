"""Compiled seccomp profiles in the kubelet seccomp dir: layout, localhostProfile values,
atomic writes, symlink safety under a host root, and per-workload error collection."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import structlog

from enforcer.kubelet import (
    NAME_MAX, KubeletSeccompDir, SeccompWriteError, join_under, localhost_profile, profile_filename, render,
)
from enforcer.policy import EgressRule, Policy
from enforcer.seccomp import compile_oci
from envelope.config import Config
from sensor.workload import Workload

W = Workload("agents", "Deployment", "research-agent", "main")
W2 = Workload("agents", "StatefulSet", "vector-store", "db")
PROFILE = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]}


@pytest.fixture(autouse=True)
def _plain_logging():
    """Log to whatever stderr is now: an earlier test's ``envelope.cli.main`` may have bound
    structlog to a captured stream that pytest has since closed."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def host(tmp_path) -> Path:
    return tmp_path / "host"


@pytest.fixture
def seccomp_dir(host) -> KubeletSeccompDir:
    return KubeletSeccompDir(host, "/var/lib/kubelet/seccomp")


def test_layout_and_localhost_profile_value(host, seccomp_dir):
    res = seccomp_dir.write(W, PROFILE)
    expected = host / "var/lib/kubelet/seccomp/envelope/agents/deployment_research-agent_main.json"
    assert res.path == expected and res.changed
    assert res.localhost_profile == "envelope/agents/deployment_research-agent_main.json"
    assert res.localhost_profile == localhost_profile(W)
    assert (host / "var/lib/kubelet/seccomp" / res.localhost_profile) == expected
    assert json.loads(expected.read_text()) == PROFILE
    assert stat.S_IMODE(expected.stat().st_mode) == 0o644
    assert res.digest.startswith("sha256:") and len(res.digest) == 71


def test_from_config_uses_host_root_and_kubelet_dir(tmp_path):
    cfg = Config(host_root=tmp_path / "h", kubelet_seccomp_dir=Path("/data/kubelet/seccomp"))
    d = KubeletSeccompDir.from_config(cfg)
    assert d.write(W, PROFILE).path == tmp_path / "h/data/kubelet/seccomp/envelope/agents" / profile_filename(W)


def test_rewrite_is_atomic_and_unchanged_content_is_not_rewritten(seccomp_dir):
    first = seccomp_dir.write(W, PROFILE)
    ino = first.path.stat().st_ino
    again = seccomp_dir.write(W, PROFILE)
    assert not again.changed and first.path.stat().st_ino == ino and again.digest == first.digest

    reader = open(first.path, "rb")  # a reader holding the old file keeps seeing it whole
    changed = dict(PROFILE, defaultAction="SCMP_ACT_LOG")
    res = seccomp_dir.write(W, changed)
    assert res.changed and res.digest != first.digest
    assert first.path.stat().st_ino != ino, "replaced by rename, not rewritten in place"
    assert json.loads(reader.read()) == PROFILE
    reader.close()
    assert json.loads(first.path.read_text()) == changed
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name], "no temporary files left"


def test_compiled_profile_is_written_byte_for_byte(seccomp_dir):
    policy = Policy(W, mode="enforce", syscalls=("read", "write", "openat", "exit_group"),
                    egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),))
    compiled = compile_oci(policy)
    res = seccomp_dir.write(W, compiled)
    assert res.path.read_bytes() == compiled.to_json().encode()
    assert seccomp_dir.read(W) == compiled.to_json().encode()
    assert render(compiled.profile) == compiled.to_json().encode()


def test_symlinked_namespace_dir_is_refused_and_nothing_escapes(host, seccomp_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = host / "var/lib/kubelet/seccomp/envelope"
    base.mkdir(parents=True)
    (base / "agents").symlink_to(outside)
    with pytest.raises(SeccompWriteError, match="symlink"):
        seccomp_dir.write(W, PROFILE)
    assert list(outside.iterdir()) == []


def test_symlinked_envelope_dir_is_refused(host, seccomp_dir, tmp_path):
    outside = tmp_path / "etc"
    outside.mkdir()
    root = host / "var/lib/kubelet/seccomp"
    root.mkdir(parents=True)
    (root / "envelope").symlink_to(outside)
    with pytest.raises(SeccompWriteError, match="symlink"):
        seccomp_dir.write(W, PROFILE)
    assert list(outside.iterdir()) == []
    with pytest.raises(SeccompWriteError, match="symlink"):
        seccomp_dir.installed()


def test_symlink_at_the_file_name_is_replaced_not_followed(host, seccomp_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    d = host / "var/lib/kubelet/seccomp/envelope/agents"
    d.mkdir(parents=True)
    (d / profile_filename(W)).symlink_to(victim)
    res = seccomp_dir.write(W, PROFILE)
    assert victim.read_text() == "keep me"
    assert not res.path.is_symlink() and json.loads(res.path.read_text()) == PROFILE


@pytest.mark.parametrize("workload", [
    Workload("..", "Deployment", "x", "main"),
    Workload("agents", "Deployment", "../../etc/passwd", "main"),
    Workload("agents", "Deployment", "a/b", "main"),
    Workload("agents", "Deployment", "x", "../main"),
    Workload("Agents", "Deployment", "x", "main"),
    Workload("agents", "Deploy/ment", "x", "main"),
    Workload.host("/system.slice/agent.service"),
])
def test_names_that_are_not_kubernetes_names_are_refused(host, seccomp_dir, workload):
    with pytest.raises(SeccompWriteError, match=workload.key.replace(".", r"\.")[:10]):
        seccomp_dir.write(workload, PROFILE)
    assert not (host / "var/lib/kubelet/seccomp/envelope").exists() or seccomp_dir.installed() == []


def test_join_under_refuses_dot_dot(tmp_path):
    assert join_under(tmp_path, "/var/lib/kubelet/seccomp") == tmp_path / "var/lib/kubelet/seccomp"
    with pytest.raises(SeccompWriteError):
        join_under(tmp_path, "/var/lib/../../etc")


def test_long_names_fit_one_path_component_and_stay_distinct():
    a = Workload("agents", "StatefulSet", "a" * 253, "c" * 63)
    b = Workload("agents", "StatefulSet", "a" * 252 + "b", "c" * 63)
    fa, fb = profile_filename(a), profile_filename(b)
    assert len(fa) <= NAME_MAX and len(fb) <= NAME_MAX and fa != fb
    assert fa == profile_filename(a) and fa.endswith("_" + "c" * 63 + ".json")


def test_render_refuses_what_is_not_a_seccomp_profile():
    with pytest.raises(SeccompWriteError, match="defaultAction"):
        render({"syscalls": []})
    with pytest.raises(SeccompWriteError, match="not JSON"):
        render("{not json")
    with pytest.raises(SeccompWriteError, match="not a seccomp profile"):
        render(42)


def test_write_all_collects_errors_per_workload(seccomp_dir):
    bad = Workload("agents", "Deployment", "Bad_Name", "main")
    done, failed = seccomp_dir.write_all({W: PROFILE, bad: PROFILE, W2: {"nope": 1}})
    assert [r.workload for r in done] == [W]
    assert set(failed) == {bad, W2}
    assert "not a Kubernetes object name" in failed[bad] and "defaultAction" in failed[W2]


def test_installed_remove_and_prune(seccomp_dir, host):
    other = Workload("tools", "Deployment", "indexer", "main")
    for w in (W, W2, other):
        seccomp_dir.write(w, PROFILE)
    assert seccomp_dir.installed() == sorted(localhost_profile(w) for w in (W, W2, other))
    assert seccomp_dir.remove(other) and not seccomp_dir.remove(other)
    assert not (host / "var/lib/kubelet/seccomp/envelope/tools").exists(), "empty namespace dir removed"
    (host / "var/lib/kubelet/seccomp/unrelated.json").write_text("{}")  # not ours: never touched
    assert seccomp_dir.prune([W]) == [localhost_profile(W2)]
    assert seccomp_dir.installed() == [localhost_profile(W)]
    assert (host / "var/lib/kubelet/seccomp/unrelated.json").exists()
    assert seccomp_dir.read(W2) is None


def test_missing_dir_reads_as_empty(tmp_path):
    d = KubeletSeccompDir(tmp_path / "nothing-here")
    assert d.installed() == [] and d.read(W) is None and d.remove(W) is False


def test_a_file_where_a_directory_belongs_is_an_error_with_the_path(host, seccomp_dir):
    d = host / "var/lib/kubelet/seccomp/envelope"
    d.mkdir(parents=True)
    (d / "agents").write_text("not a directory")
    with pytest.raises(SeccompWriteError, match=r"envelope/agents: is a symlink or not a directory"):
        seccomp_dir.write(W, PROFILE)
    assert (d / "agents").read_text() == "not a directory"
