"""Rendering and exit helpers shared by the CLI modules.

Light on purpose: importing this must not pull in cffi (``pyiommufd --help``
stays fast). Tables go to stdout, JSON is one document on stdout, errors are
one ``pyiommufd: error:`` line on stderr. With ``--json`` a failure also puts
an error object on stdout: inside the command's document when it prints one
(``"error": {...}``), else as the document ``{"error": {...}}``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import click

from ..errors import PyiommufdError
from .. import exitcodes

if TYPE_CHECKING:
    from ..backend import Backend


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


def write_durably(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that it survives an immediate reboot:
    written beside it, fsync'ed, renamed over it, and the directory fsync'ed.
    Raises OSError."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def warn(message: str) -> None:
    click.echo(f"pyiommufd: warning: {message}", err=True)


def require_root(backend: Backend, what: str) -> None:
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


#: JSON documents printed on stdout by this invocation (one at most, normally)
_json_documents = 0


def reset_json_count() -> None:
    global _json_documents
    _json_documents = 0


def json_document(obj: Any) -> str:
    """The CLI's JSON document for ``obj``, as ``--json`` prints it."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def echo_json(obj: Any) -> None:
    global _json_documents
    _json_documents += 1
    click.echo(json_document(obj))


_LONG_RUN = re.compile(r"\S{201,}")


def clip(message: str) -> str:
    """``message`` with every run of more than 200 non-blank characters cut
    to its ends (a 10,000-character name must not come back whole)."""
    return _LONG_RUN.sub(lambda m: f"{m.group(0)[:80]}…[{len(m.group(0))} characters]…{m.group(0)[-40:]}",
                         message)


def error_object(code: int, message: str, errno: int | None = None) -> dict[str, Any]:
    """The JSON error object: exit code, errno (number and name) and the message."""
    from ..errors import errname

    return {"code": code, "errno": errno, "errname": errname(errno) if errno else None,
            "message": clip(message)}


def report_error(message: str, code: int, *, errno: int | None = None, as_json: bool = False,
                 prefix: str = "error") -> int:
    """One ``pyiommufd: error:`` line on stderr and, with ``--json``, the
    error document on stdout unless the command printed its own. Returns ``code``."""
    sys.stdout.flush()
    if as_json and _json_documents == 0:
        echo_json({"error": error_object(code, message, errno)})
        sys.stdout.flush()
    click.echo(f"pyiommufd: {prefix}: {clip(message)}", err=True)
    return code


def json_requested() -> bool:
    """Whether the running command was given ``--json``."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return False


def hex4(value: int | None) -> str | None:
    return None if value is None else f"{value:04x}"


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout (with an \"error\" object on failure).")

__all__ = ["CommandError", "exit_with", "warn", "require_root", "table", "echo_table", "echo_json", "hex4",
           "error_object", "report_error", "clip", "json_option", "json_requested"]
