"""``pyiommufd devices``, ``bind`` and ``unbind``: PCI devices and vfio-pci.

``bind`` moves a device to vfio-pci through ``driver_override`` (as the
kernel's VFIO selftests' setup.sh does) and remembers the driver it took the
device from in ``$PYIOMMUFD_STATE_DIR/bind-state.json`` (default
``/run/pyiommufd``); ``unbind`` gives the device back to that driver. After a
live update a preserved device refuses every driver but vfio-pci (EBUSY,
the series' cover letter: what Phase 1 restores after the kexec), so ``unbind`` then fails with exit code 5.
"""
from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import click

from .. import exitcodes
from .output import (CommandError, echo_json, echo_table, hex4, json_option, require_root, warn,
                     write_durably)

if TYPE_CHECKING:
    from ..backend import Backend
    from ..pci import PciDevice

DEFAULT_STATE_DIR = "/run/pyiommufd"
STATE_FILE = "bind-state.json"


def state_path() -> str:
    return os.path.join(os.environ.get("PYIOMMUFD_STATE_DIR") or DEFAULT_STATE_DIR, STATE_FILE)


def load_state() -> dict[str, Any]:
    path = state_path()
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the bind state {path}: {exc}", exitcodes.BAD_INPUT) from None
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict):
        raise CommandError(f"{path} is not a pyiommufd bind state file", exitcodes.BAD_INPUT)
    devices: dict[str, Any] = data.get("devices", {})
    return devices


def save_state(devices: dict[str, Any]) -> None:
    path = state_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        write_durably(path, json.dumps({"version": 1, "devices": devices}, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise CommandError(f"cannot write the bind state {path}: {exc.strerror}",
                           exitcodes.for_errno(exc.errno)) from None


def _device(bdf: str, backend: Backend) -> PciDevice:
    """Validate ``bdf`` (exit 2, before any sysfs access) and require the device (exit 2)."""
    from .. import pci

    norm = pci.normalize_bdf(bdf)  # UsageError -> exit 2
    dev = pci.PciDevice(norm, backend)
    if not dev.exists:
        raise CommandError(f"no PCI device {norm} (no {dev.path}); `pyiommufd devices` lists them",
                           exitcodes.BAD_INPUT)
    return dev


@click.command("devices")
@json_option
def devices(as_json: bool) -> None:
    """List PCI devices with vendor:device, driver, IOMMU group and VFIO cdev."""
    from .. import pci
    from ..backend import get_backend

    infos = pci.list_devices(get_backend())
    if as_json:
        echo_json([{
            "bdf": i.bdf,
            "vendor": hex4(i.vendor),
            "device": hex4(i.device),
            "class": None if i.class_code is None else f"{i.class_code:06x}",
            "driver": i.driver,
            "driver_override": i.driver_override,
            "iommu_group": i.iommu_group,
            "vfio_cdev": i.vfio_cdev,
        } for i in infos])
        return
    if not infos:
        click.echo("no PCI devices")
        return
    echo_table(([i.bdf, f"{hex4(i.vendor) or '????'}:{hex4(i.device) or '????'}", i.driver,
                 i.iommu_group, i.vfio_cdev] for i in infos),
               ["BDF", "VENDOR:DEVICE", "DRIVER", "IOMMU_GROUP", "VFIO_CDEV"])


@click.command("bind")
@click.argument("bdf")
@json_option
def bind(bdf: str, as_json: bool) -> None:
    """Bind the PCI device BDF to vfio-pci (driver_override) and print its VFIO cdev."""
    from .. import pci
    from ..backend import get_backend

    be = get_backend()
    dev = _device(bdf, be)
    require_root(be, "bind")
    state = load_state()
    before = dev.driver
    override = dev.driver_override
    if dev.iommu_group is None:
        warn(f"{dev.bdf} has no IOMMU group: is the IOMMU on (intel_iommu=on)?")
    dev.bind_vfio()
    if before != pci.VFIO_PCI_DRIVER:  # a record left from an earlier bind is stale now
        state[dev.bdf] = {"driver": before, "driver_override": override,
                          "bound_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        save_state(state)
    cdev = dev.vfio_cdev
    if cdev is None:
        warn(f"{dev.bdf} is on vfio-pci but has no VFIO cdev: the kernel needs CONFIG_VFIO_DEVICE_CDEV")
    if as_json:
        echo_json({"bdf": dev.bdf, "driver_before": before, "driver": dev.driver, "vfio_cdev": cdev})
        return
    if cdev is None:
        click.echo(f"{dev.bdf}: {before or 'no driver'} -> vfio-pci, no cdev")
        return
    if before == pci.VFIO_PCI_DRIVER:
        click.echo(f"{dev.bdf}: already on vfio-pci", err=True)
    else:
        click.echo(f"{dev.bdf}: {before or 'no driver'} -> vfio-pci", err=True)
    click.echo(cdev)


def _unbound(dev: PciDevice, before: str | None, now: str | None, as_json: bool, *, untouched: bool = False) -> None:
    if as_json:
        echo_json({"bdf": dev.bdf, "driver_before": before, "driver": now, "changed": not untouched})
    elif untouched:
        click.echo(f"{dev.bdf}: on {before or 'no driver'}, not vfio-pci; nothing to do")
    else:
        click.echo(f"{dev.bdf}: {before or 'no driver'} -> {now or 'no driver'}")


@click.command("unbind")
@click.argument("bdf")
@json_option
def unbind(bdf: str, as_json: bool) -> None:
    """Give the PCI device BDF back to the driver it had before `pyiommufd bind`."""
    from .. import pci
    from ..backend import get_backend

    be = get_backend()
    dev = _device(bdf, be)
    require_root(be, "unbind")
    state = load_state()
    record = state.get(dev.bdf)
    current = dev.driver
    if record is None:
        # Not bound by us: only undo a vfio-pci override and let the PCI core pick a driver.
        if current != pci.VFIO_PCI_DRIVER and dev.driver_override != pci.VFIO_PCI_DRIVER:
            _unbound(dev, current, current, as_json, untouched=True)
            return
        _unbound(dev, current, dev.restore(), as_json)
        return
    original = record.get("driver")
    if current == pci.VFIO_PCI_DRIVER:
        dev.unbind()
    if dev.driver_override != record.get("driver_override"):
        dev.set_driver_override(record.get("driver_override"))
    if original is not None:
        dev.probe()
        now = dev.driver
        if now != original:
            if now is not None:
                dev.unbind()
            dev.bind(original)  # a preserved device refuses: SysfsBusy, exit 5
    now = dev.driver
    del state[dev.bdf]
    save_state(state)
    _unbound(dev, current, now, as_json)
