"""``pyiommufd qemu``: a QEMU VM that survives a kexec of its host.

Each command parses, calls one flow of :mod:`pyiommufd.qemu.liveupdate` and
renders its result. The holder is the agent (started if none answers); the
VM's runtime record is under ``$PYIOMMUFD_STATE_DIR/qemu`` (default
``/run/pyiommufd/qemu``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..backend import get_backend
from ..holder import AgentHolder
from .output import echo_json

DEFAULT_STATE_DIR = "/run/pyiommufd"

socket_option = click.option("--socket", "socket_path", metavar="PATH", default=None,
                             help="Agent socket (default: $PYIOMMUFD_AGENT_SOCKET or /run/pyiommufd/agent.sock).")
qemu_option = click.option("--qemu", "qemu_path", metavar="PATH", default=None,
                           help="The QEMU binary (default: $PYIOMMUFD_QEMU, else the QEMU 11.1 pyiommufd "
                                "fetches into its cache).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def runtime_dir() -> Path:
    return Path(os.environ.get("PYIOMMUFD_STATE_DIR") or DEFAULT_STATE_DIR) / "qemu"


def _holder(socket_path: str | None) -> AgentHolder:
    from ..agent import ensure_running

    be = get_backend()
    return AgentHolder(lambda: ensure_running(socket_path, backend=be), be)


def _qemu(path: str | None, as_json: bool) -> Any:
    from ..qemu.binary import resolve

    return resolve(path, progress=None if as_json else click.echo)


def _say(as_json: bool) -> Any:
    return (lambda _: None) if as_json else click.echo


@click.group("qemu")
def qemu() -> None:
    """A QEMU VM whose guest RAM and state survive a kexec of the host.

    launch -> update (save, preserve, kexec) -> resume after the kexec;
    abort runs an updated VM again on this kernel. See docs/vmm-guide.md and
    docs/runbook-vmm.md."""


@qemu.command("fetch")
@json_option
def fetch(as_json: bool) -> None:
    """Fetch the pinned QEMU 11.1 from Debian trixie-backports into the cache."""
    from ..qemu.binary import Feature, fetch as do_fetch

    q = do_fetch(progress=None if as_json else click.echo)
    version = ".".join(map(str, q.version()))
    missing = q.missing(set(Feature))
    if as_json:
        echo_json({"binary": str(q.binary), "version": version, "missing": missing})
        return
    click.echo(f"QEMU {version} at {q.binary}" + (f"; lacks: {'; '.join(missing)}" if missing else ""))


@qemu.command("launch")
@click.argument("name")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM (a multiple of 2 MiB).")
@click.option("--device", "devices", multiple=True, metavar="BDF",
              help="Hand this vfio-pci device to QEMU as pyiommufd's iommufd and VFIO cdev fds (repeatable).")
@qemu_option
@socket_option
@json_option
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED)
def launch(name: str, memory: str, devices: tuple[str, ...], qemu_path: str | None, socket_path: str | None,
           as_json: bool, qemu_args: tuple[str, ...]) -> None:
    """Start VM NAME: guest RAM in a memfd the agent keeps preserved in
    session NAME; QEMU_ARGS (after --) are the rest of QEMU's command line."""
    from ..qemu import liveupdate
    from ..qemu.machine import Machine, parse_memory

    machine = Machine(name, parse_memory(memory), tuple(qemu_args), devices)
    result = liveupdate.launch(machine, qemu=_qemu(qemu_path, as_json), holder=_holder(socket_path),
                               runtime_dir=runtime_dir(), progress=_say(as_json))
    if as_json:
        echo_json(result.as_dict())


@qemu.command("update")
@click.argument("name")
@click.option("--kernel", "kernel", metavar="FILE", default=None, help="kexec into this kernel afterwards.")
@click.option("--initrd", metavar="FILE", default=None, help="Its initrd.")
@click.option("--cmdline", default=None, help="Its command line (default: this kernel's).")
@click.option("--no-kexec", is_flag=True, help="Stop after the save: you kexec yourself (or abort).")
@qemu_option
@socket_option
@json_option
def update(name: str, kernel: str | None, initrd: str | None, cmdline: str | None, no_kexec: bool,
           qemu_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Save VM NAME into a memfd, preserve it with the RAM, stop QEMU, kexec."""
    from ..errors import UsageError
    from ..qemu import liveupdate

    if no_kexec == (kernel is not None):
        raise UsageError("say --kernel FILE (update, then kexec into it) or --no-kexec (update only)")
    if initrd is not None and kernel is None:
        raise UsageError("--initrd goes with --kernel")
    result = liveupdate.update(name, qemu=_qemu(qemu_path, as_json), holder=_holder(socket_path),
                               runtime_dir=runtime_dir(), kexec_kernel=kernel, kexec_initrd=initrd,
                               kexec_cmdline=cmdline, progress=_say(as_json))
    if as_json:
        echo_json(result.as_dict())
    else:
        for p in result.phases:
            click.echo(f"  {p.name:<16} {p.seconds:8.3f} s  ({p.owner.value})")
        click.echo(f"VM {name!r} is ready for the kexec: `pyiommufd qemu resume {name}` after it, "
                   f"or `pyiommufd qemu abort {name}` to run it here again")


def _render_resumed(result: Any, as_json: bool) -> None:
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(result.blackout.table())


@qemu.command("resume")
@click.argument("name")
@qemu_option
@socket_option
@json_option
def resume(name: str, qemu_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """After the kexec: retrieve VM NAME, start QEMU on it, continue the guest."""
    from ..qemu import liveupdate

    result = liveupdate.resume(name, qemu=_qemu(qemu_path, as_json), holder=_holder(socket_path),
                               runtime_dir=runtime_dir(), started=liveupdate.process_start_wall(),
                               progress=_say(as_json))
    _render_resumed(result, as_json)


@qemu.command("abort")
@click.argument("name")
@qemu_option
@socket_option
@json_option
def abort(name: str, qemu_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """No kexec after all: run updated VM NAME again on this kernel."""
    from ..qemu import liveupdate

    result = liveupdate.abort(name, qemu=_qemu(qemu_path, as_json), holder=_holder(socket_path),
                              runtime_dir=runtime_dir(), progress=_say(as_json))
    _render_resumed(result, as_json)


@qemu.command("stop")
@click.argument("name")
@socket_option
@json_option
def stop(name: str, socket_path: str | None, as_json: bool) -> None:
    """Quit VM NAME's QEMU and release its session (the VM ends)."""
    from ..qemu import liveupdate

    liveupdate.stop(name, holder=_holder(socket_path), runtime_dir=runtime_dir())
    if as_json:
        echo_json({"stopped": name})
    else:
        click.echo(f"VM {name!r} stopped; its session is released")


@qemu.command("status")
@json_option
def status(as_json: bool) -> None:
    """The VMs launched on this kernel, and whether their QEMU runs."""
    from ..qemu import liveupdate

    vms = liveupdate.list_vms(runtime_dir())
    if as_json:
        echo_json({"vms": [{"vm": v.machine.name, "state": v.state.value, "pid": v.pid,
                            "qemu_running": liveupdate.alive(v.pid), "memory": v.machine.memory,
                            "qmp_socket": v.qmp_socket, "log": v.log} for v in vms]})
        return
    if not vms:
        click.echo("no VM launched by pyiommufd on this kernel")
    for v in vms:
        running = f"pid {v.pid}" if liveupdate.alive(v.pid) else "not running"
        click.echo(f"{v.machine.name}: {v.state.value}, QEMU {running}, {v.machine.memory >> 20} MiB, "
                   f"QMP {v.qmp_socket}")
