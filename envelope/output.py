"""Rendering for ``-o table|json|yaml``. JSON and YAML are stable, sorted and scriptable."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from sensor.safeyaml import dump_yaml
from sensor.timestamps import iso_time

FORMATS = ("table", "json", "yaml")


def add_output_option(parser, default: str = "table", choices: Sequence[str] = FORMATS) -> None:
    parser.add_argument("-o", "--output", choices=list(choices), default=default,
                        help=f"output format (default: {default})")


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if fmt == "yaml":
        return dump_yaml(data, default_flow_style=False)
    raise ValueError(f"unknown format {fmt}")


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def emit(data: Any, fmt: str, rows: Iterable[Sequence[Any]] | None = None,
         headers: Sequence[str] | None = None, out=None) -> None:
    """Print ``data`` as JSON/YAML, or ``rows`` as a table when ``fmt == 'table'``."""
    out = out or sys.stdout
    if fmt == "table":
        if rows is None or headers is None:
            out.write(dump(data, "yaml"))
        else:
            out.write(table(rows, headers))
    else:
        out.write(dump(data, fmt))
    out.flush()


def write_file(path, data: bytes) -> None:
    """Write a file a person asked for (``--out``, ``-o FILE``, ``--report``), atomically; a
    path that cannot be written is one :class:`~envelope.errors.UserError` line."""
    from pathlib import Path

    from sensor.state_dir import atomic_write

    from .errors import UserError

    try:
        atomic_write(Path(path), data)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None


def iso(ts: float | None) -> str:
    """A time for a table cell (``-`` when unknown)."""
    return iso_time(ts) or "-"
