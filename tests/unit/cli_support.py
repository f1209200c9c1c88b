"""Running ``pyiommufd`` in-process for tests: through ``cli.main()``, which is
what maps errors to one stderr line and an exit code."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from click.testing import CliRunner

from pyiommufd.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __iter__(self):  # code, out, err = run_cli(...)
        return iter((self.code, self.out, self.err))


def run_cli(capsys, *argv: str) -> Result:
    capsys.readouterr()
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:  # pragma: no cover - main() always exits
        code = 0
    out, err = capsys.readouterr()
    return Result(code, out, err)


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("pyiommufd: error:")]


def cli_runner() -> CliRunner:
    """A CliRunner whose result has separate ``stdout`` and ``stderr`` on every
    supported click: 8.2 always separates them, 8.1 only with mix_stderr=False."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()
