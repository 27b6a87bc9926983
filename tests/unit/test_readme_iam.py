"""The README's research-corpus example works as written: its ``envelope`` commands run, the
document it shows is the one compiled, and the ``explain`` lines it shows are in the output."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import structlog

from envelope.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Cloud identity: IAM policies")
    ends = [i for i in (text.find("\n## ", start), text.find("\n### ", start + 1)) if i > 0]
    return text[start:min(ends)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), re.DOTALL)


def test_the_research_corpus_example_runs_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # the commands run from the repository root
    commands = [shlex.split(line.split("#", 1)[0])[1:] for b in blocks("sh") for line in b.splitlines()
                if line.startswith("envelope ")]
    assert [c[0] for c in commands] == ["derive", "explain", "compile", "compile", "replay"], commands
    outputs = []
    for argv in commands:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        outputs.append(out)
    [explain] = blocks("text")
    for line in explain.splitlines():
        assert line in outputs[1].splitlines(), line
    [document] = blocks("json")
    assert (tmp_path / "research-agent.iam.json").read_text() == document
    assert len(outputs[3]) == 394 and outputs[3].startswith('{"Version":"2012-10-17"')  # the session target
    assert "would deny 1 behaviours" in outputs[4] and "notes/draft.txt" in outputs[4]
