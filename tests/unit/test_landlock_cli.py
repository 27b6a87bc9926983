"""``envelope compile --format landlock|landlock-ruleset``: landlockconfig JSON (validated against
the project's schema) and the launcher's ruleset file, from a policy's exec and file entries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

from enforcer.landlock_formats import parse_ruleset_file
from enforcer.policy import dump_policy, load_policy
from envelope.cli import main

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "golden" / "compiled" / "policies" / "research-agent.yaml"
SCHEMA = ROOT / "fixtures" / "landlockconfig" / "landlockconfig.schema.json"


pytestmark = pytest.mark.usefixtures("structlog_warnings_to_stderr")


@pytest.fixture
def policy_file(tmp_path):
    """The research-agent fixture with file entries, in a root filesystem made for it."""
    rootfs = tmp_path / "rootfs"
    for d in ("usr/bin", "etc/ssl/certs", "srv/data"):
        (rootfs / d).mkdir(parents=True)
    for f in ("usr/bin/git", "etc/hosts", "srv/data/a.csv", "srv/data/b.csv"):
        (rootfs / f).write_text("x\n")
    base = load_policy(AGENT)
    pol = dataclasses.replace(base, mode="enforce", substrates=("exec", "file"), execs=("/usr/bin/git",),
                              files=("file:read:/etc/hosts", "file:read:/srv/data/*", "file:list:/srv/data",
                                     "file:read:/home/agent/*"))
    path = tmp_path / "policy.yaml"
    path.write_text(dump_policy(pol))
    return path, rootfs


def compile_(tmp_path, *args) -> int:
    return main(["--state-dir", str(tmp_path / "state"), "compile", *args])


def test_landlockconfig_validates_and_enumerates_children_from_the_root(tmp_path, policy_file, capsys):
    path, rootfs = policy_file
    (rootfs / "home/agent").mkdir(parents=True)
    (rootfs / "home/agent/notes.txt").write_text("n\n")
    (rootfs / "home/agent/.netrc").write_text("secret\n")
    rep = tmp_path / "report.json"
    assert compile_(tmp_path, str(path), "--format", "landlock", "--root", str(rootfs), "--report", str(rep)) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(doc)
    parents = {p for b in doc["pathBeneath"] for p in b["parent"]}
    assert {"/usr/bin/git", "/etc/hosts", "/srv/data", "/home/agent/notes.txt"} <= parents
    assert "/home/agent/.netrc" not in parents  # sensitive: never granted by /home/agent/*
    assert "landlock:children-enumerated" in out.err and "landlockconfig" in out.err
    report = json.loads(rep.read_text())
    assert report["landlockconfigGaps"] and {n["rule"] for n in report["notes"]} >= {"landlock:children-enumerated"}


def test_launcher_ruleset_file_parses_back(tmp_path, policy_file, capsys):
    path, rootfs = policy_file
    assert compile_(tmp_path, str(path), "--format", "landlock-ruleset", "--root", str(rootfs),
                    "--on-unsupported", "best-effort") == 0
    text = capsys.readouterr().out
    parsed, on_unsupported = parse_ruleset_file(text)
    assert on_unsupported == "best-effort"
    objects = {(r.path, r.object): r.rights for r in parsed.rules}
    assert objects[("/usr/bin/git", "file")] == ("execute", "read_file")
    assert ("/home/agent", "children") in objects and "execute" in parsed.handled_fs


def test_a_policy_without_exec_or_file_is_one_error_line(tmp_path, capsys):
    pol = dataclasses.replace(load_policy(AGENT), substrates=("syscall", "egress"))
    path = tmp_path / "p.yaml"
    path.write_text(dump_policy(pol))
    out = tmp_path / "out.json"
    assert compile_(tmp_path, str(path), "--format", "landlock", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither the exec nor the file substrate" in err[0]
    assert not out.exists()


def test_an_inexpressible_entry_is_refused_or_dropped_as_asked(tmp_path, policy_file, capsys):
    path, rootfs = policy_file
    pol = dataclasses.replace(load_policy(path), files=("file:read:/home/**", "file:read:/etc/hosts"))
    path.write_text(dump_policy(pol))
    assert compile_(tmp_path, str(path), "--format", "landlock-ruleset", "--root", str(rootfs)) == 2
    assert "cannot be enforced by Landlock" in capsys.readouterr().err
    assert compile_(tmp_path, str(path), "--format", "landlock-ruleset", "--root", str(rootfs),
                    "--inexpressible", "drop") == 0
    cap = capsys.readouterr()
    assert "inexpressible:dropped" in cap.err
    assert not [r for r in parse_ruleset_file(cap.out)[0].rules if r.path.startswith("/home")]


# ---- envelope launcher oci|pod ------------------------------------------------------------------

FIXTURES = ROOT / "fixtures" / "k8s"


def ruleset_path(tmp_path, policy_file, capsys) -> Path:
    path, rootfs = policy_file
    assert compile_(tmp_path, str(path), "--format", "landlock-ruleset", "--root", str(rootfs)) == 0
    out = tmp_path / "agent.ruleset"
    out.write_text(capsys.readouterr().out)
    return out


def test_launcher_pod_rewrites_a_deployment_and_ships_its_rulesets(tmp_path, policy_file, capsys):
    import kubernetes_validate
    import yaml
    rs = ruleset_path(tmp_path, policy_file, capsys)
    image_config = tmp_path / "image.yaml"
    image_config.write_text("agent:\n  entrypoint: [/usr/bin/python3, -m, agent]\n  cmd: [--serve]\n")
    out = tmp_path / "wrapped.yaml"
    assert main(["launcher", "pod", str(FIXTURES / "deployment-research-agent.json"), "--ruleset", f"agent={rs}",
                 "--image", "registry.example/envelope:0.1.0", "--image-config", str(image_config),
                 "--out", str(out)]) == 0
    cm, dep = list(yaml.safe_load_all(out.read_text()))
    assert cm["kind"] == "ConfigMap" and cm["data"]["agent"] == rs.read_text()
    spec = dep["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    assert agent["command"][:4] == ["/.envelope/bin/envelope-launch", "--ruleset", "/.envelope/rulesets/agent", "--"]
    assert agent["command"][4:] == ["/usr/bin/python3", "-m", "agent"] and agent["args"] == ["--serve"]
    other = next(c for c in spec["containers"] if c["name"] != "agent")
    assert not (other.get("command") or [""])[0].startswith("/.envelope")  # only the named container
    assert spec["initContainers"][0]["image"] == "registry.example/envelope:0.1.0"
    for doc in (cm, dep):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_launcher_pod_errors_are_one_line(tmp_path, policy_file, capsys):
    rs = ruleset_path(tmp_path, policy_file, capsys)
    dep = str(FIXTURES / "deployment-research-agent.json")
    assert main(["launcher", "pod", dep, "--ruleset", f"agent={rs}", "--image", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--image-config" in err
    assert main(["launcher", "pod", dep, "--ruleset", f"nope={rs}", "--image", "x"]) == 2
    assert "nope not in spec.containers" in capsys.readouterr().err
    bad = tmp_path / "bad.ruleset"
    bad.write_text("envelope-landlock 1\nhandled_fs read_file\nfile read_file /etc/hosts\n")  # no end: truncated
    assert main(["launcher", "pod", dep, "--ruleset", f"agent={bad}", "--image", "x"]) == 2
    assert "truncated" in capsys.readouterr().err


def test_launcher_oci_prefixes_the_command_and_mounts_read_only(tmp_path, policy_file, capsys):
    rs = ruleset_path(tmp_path, policy_file, capsys)
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({"ociVersion": "1.0.2", "process": {"args": ["/app/agent", "--serve"]},
                                "mounts": [], "linux": {}}))
    launcher = tmp_path / "envelope-launch"
    launcher.write_text("")
    assert main(["launcher", "oci", str(spec), "--ruleset", str(rs), "--launcher", str(launcher)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["process"]["args"] == ["/.envelope/envelope-launch", "--ruleset", "/.envelope/ruleset", "--",
                                      "/app/agent", "--serve"]
    mounts = {m["destination"]: m for m in out["mounts"]}
    assert mounts["/.envelope/ruleset"]["source"] == str(rs) and "ro" in mounts["/.envelope/ruleset"]["options"]
