"""The CLI's conventions hold for every command: one output-format option, documented exit
statuses, examples in every command's help, --version and shell completion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from envelope.cli import EXAMPLES, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
PARSER = build_parser()
COMMANDS = sorted(next(a for a in PARSER._actions if a.dest == "command").choices)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example_and_the_exit_statuses(name):
    sub = next(a for a in PARSER._actions if a.dest == "command").choices[name]
    text = sub.format_help()
    assert name in EXAMPLES, f"envelope {name} --help shows no example"
    assert "examples:" in text and f"envelope {name}" in text.split("examples:", 1)[1]
    assert "exit status: 0 success; 1 findings" in text


@pytest.mark.parametrize("name", COMMANDS)
def test_output_option_means_a_format_everywhere(name):
    """Wherever -o exists it takes a format (table, json, yaml), never a file name."""
    def walk(parser):
        yield parser
        for a in parser._actions:
            for child in getattr(a, "choices", None).values() if isinstance(getattr(a, "choices", None), dict) else ():
                yield from walk(child)

    sub = next(a for a in PARSER._actions if a.dest == "command").choices[name]
    for parser in walk(sub):
        for a in parser._actions:
            if "-o" in a.option_strings:
                assert a.choices and set(a.choices) <= {"table", "json", "yaml"}, (parser.prog, a.choices)


def test_version_and_completion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("envelope ")
    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "envelope" in out


def test_exit_statuses(tmp_path, capsys):
    # 2: bad input
    assert main(["--state-dir", str(tmp_path), "profile", "show", "nobody"]) == 2
    # 1: a finding (violations listed); 0 when there are none
    assert main(["--state-dir", str(tmp_path), "violations"]) == 0
    from enforcer.violations import Violation, ViolationStore
    ViolationStore(tmp_path).append([Violation(1.0, "host/Unit/a/main", "egress", "connect:tcp:10.0.0.1:1",
                                               "denied")])
    assert main(["--state-dir", str(tmp_path), "violations"]) == 1
    capsys.readouterr()


def test_usage_errors_exit_2_from_argparse():
    r = subprocess.run([sys.executable, "-m", "envelope.cli", "derive"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "envelope: error: derive: the following arguments are required: name (see envelope derive --help)"]
