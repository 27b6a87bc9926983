"""Compiled Landlock rulesets as files: Envelope's ruleset file for the static launcher, and the
JSON format of the kernel maintainers' landlockconfig project. Pure and deterministic.

**Ruleset file, version 1** (read by ``enforcer/launcher/envelope-launch.c`` and by
:func:`parse_ruleset_file`). Text, one record per line, fields separated by one space; a path is
always the last field and runs to the end of the line (paths with a newline, tab or NUL cannot be
written). Lines starting with ``#`` are comments. ::

    envelope-landlock 1                      first line: magic and version
    workload default/Deployment/agent/main   informational
    handled_fs execute,read_file,...         rights the ruleset restricts (landlockconfig names)
    restrict_flags log_new_exec_on           landlock_restrict_self(2) flags, or -
    on_unsupported refuse                    refuse | best-effort (see below)
    file RIGHTS PATH                         rights on the file PATH (refused if it is a directory)
    tree RIGHTS PATH                         rights on PATH and everything beneath it
    children RIGHTS PATH                     rights on each non-directory entry of PATH
    exclude GLOB                             (after children) skip child names matching GLOB
    end                                      last line: a file without it is truncated

``RIGHTS`` is a comma-separated list of names from :data:`enforcer.landlock_rules.FS_RIGHTS`.
A rule object that does not exist when the ruleset is applied is skipped and reported (a missing
object can only make the ruleset stricter). ``on_unsupported``: when the kernel cannot restrict a
handled right, ``refuse`` stops before running anything; ``best-effort`` drops the right and
reports each gap. Restrict flags the kernel lacks (denial logging needs ABI 7) are dropped with
a warning: they change what is logged, not what is allowed.

**landlockconfig JSON** (https://github.com/landlock-lsm/landlockconfig, ``schema/landlockconfig.json``):
``abi``, one ``ruleset`` item with ``handledAccessFs``, and one ``pathBeneath`` item per set of
rights with its sorted ``parent`` paths. That format has no ``children`` objects and no
restrict flags: ``children`` rules need the enumeration the launcher does at apply time, passed
in as ``expansions``; the logging flags are not representable and are listed by
:func:`landlockconfig_gaps`.
"""

from __future__ import annotations

import json
from typing import Mapping

from .landlock_rules import (BY_NAME, CHILDREN_OBJECT, FILE_OBJECT, FS_RIGHTS, OBJECTS, RESTRICT_FLAGS,
                             CompiledRuleset, PathRule, sort_rights)

MAGIC = "envelope-landlock"
VERSION = 1
ON_UNSUPPORTED = ("refuse", "best-effort")


class RulesetFileError(ValueError):
    """A ruleset file that does not parse, or a ruleset that cannot be written as one."""


def _names(names) -> str:
    return ",".join(names) if names else "-"


def _check_path(path: str) -> str:
    if not path.startswith("/") or any(c in path for c in "\n\t\0"):
        raise RulesetFileError(f"path {path!r} cannot be written to a ruleset file")
    return path


def ruleset_file(compiled: CompiledRuleset, on_unsupported: str = "refuse") -> str:
    """The ruleset as version-1 ruleset-file text."""
    if on_unsupported not in ON_UNSUPPORTED:
        raise RulesetFileError(f"on_unsupported {on_unsupported!r} is not one of {', '.join(ON_UNSUPPORTED)}")
    if any(c in compiled.workload for c in "\n\0"):
        raise RulesetFileError("workload name contains a newline")
    lines = [f"{MAGIC} {VERSION}",
             f"# {len(compiled.rules)} rules; minimum Landlock ABI {compiled.abi}",
             f"workload {compiled.workload}",
             f"handled_fs {_names(compiled.handled_fs)}",
             f"restrict_flags {_names(compiled.restrict_flags)}",
             f"on_unsupported {on_unsupported}"]
    for r in compiled.rules:
        lines.append(f"{r.object} {_names(r.rights)} {_check_path(r.path)}")
        for g in r.exclude:
            if "/" in g or any(c in g for c in "\n\t\0 ") or not g:
                raise RulesetFileError(f"exclude glob {g!r} cannot be written to a ruleset file")
            lines.append(f"exclude {g}")
    lines.append("end")
    return "\n".join(lines) + "\n"


def _parse_rights(text: str, allowed, lineno: int) -> tuple[str, ...]:
    if text == "-":
        return ()
    out = []
    for n in text.split(","):
        r = BY_NAME.get(n)
        if r is None or r not in allowed:
            raise RulesetFileError(f"line {lineno}: unknown right {n!r}")
        out.append(n)
    return tuple(out)


