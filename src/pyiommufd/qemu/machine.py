"""A VM as pyiommufd launches it: :class:`Machine`, and QEMU's command line.

The user gives the VM's name, its RAM size and the rest of QEMU's arguments
(machine type, CPUs, kernel, devices...). pyiommufd adds what the live update
owns and refuses user arguments that would fight it:

* the guest RAM: ``-m`` and a ``memory-backend-file`` on ``/proc/self/fd/N``,
  the memfd pyiommufd made, with ``share=on`` (a private mapping would leave the
  guest's writes in anonymous copy-on-write pages, outside the preserved memfd),
  made the machine's RAM with ``-machine memory-backend=``;
* a QMP socket of pyiommufd's own;
* ``-incoming defer`` when the VM resumes from its saved state;
* for assigned devices, ``-object iommufd,fd=`` and ``-device vfio-pci,fd=`` on
  the iommufd and VFIO cdev fds pyiommufd opened.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import UsageError
from ..luo import check_session_name
from ..pci import normalize_bdf

RAM_ID = "pyiommufd-ram"
IOMMUFD_ID = "pyiommufd-iommufd"
MIB = 1 << 20
#: the guest RAM's granule: QEMU's RAM blocks and the huge-page-free memfd are page lists,
#: and a MiB multiple keeps ``-m`` exact
RAM_ALIGN = 2 * MIB
RECORD_VERSION = 1

#: QEMU options pyiommufd sets itself, and why the user's would break the live update
OWNED_OPTIONS = {
    "m": "pyiommufd sizes the guest RAM (--memory)",
    "mem-path": "the guest RAM is pyiommufd's memfd",
    "mem-prealloc": "the guest RAM is pyiommufd's memfd",
    "incoming": "pyiommufd resumes the VM itself (pyiommufd qemu resume)",
    "daemonize": "pyiommufd keeps QEMU's pid and QMP socket itself",
    "readconfig": "a config file can set the RAM and the monitor behind pyiommufd's back",
    "preconfig": "pyiommufd drives the machine from its own QMP socket",
}

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_SCALE = {"": MIB, "k": 1 << 10, "m": MIB, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str) -> int:
    """``256M``, ``1G``, ``512`` (MiB, as QEMU's ``-m``) -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"--memory {text!r}: expected a size such as 256M or 1G")
    size = int(m[1]) * _SCALE[m[2].lower()]
    if size <= 0 or size % RAM_ALIGN:
        raise UsageError(f"--memory {text!r}: the guest RAM must be a positive multiple of 2 MiB")
    if size > 1 << 46:
        raise UsageError(f"--memory {text!r}: more than 64 TiB of guest RAM")
    return size


def _option_name(arg: str) -> str | None:
    return arg.lstrip("-") if arg.startswith("-") and len(arg) > 1 else None


def check_user_args(args: Sequence[str]) -> None:
    """Refuse the QEMU options pyiommufd owns, each with the reason."""
    for i, arg in enumerate(args):
        name = _option_name(arg)
        if name is None:
            continue
        if name in OWNED_OPTIONS:
            raise UsageError(f"QEMU option {arg}: {OWNED_OPTIONS[name]}; leave it out")
        value = args[i + 1] if i + 1 < len(args) else ""
        if name in ("machine", "M") and "memory-backend=" in value:
            raise UsageError(f"QEMU option {arg} {value}: pyiommufd sets the machine's "
                             "memory-backend to its own memfd; leave memory-backend= out")
        if name == "object" and re.search(rf"(^|,)id={RAM_ID}(,|$)", value):
            raise UsageError(f"QEMU option {arg} {value}: the id {RAM_ID} is pyiommufd's")


@dataclass(frozen=True)
class Machine:
    """What a VM is, as the live update carries it across the kexec."""
    name: str
    memory: int                       # bytes
    args: tuple[str, ...] = ()        # the user's QEMU arguments
    devices: tuple[str, ...] = ()     # BDFs handed to QEMU as VFIO cdev fds

    def __post_init__(self) -> None:
        check_session_name(self.name)
        if self.memory <= 0 or self.memory % RAM_ALIGN:
            raise UsageError(f"guest RAM of {self.memory} bytes: must be a positive multiple of 2 MiB")
        check_user_args(self.args)
        object.__setattr__(self, "devices", tuple(normalize_bdf(b) for b in self.devices))

    def command(self, *, ram_fd: int, qmp_socket: str, incoming: bool = False,
                iommufd_fd: int | None = None, device_fds: Sequence[int] = ()) -> list[str]:
        """QEMU's arguments (without the binary) for a QEMU that inherits
        ``ram_fd`` (and the device fds) at the same numbers."""
        if len(device_fds) != len(self.devices) or (self.devices and iommufd_fd is None):
            raise UsageError(f"{len(self.devices)} device(s) need an iommufd fd and as many cdev fds")
        out = ["-m", f"{self.memory // MIB}M",
               "-object", f"memory-backend-file,id={RAM_ID},size={self.memory},"
                          f"mem-path=/proc/self/fd/{ram_fd},share=on",
               "-machine", f"memory-backend={RAM_ID}",
               "-qmp", f"unix:{qmp_socket},server=on,wait=off"]
        if self.devices:
            out += ["-object", f"iommufd,id={IOMMUFD_ID},fd={iommufd_fd}"]
            for n, fd in enumerate(device_fds):
                out += ["-device", f"vfio-pci,id=pyiommufd-dev{n},iommufd={IOMMUFD_ID},fd={fd}"]
        if incoming:
            out += ["-incoming", "defer"]
        return out + list(self.args)

    def as_dict(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "name": self.name, "memory": self.memory,
                "args": list(self.args), "devices": list(self.devices)}

    @classmethod
    def from_dict(cls, data: Any) -> "Machine":
        if not isinstance(data, dict):
            raise UsageError("VM record: not a JSON object")
        version = data.get("version")
        if version != RECORD_VERSION:
            raise UsageError(f"VM record version {version!r}: this pyiommufd reads version {RECORD_VERSION}")
        name, memory, args, devices = (data.get(k) for k in ("name", "memory", "args", "devices"))
        if not isinstance(name, str):
            raise UsageError("VM record: name is not a string")
        if isinstance(memory, bool) or not isinstance(memory, int):
            raise UsageError("VM record: memory is not an integer")
        for what, value in (("args", args), ("devices", devices)):
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise UsageError(f"VM record: {what} is not a list of strings")
        assert isinstance(args, list) and isinstance(devices, list)
        return cls(name, memory, tuple(args), tuple(devices))


__all__ = ["Machine", "parse_memory", "check_user_args", "OWNED_OPTIONS", "RAM_ID", "IOMMUFD_ID"]
