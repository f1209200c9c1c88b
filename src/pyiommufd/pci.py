"""PCI devices through sysfs: BDF parsing, driver binding, cdev lookup.

Everything here is sysfs file access through the backend's host files
(:class:`pyiommufd.hostfs.HostFiles`), so the fake kernel can model
``/sys/bus/pci``.

* :func:`normalize_bdf` turns ``00:03.0`` into ``0000:00:03.0`` and rejects
  anything else with :class:`~pyiommufd.errors.UsageError` before any sysfs
  access. Every path built here goes through it, so no caller-controlled text
  ever reaches a sysfs write unvalidated.
* :class:`PciDevice` reads ``vendor``/``device``/``driver``/``iommu_group`` and
  the VFIO cdev (``vfio-dev/vfioN``), binds the device to vfio-pci with
  ``driver_override`` and restores the original driver afterwards.
* :func:`list_devices` lists every PCI function with its group, driver and cdev.

Sysfs write failures raise typed errors with interface ``"sysfs"``
(e.g. :class:`~pyiommufd.errors.SysfsError` + :class:`~pyiommufd.errors.Busy`
when, after a live update, a non-vfio driver is refused a preserved device:
the series' cover letter: what Phase 1 restores after the kexec).
"""
from __future__ import annotations

import errno as E
import posixpath
import re
from typing import Any, Callable, TypeVar

from . import errors
from ._record import asdict, record
from .backend import Backend, get_backend

_T = TypeVar("_T")

SYSFS_PCI_DEVICES = "/sys/bus/pci/devices"
SYSFS_PCI_DRIVERS = "/sys/bus/pci/drivers"
SYSFS_PCI_DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
VFIO_CDEV_DIR = "/dev/vfio/devices"
VFIO_PCI_DRIVER = "vfio-pci"

# domain (4 hex digits; up to 8 for VMD-style domains >= 0x10000), bus, device (0..1f), function (0..7)
_BDF_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])")


def normalize_bdf(bdf: str) -> str:
    """``"00:03.0"`` → ``"0000:00:03.0"``; lower-case; validated.

    Raises :class:`~pyiommufd.errors.UsageError` for anything that is not a
    PCI address (including path separators, whitespace and newlines)."""
    if not isinstance(bdf, str):
        raise errors.UsageError(f"a PCI address must be a string like 0000:00:03.0, not {type(bdf).__name__}")
    m = _BDF_RE.fullmatch(bdf)  # fullmatch: '$' would accept a trailing newline
    if m is None:
        raise errors.UsageError(
            f"{bdf!r} is not a PCI address: expected [DDDD:]BB:DD.F, e.g. 0000:00:03.0 or 00:03.0")
    dev = int(m["dev"], 16)
    if dev > 0x1F:
        raise errors.UsageError(f"{bdf!r}: PCI device number 0x{dev:02x} is above 0x1f")
    domain = int(m["domain"], 16) if m["domain"] else 0
    return f"{domain:04x}:{int(m['bus'], 16):02x}:{dev:02x}.{m['fn']}"


def is_bdf(text: str) -> bool:
    """True if ``text`` parses as a PCI address."""
    try:
        normalize_bdf(text)
    except errors.UsageError:
        return False
    return True


def bdf_from_parts(segment: int, bus: int, devfn: int) -> str:
    """The BDF of ``struct vfio_pci_dependent_device``-style fields."""
    return f"{segment:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def _sysfs_error(op: str, exc: OSError, path: str) -> errors.KernelError:
    return errors.make_error(op, "sysfs", exc.errno or E.EIO, detail=path)


@record(frozen=True)
class PciDeviceInfo:
    """A snapshot of one PCI function as sysfs shows it."""

    bdf: str
    vendor: int | None
    device: int | None
    class_code: int | None
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    vfio_cdev: str | None

    def as_dict(self) -> dict[str, Any]:
        as_dict: dict[str, Any] = asdict(self)
        return as_dict


