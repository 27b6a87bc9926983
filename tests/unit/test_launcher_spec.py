"""The launcher's OCI and pod-template rewrites (pure), validated like real manifests."""

from __future__ import annotations

import copy

import pytest
import yaml

from enforcer import seccomp
from enforcer.launcher import (LAUNCHER, LauncherSpecError, oci_with_launcher, pod_with_launcher,
                               ruleset_configmap, seccomp_allowances)
from enforcer.policy import Policy
from sensor.workload import Workload

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["/app/agent", "--task", "4"], "env": ["PATH=/bin"]},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}], "linux": {}}


def test_oci_rewrite_mounts_read_only_and_prefixes_args():
    out = oci_with_launcher(SPEC, launcher_source="/var/lib/envelope/launch/envelope-launch",
                            ruleset_source="/run/envelope/rulesets/abc")
    assert out["process"]["args"] == ["/.envelope/envelope-launch", "--ruleset", "/.envelope/ruleset", "--",
                                      "/app/agent", "--task", "4"]
    binds = {m["destination"]: m for m in out["mounts"] if m["type"] == "bind"}
    assert binds["/.envelope/envelope-launch"]["source"] == "/var/lib/envelope/launch/envelope-launch"
    assert "ro" in binds["/.envelope/envelope-launch"]["options"]
    assert "noexec" not in binds["/.envelope/envelope-launch"]["options"]
    assert {"ro", "noexec", "nosuid", "nodev"} <= set(binds["/.envelope/ruleset"]["options"])
    assert SPEC["process"]["args"][0] == "/app/agent"  # input untouched
    assert oci_with_launcher(out, launcher_source="/x", ruleset_source="/y") == out  # idempotent


def test_oci_rewrite_refuses_a_seccomp_profile_that_would_kill_the_launcher():
    w = Workload("agents", "Deployment", "research-agent", "agent")
    policy = Policy(workload=w, mode="enforce", syscalls=("read", "write", "exit_group"))
    spec = copy.deepcopy(SPEC)
    spec["linux"]["seccomp"] = seccomp.compile_oci(policy, runtime="runc").profile
    with pytest.raises(LauncherSpecError, match="landlock_add_rule.*extra_allow"):
        oci_with_launcher(spec, launcher_source="/l", ruleset_source="/r")
    compiled = seccomp.compile_oci(policy, runtime="runc", extra_allow=seccomp_allowances())
    assert {e.syscall for e in compiled.report if e.rule == LAUNCHER.rule} >= {
        "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "prctl"}
    spec["linux"]["seccomp"] = compiled.profile
    assert oci_with_launcher(spec, launcher_source="/l", ruleset_source="/r")["process"]["args"][0] == \
        "/.envelope/envelope-launch"


def test_oci_rewrite_bad_input():
    with pytest.raises(LauncherSpecError, match="process.args"):
        oci_with_launcher({"process": {}}, launcher_source="/l", ruleset_source="/r")
    with pytest.raises(LauncherSpecError, match="launcher_source"):
        oci_with_launcher(SPEC, launcher_source="relative", ruleset_source="/r")


def deployment(template: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "research-agent", "namespace": "agents"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "research-agent"}}, "template": template}}


TEMPLATE = {"metadata": {"labels": {"app": "research-agent"}},
            "spec": {"containers": [
                {"name": "agent", "image": "registry.example/agent:1", "command": ["python3", "-m", "agent"],
                 "args": ["--task", "4"]},
                {"name": "sidecar", "image": "registry.example/proxy:2"}]}}


def test_pod_rewrite_validates_and_wraps_only_what_it_was_asked():
    kv = pytest.importorskip("kubernetes_validate")
    out = pod_with_launcher(TEMPLATE, image="registry.example/envelope:0.1.0", configmap="research-agent-landlock",
                            containers=["agent"])
    agent, sidecar = out["spec"]["containers"]
    assert agent["command"] == ["/.envelope/bin/envelope-launch", "--ruleset", "/.envelope/rulesets/agent", "--",
                                "python3", "-m", "agent"]
    assert agent["args"] == ["--task", "4"]
    assert all(m["readOnly"] for m in agent["volumeMounts"])
    assert "command" not in sidecar and "volumeMounts" not in sidecar
    assert out["spec"]["initContainers"][0]["name"] == "envelope-launcher-install"
    assert pod_with_launcher(out, image="registry.example/envelope:0.1.0", configmap="research-agent-landlock",
                             containers=["agent"]) == out
    cm = ruleset_configmap("research-agent-landlock", "agents", {"agent": "envelope-landlock 1\nend\n"})
    for doc in (deployment(out), cm):
        kv.validate(yaml.safe_load(yaml.safe_dump(doc)), "1.30", strict=True)  # raises on any schema error
    bad = deployment(out)
    bad["spec"]["template"]["spec"]["volumes"][-1]["configMap"]["defaultMode"] = "0444"
    with pytest.raises(Exception):
        kv.validate(bad, "1.30", strict=True)


def test_pod_rewrite_needs_the_image_entrypoint_when_command_is_unset():
    with pytest.raises(LauncherSpecError, match="sidecar.*ENTRYPOINT"):
        pod_with_launcher(TEMPLATE, image="e", configmap="c")
    out = pod_with_launcher(TEMPLATE, image="e", configmap="c",
                            image_config={"sidecar": {"entrypoint": ["/proxy"], "cmd": ["--port", "8080"]}})
    sidecar = out["spec"]["containers"][1]
    assert sidecar["command"][-1] == "/proxy" and sidecar["args"] == ["--port", "8080"]
    with pytest.raises(LauncherSpecError, match="nope"):
        pod_with_launcher(TEMPLATE, image="e", configmap="c", containers=["nope"])
