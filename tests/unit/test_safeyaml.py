"""The one YAML loader refuses alias bombs, duplicate keys, deep nesting and what safe loading
cannot construct, each as one line naming the source and the line; everything that reads YAML
uses it (policies, configs, desired states, services, declared policies)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from enforcer.desired import parse_desired
from enforcer.policy import PolicyError, parse_policy
from envelope.cli import main
from sensor.safeyaml import MAX_DEPTH, YamlError, load_yaml

ROOT = Path(__file__).resolve().parents[2]


def bomb(levels: int = 9) -> str:
    """The billion laughs: about 1 KB that a plain safe_load expands into 9**levels strings."""
    out = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        out.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(out) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands():
    text = bomb()
    assert len(text) < 1200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(YamlError, match="line 1: the anchor defined here is used again as an alias"):
        load_yaml(text, "bomb.yaml")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing expanded


@pytest.mark.parametrize("text,problem", [
    ("mode: enforce\nspec: {}\nmode: observe\n", "line 3: duplicate key 'mode'"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("a: &x {b: 1}\nc:\n  <<: *x\n", "are not accepted"),
    ("<<: {b: 1}\n", "merge keys"),
    ("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5), f"nested deeper than {MAX_DEPTH}"),
    ("a: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ("a: 1\n---\nb: 2\n", "but found another document"),
    ("a: 2001-13-45\n", "month must be in 1..12"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_what_is_refused_and_how_it_is_said(text, problem):
    with pytest.raises(YamlError) as e:
        load_yaml(text, "f.yaml")
    msg = str(e.value)
    assert msg.startswith("f.yaml: ") and problem in msg and "\n" not in msg


def test_bytes_must_be_utf8_and_size_is_bounded():
    with pytest.raises(YamlError, match="not UTF-8"):
        load_yaml(b"a: \xff\n", "f")
    assert load_yaml(b"a: 1\n", "f") == {"a": 1}
    assert load_yaml("", "f") is None


def test_every_reader_uses_it():
    for parse, err in ((lambda t: parse_policy(t, "p.yaml"), PolicyError),
                       (lambda t: parse_desired(t.encode(), "d.yaml"), (PolicyError, YamlError))):
        with pytest.raises(err, match="aliases are not accepted"):
            parse(bomb())
        with pytest.raises(err, match="duplicate key"):
            parse("a: 1\na: 2\n")
    plain_loads = [p for p in ("sensor", "enforcer", "envelope") for f in (ROOT / p).rglob("*.py")
                   if "safe_load(" in f.read_text() or "yaml.load(" in f.read_text()]
    assert plain_loads == [], "YAML read without sensor.safeyaml"


@pytest.mark.parametrize("command", [
    ["compile", "{policy}", "--format", "oci-seccomp"],
    ["explain", "{policy}"],
    ["enforce", "x", "--policy", "{policy}"],
    ["exec", "--policy", "{policy}", "--", "/bin/true"],
    ["cluster", "apply", "{policy}"],
])
def test_an_alias_bomb_policy_is_one_line_and_exit_2(tmp_path, capsys, command):
    policy = tmp_path / "bomb.yaml"
    policy.write_text(bomb())
    code = main(["--state-dir", str(tmp_path / "s")] + [a.format(policy=policy) for a in command])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "aliases are not accepted" in err and "internal error" not in err