class PciDevice:
    """One PCI function, by BDF. Nothing is read until asked.

    ``bind_vfio()`` remembers the driver (and ``driver_override``) it found, so
    ``restore()`` can put the device back.
    """

    def __init__(self, bdf: str, backend: Backend | None = None):
        self.bdf = normalize_bdf(bdf)
        self.backend = get_backend(backend)
        self.path = f"{SYSFS_PCI_DEVICES}/{self.bdf}"
        self.original_driver: str | None = None
        self.original_override: str | None = None
        self._bound_by_us = False

    def __repr__(self) -> str:
        return f"<PciDevice {self.bdf}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PciDevice) and other.bdf == self.bdf

    def __hash__(self) -> int:
        return hash(self.bdf)

    @staticmethod
    def list_devices(backend: Backend | None = None) -> list["PciDeviceInfo"]:
        """Same as the module's :func:`list_devices`."""
        return list_devices(backend)

    # -- reading --------------------------------------------------------------
    def _attr(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _read(self, name: str) -> str:
        path = self._attr(name)
        try:
            return self.backend.files.read_text(path).strip()
        except OSError as exc:
            raise _sysfs_error(f"read({path})", exc, path) from None

    def _read_hex(self, name: str) -> int:
        text = self._read(name)
        try:
            return int(text, 16)
        except ValueError:
            raise errors.make_error(f"read({self._attr(name)})", "sysfs", E.EIO,
                                    detail=f"unexpected content {text!r}") from None

    @property
    def exists(self) -> bool:
        return self.backend.files.exists(self.path)

    def require(self) -> "PciDevice":
        """Raise :class:`~pyiommufd.errors.NotFound` (sysfs) if the device is absent."""
        if not self.exists:
            raise errors.make_error(f"stat({self.path})", "sysfs", E.ENOENT,
                                    detail=f"no PCI device {self.bdf}")
        return self

    @property
    def vendor(self) -> int:
        return self._read_hex("vendor")

    @property
    def device(self) -> int:
        return self._read_hex("device")

    @property
    def class_code(self) -> int:
        return self._read_hex("class")

    @property
    def driver(self) -> str | None:
        """The bound driver's name, or None when unbound."""
        link = self._attr("driver")
        if not self.backend.files.exists(link):
            return None
        try:
            return posixpath.basename(self.backend.files.readlink(link).rstrip("/"))
        except OSError as exc:
            if exc.errno == E.ENOENT:
                return None
            raise _sysfs_error(f"readlink({link})", exc, link) from None

    @property
    def driver_override(self) -> str | None:
        """``driver_override`` (None when unset, i.e. sysfs shows ``(null)``)."""
        if not self.backend.files.exists(self._attr("driver_override")):
            return None
        text = self._read("driver_override")
        return None if text in ("", "(null)") else text

    @property
    def iommu_group(self) -> int | None:
        """The IOMMU group number, or None when the device has no group."""
        link = self._attr("iommu_group")
        if not self.backend.files.exists(link):
            return None
        try:
            return int(posixpath.basename(self.backend.files.readlink(link).rstrip("/")))
        except OSError as exc:
            raise _sysfs_error(f"readlink({link})", exc, link) from None
        except ValueError:
            return None

    @property
    def vfio_cdev(self) -> str | None:
        """``/dev/vfio/devices/vfioN`` when vfio-pci exposes a cdev, else None."""
        name = self.vfio_cdev_name
        return f"{VFIO_CDEV_DIR}/{name}" if name else None

    @property
    def vfio_cdev_name(self) -> str | None:
        directory = self._attr("vfio-dev")
        if not self.backend.files.exists(directory):
            return None
        try:
            names = [n for n in self.backend.files.listdir(directory) if re.fullmatch(r"vfio\d+", n)]
        except OSError as exc:
            if exc.errno == E.ENOENT:
                return None
            raise _sysfs_error(f"listdir({directory})", exc, directory) from None
        return sorted(names, key=lambda n: int(n[4:]))[0] if names else None

    def info(self) -> PciDeviceInfo:
        """A snapshot of everything above (missing attributes become None)."""
        def opt(fn: Callable[[], _T]) -> _T | None:
            try:
                return fn()
            except errors.KernelError:
                return None
        return PciDeviceInfo(
            bdf=self.bdf,
            vendor=opt(lambda: self.vendor),
            device=opt(lambda: self.device),
            class_code=opt(lambda: self.class_code),
            driver=opt(lambda: self.driver),
            driver_override=opt(lambda: self.driver_override),
            iommu_group=opt(lambda: self.iommu_group),
            vfio_cdev=opt(lambda: self.vfio_cdev),
        )

    # -- writing --------------------------------------------------------------
    def _write(self, path: str, text: str) -> None:
        try:
            self.backend.files.write_text(path, text)
        except OSError as exc:
            raise _sysfs_error(f"write({path})", exc, path) from None

    def set_driver_override(self, driver: str | None) -> None:
        """Write ``driver_override``; ``None`` clears it."""
        if driver is not None and (not driver or not re.fullmatch(r"[A-Za-z0-9_.\-]+", driver)):
            raise errors.UsageError(f"{driver!r} is not a driver name")
        self._write(self._attr("driver_override"), "\n" if driver is None else driver)

    def unbind(self) -> str | None:
        """Unbind the current driver (no-op when unbound). Returns the driver that was bound."""
        driver = self.driver
        if driver is None:
            return None
        self._write(f"{SYSFS_PCI_DRIVERS}/{driver}/unbind", self.bdf)
        return driver

    def bind(self, driver: str) -> None:
        """Bind ``driver`` explicitly (``/sys/bus/pci/drivers/<driver>/bind``)."""
        if not driver or not re.fullmatch(r"[A-Za-z0-9_.\-]+", driver):
            raise errors.UsageError(f"{driver!r} is not a driver name")
        self._write(f"{SYSFS_PCI_DRIVERS}/{driver}/bind", self.bdf)

    def probe(self) -> None:
        """Ask the PCI core to find a driver (``/sys/bus/pci/drivers_probe``)."""
        self._write(SYSFS_PCI_DRIVERS_PROBE, self.bdf)

    def bind_vfio(self) -> "VfioBinding":
        """Hand the device to vfio-pci: ``driver_override=vfio-pci``, unbind the
        current driver, ``drivers_probe``. Remembers the original driver and
        override for :meth:`restore`. A device already on vfio-pci is left as is.

        Raises a sysfs :class:`~pyiommufd.errors.NoDevice` error if the device
        did not end up on vfio-pci (vfio-pci not loaded?)."""
        self.require()
        current = self.driver
        override = self.driver_override
        if not self._bound_by_us:
            self.original_driver = current
            self.original_override = override
        if current == VFIO_PCI_DRIVER:
            return VfioBinding(self, self.original_driver, self.original_override)
        self._bound_by_us = True
        if override != VFIO_PCI_DRIVER:
            self.set_driver_override(VFIO_PCI_DRIVER)
        if current is not None:
            self.unbind()
        self.probe()
        now = self.driver
        if now != VFIO_PCI_DRIVER:
            raise errors.make_error(
                f"bind_vfio({self.bdf})", "sysfs", E.ENODEV,
                detail=f"the device is on {now or 'no driver'} after drivers_probe, not vfio-pci "
                       "(is the vfio-pci module loaded? modprobe vfio-pci)")
        return VfioBinding(self, self.original_driver, self.original_override)

    def restore(self) -> str | None:
        """Undo :meth:`bind_vfio`: unbind vfio-pci, restore ``driver_override``
        and re-probe, so the original driver takes the device back. If probing
        does not bring it back, bind the original driver explicitly (after a live
        update this fails with a sysfs :class:`~pyiommufd.errors.Busy`: only
        vfio-pci may own a preserved device, the series' cover letter: what Phase 1 restores after the kexec).

        Returns the driver the device is bound to afterwards. Without a prior
        ``bind_vfio()`` on this object it only clears a vfio-pci override and
        re-probes."""
        self.require()
        original = self.original_driver if self._bound_by_us else None
        if self.driver == VFIO_PCI_DRIVER:
            self.unbind()
        override = self.driver_override
        if self._bound_by_us:
            if override != self.original_override:
                self.set_driver_override(self.original_override)
        elif override == VFIO_PCI_DRIVER:
            self.set_driver_override(None)
        if not self._bound_by_us or original is not None:
            self.probe()
        now = self.driver
        if original is not None and now != original:
            if now is not None:
                self.unbind()
            self.bind(original)
            now = self.driver
        self._bound_by_us = False
        return now


@record
class VfioBinding:
    """What :meth:`PciDevice.bind_vfio` changed; a context manager that restores."""

    device: PciDevice
    original_driver: str | None
    original_override: str | None

    @property
    def bdf(self) -> str:
        return self.device.bdf

    @property
    def vfio_cdev(self) -> str | None:
        return self.device.vfio_cdev

    def restore(self) -> str | None:
        return self.device.restore()

    def __enter__(self) -> "VfioBinding":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def list_devices(backend: Backend | None = None) -> list[PciDeviceInfo]:
    """Every PCI function in ``/sys/bus/pci/devices`` with vendor, device,
    driver, IOMMU group and VFIO cdev, sorted by BDF."""
    be = get_backend(backend)
    try:
        names = be.files.listdir(SYSFS_PCI_DEVICES)
    except OSError as exc:
        raise _sysfs_error(f"listdir({SYSFS_PCI_DEVICES})", exc, SYSFS_PCI_DEVICES) from None
    out = []
    for name in sorted(names):
        if not is_bdf(name):
            continue
        out.append(PciDevice(name, be).info())
    return out


def find_by_cdev(cdev: str, backend: Backend | None = None) -> PciDevice | None:
    """The PCI device whose VFIO cdev is ``cdev`` (a path or ``vfioN``), or None."""
    name = posixpath.basename(cdev)
    for info in list_devices(backend):
        if info.vfio_cdev and posixpath.basename(info.vfio_cdev) == name:
            return PciDevice(info.bdf, backend)
    return None


__all__ = [
    "normalize_bdf", "is_bdf", "bdf_from_parts", "PciDevice", "PciDeviceInfo", "VfioBinding",
    "list_devices", "find_by_cdev", "SYSFS_PCI_DEVICES", "VFIO_PCI_DRIVER",
]
