"""Rendering and exit helpers shared by the CLI modules.

Light on purpose: importing this must not pull in cffi (``pyiommufd --help``
stays fast). Tables go to stdout, JSON is one document on stdout, errors are
one ``pyiommufd: error:`` line on stderr.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

import click

from ..errors import PyiommufdError
from . import exitcodes


class CommandError(PyiommufdError):
    """A CLI-level failure with its own exit code. ``cli.main()`` prints it as
    one ``pyiommufd: error:`` line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = exitcodes.BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def exit_with(code: int) -> None:
    """Leave with ``code``. ``SystemExit`` passes through click's non-standalone
    mode and ``cli.main()`` unchanged (a ``click.exceptions.Exit`` would be
    turned into a return value there)."""
    sys.stdout.flush()
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"pyiommufd: warning: {message}", err=True)


def require_root(backend, what: str) -> None:
    """Exit 6 with one line unless the effective uid is 0."""
    euid = backend.geteuid()
    if euid != 0:
        raise CommandError(f"{what} needs root (effective uid is {euid}); run it with sudo",
                           exitcodes.NOT_PERMITTED)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table; ``None`` cells print as ``-``."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers)] + cells:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def echo_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    click.echo(table(rows, headers))


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def hex4(value: int | None) -> str | None:
    return None if value is None else f"{value:04x}"


__all__ = ["CommandError", "exit_with", "warn", "require_root", "table", "echo_table", "echo_json", "hex4"]
