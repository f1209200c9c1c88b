"""The ``pyiommufd`` command.

Subcommands live in their own modules and are imported only when run, so
``pyiommufd --help`` stays fast. Every error becomes one line on stderr (and,
with ``--json``, an error object on stdout) and an exit code from
:func:`pyiommufd.exitcodes.exit_code_for`; ``--debug`` (before or after the subcommand)
adds the traceback and changes nothing else. ``--json`` too may come before
the subcommand.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from .. import __version__
from .. import exitcodes

# name -> (module, attribute, one-line help shown by --help without importing)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "selftest": ("selftest_cmd", "selftest", "Run the series' iommufd_liveupdate selftest, stage 1 or 2."),
    "preserve": ("lifecycle", "preserve", "Create objects and preserve them into a session held by the agent."),
    "restore": ("lifecycle", "restore", "After kexec: retrieve a session per its manifest, verify, optionally exec a VMM."),
    "finish": ("lifecycle", "finish", "Finish a retrieved session."),
    "status": ("lifecycle", "status", "Show the agent's sessions, tokens and what each token is."),
    "agent": ("lifecycle", "agent", "The holder agent that keeps /dev/liveupdate and session fds until kexec."),
    "plan": ("lifecycle", "plan", "Validate a preservation plan and print the order of operations."),
    "kexec": ("lifecycle", "kexec_cmd", "Load a kernel with kexec_file_load and reboot into it."),
    "doctor": ("doctor", "doctor", "Check this host's readiness for IOMMU live update."),
    "caps": ("doctor", "caps", "Probe ioctls and the LU ABI revision this kernel supports."),
    "devices": ("devices", "devices", "List PCI devices with IOMMU group, driver and VFIO cdev."),
    "bind": ("devices", "bind", "Bind a PCI device to vfio-pci through driver_override."),
    "unbind": ("devices", "unbind", "Give a PCI device back to its original driver."),
    "qemu": ("qemu_cmd", "qemu", "Launch, update, resume or abort a QEMU VM that survives a kexec."),
    "vm": ("vm_cmd", "vm", "Run commands or the seed flow in a QEMU guest on a real Linux 7.3 kernel."),
    "exit-codes": ("__init__", "exit_codes", "Print the table of exit codes."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module, attr, _ = entry
        command: click.Command
        if module == "__init__":
            command = globals()[attr]
        else:
            command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="PYIOMMUFD_DEBUG", help="Show tracebacks.")
@click.option("--json", "as_json", is_flag=True, help="The subcommand's --json, given before it.")
@click.version_option(version=__version__, prog_name="pyiommufd")
@click.pass_context
def cli(ctx: click.Context, debug: bool, as_json: bool) -> None:
    """Userspace toolkit for Linux IOMMU live update: iommufd, VFIO cdevs and LUO.

    Every command takes --json; --json and --debug may come before or after
    the subcommand."""
    from .output import reset_json_count

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    reset_json_count()
    name = ctx.invoked_subcommand
    if as_json and name is not None:
        command = cli.get_command(ctx, name)
        if command is not None:
            # click hands each subcommand's context its entry of the default map
            ctx.default_map = {name: _json_by_default(command, ctx)}


def _json_by_default(command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """A default map that turns on ``--json`` of ``command`` and of every
    command under it (``agent status``, ``vm run``)."""
    out: dict[str, Any] = {"as_json": True}
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                out[name] = _json_by_default(sub, ctx)
    return out


@click.command("exit-codes")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def exit_codes(as_json: bool) -> None:
    """Print the table of exit codes."""
    if as_json:
        from .output import echo_json

        echo_json([{"code": code, "meaning": meaning} for code, meaning in exitcodes.TABLE])
        return
    for code, meaning in exitcodes.TABLE:
        click.echo(f"{code}  {meaning}")


def _split_options(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(argv with every ``--debug`` moved to the front, debug, json): both are
    looked for only before a ``--`` (what follows belongs to a guest or VMM)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:end], argv[end:]
    debug = "--debug" in head
    rest = [a for a in head if a != "--debug"]
    return (["--debug"] if debug else []) + rest + tail, debug, "--json" in head


def report_error(*args: Any, **kwargs: Any) -> int:
    from . import output  # not at import time: `--help` stays light

    return output.report_error(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    import traceback

    argv, debug, as_json = _split_options(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("PYIOMMUFD_DEBUG", "") not in ("", "0")
    try:
        rc = cli.main(args=argv, prog_name="pyiommufd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(report_error("aborted", exitcodes.BAD_INPUT, as_json=as_json))
    except click.ClickException as exc:
        sys.exit(report_error(f"{exc.format_message()} (see --help)", exc.exit_code, as_json=as_json))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        from .. import errors

        if debug:
            traceback.print_exc()
        if not isinstance(exc, (errors.PyiommufdError, OSError)):
            hint = "" if debug else " (run with --debug for a traceback)"
            sys.exit(report_error(f"{type(exc).__name__}: {exc}{hint}", exitcodes.INTERNAL_ERROR,
                                  as_json=as_json, prefix="internal error"))
        sys.exit(report_error(str(exc), exitcodes.exit_code_for(exc), errno=getattr(exc, "errno", None),
                              as_json=as_json))
    # standalone_mode=False returns ctx.exit(n) codes instead of raising them
    sys.exit(rc if isinstance(rc, int) else 0)