def parse_ruleset_file(text: str) -> tuple[CompiledRuleset, str]:
    """``(ruleset, on_unsupported)`` from ruleset-file text (sources and notes are not kept)."""
    lines = text.split("\n")
    if not lines or lines[0] != f"{MAGIC} {VERSION}":
        raise RulesetFileError(f"line 1: not an {MAGIC} {VERSION} file (got {lines[0][:40]!r})")
    workload, handled, flags, on_unsupported = "", (), (), "refuse"
    rules: list[PathRule] = []
    ended = False
    for i, line in enumerate(lines[1:], start=2):
        if ended:
            if line:
                raise RulesetFileError(f"line {i}: text after end")
            continue
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "end":
            ended = True
        elif word == "workload":
            workload = rest
        elif word == "handled_fs":
            handled = _parse_rights(rest, FS_RIGHTS, i)
        elif word == "restrict_flags":
            flags = _parse_rights(rest, RESTRICT_FLAGS, i)
        elif word == "on_unsupported":
            if rest not in ON_UNSUPPORTED:
                raise RulesetFileError(f"line {i}: on_unsupported {rest!r} is not one of {', '.join(ON_UNSUPPORTED)}")
            on_unsupported = rest
        elif word in OBJECTS:
            rights, _, path = rest.partition(" ")
            if not path.startswith("/"):
                raise RulesetFileError(f"line {i}: {word} rule without an absolute path")
            rs = _parse_rights(rights, FS_RIGHTS, i)
            extra = set(rs) - set(handled)
            if extra:
                raise RulesetFileError(f"line {i}: rights {sorted(extra)} are not in handled_fs")
            rules.append(PathRule(path, word, sort_rights(rs)))
        elif word == "exclude":
            if not rules or rules[-1].object != CHILDREN_OBJECT:
                raise RulesetFileError(f"line {i}: exclude must follow a children rule")
            last = rules[-1]
            rules[-1] = PathRule(last.path, last.object, last.rights, last.sources, last.exclude + (rest,))
        else:
            raise RulesetFileError(f"line {i}: unknown record {word!r}")
    if not ended:
        raise RulesetFileError("no end line: the file is truncated")
    return CompiledRuleset(workload, sort_rights(handled), tuple(rules), (), flags), on_unsupported


# ---- landlockconfig -------------------------------------------------------------------------


def landlockconfig(compiled: CompiledRuleset, expansions: Mapping[str, list[str]] | None = None) -> dict:
    """The ruleset in landlockconfig's JSON schema. ``expansions`` maps each ``children`` rule's
    directory to the child paths to grant (as the launcher would enumerate them)."""
    expansions = expansions or {}
    by_rights: dict[tuple[str, ...], set[str]] = {}
    for r in compiled.rules:
        if r.object == CHILDREN_OBJECT:
            if r.path not in expansions:
                raise RulesetFileError(
                    f"children rule on {r.path} cannot be written in landlockconfig without its children; "
                    f"fix: enumerate them (compile with --root)")
            paths = expansions[r.path]
        else:
            paths = [r.path]
        by_rights.setdefault(r.rights, set()).update(paths)
    doc: dict = {"abi": compiled.abi}
    if compiled.handled_fs:
        doc["ruleset"] = [{"handledAccessFs": list(compiled.handled_fs)}]
    beneath = [{"allowedAccess": list(rights), "parent": sorted(paths)}
               for rights, paths in sorted(by_rights.items(), key=lambda kv: [BY_NAME[n].bit for n in kv[0]])
               if paths]
    if beneath:
        doc["pathBeneath"] = beneath
    if len(doc) == 1:
        raise RulesetFileError("an empty ruleset has no landlockconfig form (nothing is handled)")
    return doc


def landlockconfig_gaps(compiled: CompiledRuleset) -> list[str]:
    """What the landlockconfig form leaves out of the ruleset."""
    out = []
    if compiled.restrict_flags:
        out.append(f"restrict flags {', '.join(compiled.restrict_flags)} (denial logging after exec) have no "
                   f"field in landlockconfig; the applying tool decides what is logged")
    if any(r.object == FILE_OBJECT for r in compiled.rules):
        out.append("file rules are plain parents: landlockconfig does not refuse a directory found where a "
                   "file was expected")
    return out


def dump_landlockconfig(doc: dict) -> str:
    """JSON as ``jq`` formats it (landlockconfig's schema/check.sh compares with ``jq`` output)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


__all__ = ["MAGIC", "ON_UNSUPPORTED", "RulesetFileError", "VERSION", "dump_landlockconfig",
           "landlockconfig", "landlockconfig_gaps", "parse_ruleset_file", "ruleset_file"]
