"""Bad input gives one line and exit 2: property tests (hypothesis) over what Envelope reads from
others — policies, profiles, configs, annotations and CLI arguments — asserting that nothing ends
in an internal error or a traceback, that a refused input applies nothing, and that nothing is
written outside the directory a command was given.

Inputs are both free-form (any YAML or msgpack value) and mutations of valid documents (one
field replaced by any value, which is where schema checks are thin)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from pathlib import Path

import msgpack
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from enforcer.policy import EgressRule, Policy, dump_policy
from envelope.cli import main
from sensor.cgroup import ContainerRef
from sensor.identity import build_identity, cri_from_annotations
from sensor.kube import container_fingerprints, pod_identity
from sensor.profile import Profile
from sensor.state_dir import MAX_NAME, StateDir
from sensor.store import ProfileStore
from sensor.workload import Workload

#: examples per property; ENVELOPE_FUZZ_EXAMPLES=5000 for a long run
FUZZ = settings(max_examples=int(os.environ.get("ENVELOPE_FUZZ_EXAMPLES", "120")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# ---- values -------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["", "enforce", "tcp", "10.0.0.0/8", "0.0.0.0/0", "syscall", "read",
                                     "/usr/bin/git", "1999-01-01T00:00:00Z", "9" * 30, "a/b/c/d", "../..",
                                     "-1", "::", "nan"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, ok=(0, 2)) -> None:
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in ok, (code, err)
    if code == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert lines and lines[-1].startswith("envelope"), err
        assert len(lines) == 1, err


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- policies -------------------------------------------------------------------------------------


def valid_policy_dict() -> dict:
    p = Policy(Workload("agents", "Deployment", "research-agent", "main"), mode="enforce",
               substrates=("syscall", "egress", "exec"), syscalls=("read", "write"),
               egress=(EgressRule("tcp", "10.0.3.0/24", (443,)),), execs=("/usr/bin/git",))
    return yaml.safe_load(dump_policy(p))


def paths_of(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from paths_of(v, prefix + (i,))


BASE = valid_policy_dict()
PATHS = [p for p in paths_of(BASE) if p]


def mutate(doc, path, value):
    doc = copy.deepcopy(doc)
    cur = doc
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return doc


policy_docs = st.one_of(
    values,
    st.builds(mutate, st.just(BASE), st.sampled_from(PATHS), values),
)

POLICY_COMMANDS = [
    ["compile", "{p}", "--format", "oci-seccomp", "-o", "{out}/a.json", "--report", "{out}/r.json"],
    ["compile", "{p}", "--format", "networkpolicy"],
    ["compile", "{p}", "--format", "cilium"],
    ["compile", "{p}", "--format", "spo"],
    ["explain", "{p}"],
    ["diff", "{p}", "{p}"],
    ["validity", "check", "{p}", "--current", "model=v4"],
]


@FUZZ
@given(policy_docs, st.sampled_from(POLICY_COMMANDS), st.sampled_from(["yaml", "json"]))
def test_any_policy_document(doc, command, fmt):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        p = root / f"policy.{fmt}"
        try:
            text = json.dumps(doc, allow_nan=True) if fmt == "json" else yaml.safe_dump(doc)
        except (ValueError, TypeError, OverflowError):
            assume(False)
        p.write_text(text)
        (root / "out").mkdir()
        argv = ["--state-dir", str(root / "state")] + [a.format(p=p, out=root / "out") for a in command]
        code, _out, err = run(argv)
        assert_clean(code, err, ok=(0, 1, 2) if command[0] in ("diff", "validity") else (0, 2))
        written = files(root) - {p.name, "out"}
        if code == 2:
            assert written <= {"state"}, written  # a refused policy writes nothing
            assert not (root / "state").exists() or files(root / "state") == set()
        else:
            assert all(w.startswith("out/") or w == "state" or w.startswith("state/") for w in written), written


# ---- profiles -------------------------------------------------------------------------------------


def valid_profile() -> Profile:
    p = Profile(Workload("agents", "Deployment", "research-agent", "main"))
    c = p.node("node-a")
    for s in ("s1", "s2", "s3"):
        c.open_session(s, 1.0, meta={"cgroup": "/x"})
        c.observe(s, "syscall:read", 5, 2.0)
        c.observe(s, "connect:tcp:10.0.3.7:443", 5, 2.0)
        c.close_session(s, 3.0)
    c.touch(4.0)
    return p


PBASE = valid_profile().pack()
PPATHS = [p for p in paths_of(PBASE) if p]

profile_docs = st.one_of(values, st.builds(mutate, st.just(PBASE), st.sampled_from(PPATHS), values))


@FUZZ
@given(profile_docs)
def test_any_profile_file(doc):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f = root / "profile.msgpack"
        try:
            f.write_bytes(msgpack.packb(doc, use_bin_type=True))
        except (TypeError, ValueError, OverflowError):
            assume(False)
        code, _out, err = run(["--state-dir", str(root / "state"), "derive", str(f), "--force"])
        assert_clean(code, err)
        # the same bytes as a stored profile: listing and showing never fail for everyone
        store = ProfileStore(root / "state")
        w = Workload("agents", "Deployment", "research-agent", "main")
        store.path_for(w).parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, store.path_for(w))
        code, _out, err = run(["--state-dir", str(root / "state"), "profile", "list", "-o", "json"])
        assert_clean(code, err, ok=(0,))
        code, _out, err = run(["--state-dir", str(root / "state"), "profile", "show", w.key])
        assert_clean(code, err)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2000), st.integers(0, 255))
def test_damaged_profile_bytes(garbage, at, byte):
    with tempfile.TemporaryDirectory() as d:
        store = ProfileStore(d)
        path = store.save(valid_profile())
        raw = bytearray(path.read_bytes())
        if at < len(raw):
            raw[at] = byte
        path.write_bytes(bytes(raw) + garbage)
        code, _out, err = run(["--state-dir", d, "profile", "list"])
        assert_clean(code, err, ok=(0,))
        code, _out, err = run(["--state-dir", d, "derive", "research-agent", "--force"])
        assert_clean(code, err)


# ---- configs ----------------------------------------------------------------------------------------

CONFIG_KEYS = ["state_dir", "node_name", "host_root", "ringbuf_pages", "poll_interval", "flush_interval",
               "max_cgroups", "caps", "metrics_port", "metrics_address", "kubelet_seccomp_dir", "bpffs",
               "fingerprint_annotations", "rebaseline_on_stale", "cluster", "profile_namespace",
               "kubeconfig", "policy_sync_interval", "unknown_key"]


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(CONFIG_KEYS), values, max_size=4)))
def test_any_config(doc):
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "config.yaml"
        try:
            cfg.write_text(yaml.safe_dump(doc))
        except (ValueError, TypeError):
            assume(False)
        code, _out, err = run(["--config", str(cfg), "--state-dir", str(Path(d) / "state"), "profile", "list"])
        assert_clean(code, err)


# ---- annotations ---------------------------------------------------------------------------------------

ANNOTATION_KEYS = ["io.kubernetes.cri.sandbox-name", "io.kubernetes.cri.sandbox-namespace",
                   "io.kubernetes.cri.container-name", "io.kubernetes.cri.container-type",
                   "io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.container.name",
                   "io.kubernetes.cri-o.Labels", "io.kubernetes.cri-o.ContainerName",
                   "envelope.dev/model-version", "eks.amazonaws.com/role-arn"]
annotation_values = st.one_of(st.text(max_size=300), st.sampled_from(["", "/", "a/b", "..", "x" * 300,
                                                                       '{"app": "x"}', "[1]", "k8s_a_b_c_d_e"]),
                              values)


@FUZZ
@given(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_values, max_size=8))
def test_any_oci_annotations_give_a_usable_workload(ann):
    cri = cri_from_annotations(ann)
    ref = ContainerRef("containerd", "c" * 64, "0" * 8 + "-0000-0000-0000-" + "0" * 12, "besteffort", "/kubepods/x")
    ident = build_identity(7, "/kubepods/x", ref, cri)
    w = ident.workload
    assert Workload.parse(w.key) == w  # one key, one workload
    for suffix in (".msgpack", ".yaml", ".json"):
        name = StateDir.workload_name(w.key, suffix)
        assert len(name.encode()) <= MAX_NAME and "/" not in name
    with tempfile.TemporaryDirectory() as d:
        path = ProfileStore(d).save(Profile(w))
        assert path.parent == Path(d) / "profiles"


@FUZZ
@given(st.dictionaries(st.sampled_from(ANNOTATION_KEYS + ["pod-template-hash"]), annotation_values, max_size=6),
       values, values)
def test_any_pod_object_gives_fingerprints(ann, labels, status):
    pod = {"metadata": {"name": "p", "namespace": "ns", "annotations": ann,
                        "labels": labels if isinstance(labels, dict) else {}},
           "spec": {"serviceAccountName": "sa"}, "status": status if isinstance(status, dict) else {}}
    fps = container_fingerprints(pod, "main")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fps.items())
    ident = pod_identity(pod, None, container_name="main")
    assert Workload.parse(Workload(ident.namespace, ident.kind, ident.name, "main").key)


# ---- CLI arguments -----------------------------------------------------------------------------------

WORDS = ["compile", "explain", "diff", "derive", "profile", "list", "show", "audit", "verify", "exception",
         "add", "revoke", "mode", "rebaseline", "violations", "validity", "check", "replay", "--reason",
         "--ttl", "--allow", "--since", "--workload", "--substrate", "-o", "json", "yaml", "table", "--force",
         "--min-sessions", "--expires-in", "--closure", "--format", "--out", "1h", "-1h", "99999999d", "nan",
         "egress=x", "connect:tcp:1.2.3.4:99999", "syscall:read", "", "-", "--", "host/Unit/x/main", "a/b",
         "agent", "enforce", "observe", "alert", "--substrates", "dns", "--ipv4-prefix", "99", "-k", "inf",
         "--max-ports", "-3", "--coverage-hours", "1e400", "--fingerprint", "=", "model=", "x" * 300]
FIRST = ["compile", "explain", "diff", "derive", "profile", "audit", "exception", "mode", "rebaseline",
         "violations", "validity", "replay"]


@FUZZ
@given(st.sampled_from(FIRST), st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=20)), max_size=7))
def test_any_command_line(first, rest):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        state = root / "state"
        ProfileStore(state).save(valid_profile())
        before = files(root)
        argv = ["--state-dir", str(state), first] + [a.replace("{d}", d) for a in rest]
        cwd = os.getcwd()
        os.chdir(root)
        try:
            code, _out, err = run(argv)
        finally:
            os.chdir(cwd)
        assert_clean(code, err, ok=(0, 1, 2))
        new = files(root) - before
        assert all(n.startswith("state") or "/" not in n for n in new), new  # only its state, or cwd outputs


times = st.one_of(st.text(alphabet="0123456789.smhdwTZz:-+ ", max_size=30),
                  st.builds(lambda y, o: f"{y:04d}-01-01T00:00:00{o}", st.integers(0, 9999),
                            st.sampled_from(["Z", "+05:00", "-23:59", ""])),
                  st.sampled_from(["99999999d", "1e400s", "0s", "nan", "inf", "-1h", "1h30m", "2w"]))


@FUZZ
@given(times, st.sampled_from([
    ["derive", "research-agent", "--force", "--expires-in", "{t}"],
    ["replay", "{p}", "research-agent", "--since", "{t}"],
    ["violations", "--since", "{t}"],
    ["exception", "add", "research-agent", "--allow", "syscall:ptrace", "--ttl", "{t}", "--reason", "x"],
]))
def test_any_duration_or_time(t, command):
    with tempfile.TemporaryDirectory() as d:
        state = Path(d) / "state"
        ProfileStore(state).save(valid_profile())
        p = Path(d) / "p.yaml"
        p.write_text(dump_policy(Policy(Workload("agents", "Deployment", "research-agent", "main"), mode="alert",
                                        substrates=("syscall",), syscalls=("read",))))
        code, _out, err = run(["--state-dir", str(state)] + [a.format(t=t, p=p) for a in command])
        assert_clean(code, err)


# ---- nothing applied halfway -----------------------------------------------------------------------


@FUZZ
@given(st.builds(mutate, st.just(BASE), st.sampled_from(PATHS), values),
       st.sampled_from(["none", "attach", "write", "audit"]), st.sampled_from(["observe", "alert", "enforce"]))
def test_an_apply_that_fails_changes_nothing(doc, failure, mode):
    """Any policy a mutation leaves parseable, applied over an earlier one with a failure injected
    at one step (an attach, the rules swap, the audit entry): either it all happened, or nothing
    did (rules, mode, attachments, pins, desired state and audit log as they were)."""
    from enforcer import audit
    from enforcer.desired import desired_path
    from enforcer.policy import PolicyError, parse_policy
    from enforcer.session import ApplyError, EnforcementSession
    from tests.fakes.kernel import FakeKernel

    try:
        new = parse_policy(yaml.safe_dump(doc), "fuzzed.yaml")
    except (PolicyError, ValueError):
        return
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = []
        for name in ("a", "b"):
            (root / "cg" / name).mkdir(parents=True)
            paths.append(str(root / "cg" / name))
        (root / "bpffs").mkdir()
        kernel = FakeKernel()
        s = EnforcementSession(root / "state", bpffs=root / "bpffs", backend=kernel)
        old = Policy(new.workload, mode="alert", substrates=("syscall", "egress"), syscalls=("read",),
                     egress=(EgressRule("tcp", "10.9.0.0/16", (8443,)),))
        s.apply(old, "alert", paths[:1])

        def snapshot():
            pins = {str(p): (st_.rules, st_.mode, frozenset(st_.attached)) for p, st_ in kernel.pins.items()}
            dp = desired_path(root / "state", new.workload)
            return pins, dp.read_bytes() if dp.exists() else None, len(audit.read(root / "state"))
        before = snapshot()
        if failure == "attach":
            kernel.fail_attach.add(paths[1])
        elif failure == "write":
            kernel.fail_write = True
        elif failure == "audit":
            with open(audit.log_path(root / "state"), "ab") as f:
                f.write(b'{"torn": ')
        try:
            s.apply(new, mode, paths)
        except ApplyError:
            assert snapshot() == before
            return
        assert failure == "none", failure  # a pinned apply goes through every step it can fail at
        after = snapshot()
        assert after[2] == before[2] + 1 and after[1] is not None  # applied, recorded and audited
