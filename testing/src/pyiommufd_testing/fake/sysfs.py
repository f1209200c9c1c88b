"""The kernel's file systems ``/sys``, ``/proc`` and ``/dev``, for the fake's
host files (:mod:`.hostfiles`: ``exists``, ``read_text``, ``read_bytes``,
``write_text``, ``listdir``, ``readlink``, ``realpath``) and ``open`` of the
device nodes.

The tree is computed from the current boot on every call:

* ``/sys/bus/pci/devices/<bdf>`` (symlink into ``/sys/devices/pci0000:00``)
  with ``vendor``, ``device``, ``subsystem_*``, ``class``, ``revision``,
  ``config`` (binary), ``driver`` (symlink, only when bound),
  ``driver_override`` (rw; ``(null)`` when unset), ``iommu_group`` (symlink
  to ``/sys/kernel/iommu_groups/N``), ``iommu``, ``reset`` (w; only for a
  function with a reset method, ``FakePciDevice(reset_works=True)``,
  K:drivers/pci/pci-sysfs.c:1584-1593) and ``vfio-dev/vfioN`` while
  vfio-pci is bound;
* ``/sys/bus/pci/drivers/<drv>/{bind,unbind,new_id,remove_id,<bdf>}``,
  ``/sys/bus/pci/drivers_probe``, ``/sys/bus/pci/drivers_autoprobe``;
* ``/sys/kernel/iommu_groups/N/{devices,type,reserved_regions}``,
  ``/sys/class/iommu/dmar0`` (VT-d ``cap``/``ecap``), ``/sys/class/vfio-dev``,
  ``/sys/module/iommufd/parameters/allow_unsafe_interrupts`` (rw),
  ``/sys/kernel/kexec_loaded``;
* ``/proc/cmdline``, ``/proc/sys/kernel/{osrelease,kexec_load_disabled}``,
  ``/proc/self`` and ``/proc/<pid>`` with ``fd/`` (fake files show their
  fake path: ``/dev/iommu``, ``/dev/liveupdate``, ``/memfd:name (deleted)``,
  ``anon_inode:[luo_session] name``...);
* ``/dev/iommu``, ``/dev/liveupdate`` (only with live update enabled),
  ``/dev/vfio/devices/vfioN``, ``/dev/vfio/vfio`` (the legacy container,
  0666) and ``/dev/vfio/<group>`` while a device of the group is on
  vfio-pci (see :mod:`.vfio_group`).

Errors follow sysfs: a missing path ENOENT, reading a directory EISDIR,
writing a read-only attribute EACCES, any write when not root EACCES, and
the driver-core errnos of :mod:`.pci` for bind/unbind/drivers_probe.

Every other path, ``/boot`` included, is a file of the fake host's
temporary tree (:mod:`.hostfiles`), never of the real host.
"""
from __future__ import annotations

import errno as E
import os
import posixpath
from typing import TYPE_CHECKING, Callable, Protocol

from .uaccess import fail

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot
    from .pci import IommuGroup

Opener = Callable[[str, int], int]


class _FakePaths(Protocol):
    def fake_path_of(self, real: str) -> str: ...


class KernelView(Protocol):
    """What the file systems need of :class:`~.kernel.FakeKernel` (not
    imported: the kernel module imports this one)."""

    release: str

    @property
    def boot(self) -> Boot: ...
    @property
    def files(self) -> _FakePaths: ...
    def _open_iommu(self, path: str, flags: int) -> int: ...
    def _open_liveupdate(self, path: str, flags: int) -> int: ...
    def _open_vfio(self, path: str, flags: int) -> int: ...
    def _open_vfio_container(self, path: str, flags: int) -> int: ...
    def _open_vfio_group(self, path: str, flags: int) -> int: ...

KERNEL_MOUNTS = ("/sys", "/proc", "/dev")
PCI_ROOT = "/sys/devices/pci0000:00"


class Node:
    pass


class Dir(Node):
    def __init__(self, entries: Callable[[], dict[str, Node]]) -> None:
        self._entries = entries

    def entries(self) -> dict[str, Node]:
        return self._entries()


class Attr(Node):
    def __init__(self, read: Callable[[], bytes | str] | None = None,
                 write: Callable[[str], None] | None = None) -> None:
        self.read = read
        self.write = write

    def data(self) -> bytes:
        if self.read is None:
            fail(E.EACCES)
        value = self.read()
        return value.encode() if isinstance(value, str) else value


class DevNode(Node):
    """A character device node; ``open`` creates the fake file."""

    def __init__(self, opener: Opener, public: bool = False) -> None:
        self.opener = opener
        self.public = public        # mode 0666: no root needed to open it


class Link(Node):
    def __init__(self, target: str) -> None:
        self.target = target


def is_kernel_path(path: str) -> bool:
    """Whether ``path`` is in a file system the kernel model serves."""
    path = posixpath.normpath(path) if path else path
    return any(path == mount or path.startswith(mount + "/") for mount in KERNEL_MOUNTS)


class FakeFs:
    def __init__(self, kernel: KernelView) -> None:
        self.kernel = kernel

    @property
    def boot(self) -> "Boot":
        return self.kernel.boot

    # -- path resolution ------------------------------------------------------------
    def _root(self) -> Dir:
        return Dir(lambda: {"sys": self._sys(), "proc": self._proc(), "dev": self._dev()})

    def resolve(self, path: str, follow: bool = True, _depth: int = 0) -> tuple[str, Node]:
        """(canonical path, node); follows symlinks (the last one only if
        ``follow``). ENOENT for a missing component, ENOTDIR through a file."""
        if _depth > 40:
            fail(E.ELOOP)
        if not path.startswith("/"):
            fail(E.ENOENT)
        parts = [p for p in posixpath.normpath(path).split("/") if p]
        node: Node = self._root()
        canon: list[str] = []
        for i, part in enumerate(parts):
            if not isinstance(node, Dir):
                fail(E.ENOTDIR)
            child = node.entries().get(part)
            if child is None:
                fail(E.ENOENT)
            last = i == len(parts) - 1
            if isinstance(child, Link) and (follow or not last):
                base = "/" + "/".join(canon)
                target = child.target if child.target.startswith("/") else posixpath.join(base, child.target)
                if not is_kernel_path(target):
                    if last:            # /proc/self/fd/N of a real file
                        return "/" + "/".join(canon + [part]), child
                    fail(E.ENOENT)
                rest = "/".join(parts[i + 1:])
                full = posixpath.normpath(target + ("/" + rest if rest else ""))
                return self.resolve(full, follow, _depth + 1)
            canon.append(part)
            node = child
        return "/" + "/".join(canon), node

    # -- backend methods ------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
            return True
        except OSError:
            return False

    def is_dir(self, path: str) -> bool:
        try:
            return isinstance(self.resolve(path)[1], Dir)
        except OSError:
            return False

    def read_bytes(self, path: str) -> bytes:
        _, node = self.resolve(path)
        if isinstance(node, Dir):
            fail(E.EISDIR)
        if not isinstance(node, Attr):
            fail(E.EINVAL)
        return node.data()

    def write_text(self, path: str, text: str) -> None:
        _, node = self.resolve(path)
        if isinstance(node, Dir):
            fail(E.EISDIR)
        if self.boot.euid != 0:
            fail(E.EACCES)
        if not isinstance(node, Attr):
            fail(E.EINVAL)
        if node.write is None:
            fail(E.EACCES)
        node.write(text)

    def listdir(self, path: str) -> list[str]:
        _, node = self.resolve(path)
        if not isinstance(node, Dir):
            fail(E.ENOTDIR)
        return sorted(node.entries())

    def readlink(self, path: str) -> str:
        _, node = self.resolve(path, follow=False)
        if not isinstance(node, Link):
            fail(E.EINVAL)
        return node.target

    def realpath(self, path: str) -> str:
        path = posixpath.normpath(path)
        try:
            canon, _ = self.resolve(path)
            return canon
        except OSError:
            # like os.path.realpath: resolve what exists, keep the rest
            head, tail = posixpath.split(path)
            if head == path:
                return path
            return posixpath.join(self.realpath(head), tail)

    def node(self, path: str) -> Node:
        return self.resolve(path)[1]

    # -- /dev -------------------------------------------------------------------------------
    def _dev(self) -> Dir:
        k = self.kernel

        def entries() -> dict[str, Node]:
            out: dict[str, Node] = {"iommu": DevNode(k._open_iommu)}
            if self.boot.luo.enabled:
                out["liveupdate"] = DevNode(k._open_liveupdate)
            def vfio() -> dict[str, Node]:
                nodes: dict[str, Node] = {"vfio": DevNode(k._open_vfio_container, public=True)}
                for number, group in self.boot.vfio.groups.items():
                    if group.iommu_group is not None:
                        nodes[str(number)] = DevNode(k._open_vfio_group)
                nodes["devices"] = Dir(lambda: {
                    f"vfio{v.index}": DevNode(k._open_vfio) for v in self.boot.vfio.devices.values()})
                return nodes
            out["vfio"] = Dir(vfio)
            return out
        return Dir(entries)

    # -- /proc ---------------------------------------------------------------------------------
    def _proc(self) -> Dir:
        pid = str(os.getpid())
        boot = self.boot

        def set_kexec_disabled(text: str) -> None:
            value = text.strip()
            if value not in ("0", "1"):
                fail(E.EINVAL)
            if boot.kexec_load_disabled and value == "0":
                fail(E.EINVAL)
            boot.kexec_load_disabled = value == "1"

        return Dir(lambda: {
            "cmdline": Attr(lambda: boot.cmdline + "\n"),
            "self": Link(pid),
            pid: self._proc_pid(),
            "sys": Dir(lambda: {"kernel": Dir(lambda: {
                "osrelease": Attr(lambda: self.kernel.release + "\n"),
                "kexec_load_disabled": Attr(lambda: f"{int(boot.kexec_load_disabled)}\n",
                                            set_kexec_disabled),
            })}),
        })

    def _proc_pid(self) -> Dir:
        return Dir(lambda: {"fd": Dir(self._proc_fds), "cmdline": Attr(lambda: b"python\0")})

    def _proc_fds(self) -> dict[str, Node]:
        out: dict[str, Node] = {}
        table = self.boot.table
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            file = table.lookup(fd) if fd in table.by_fd else None
            if file is not None:
                out[name] = Link(file.path)
                continue
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            out[name] = Link(self.kernel.files.fake_path_of(target))
        return out

    # -- /sys -----------------------------------------------------------------------------------
    def _sys(self) -> Dir:
        return Dir(lambda: {
            "bus": Dir(lambda: {"pci": self._bus_pci()}),
            "devices": Dir(lambda: {
                "pci0000:00": Dir(lambda: {bdf: self._pci_dev(bdf) for bdf in self.boot.pci.devices}),
                "virtual": Dir(lambda: {"iommu": Dir(lambda: {"dmar0": self._dmar()})}),
            }),
            "kernel": Dir(lambda: {
                "iommu_groups": Dir(self._groups),
                "kexec_loaded": Attr(lambda: f"{int(self.boot.kexec_image is not None)}\n"),
                "kexec_crash_loaded": Attr(lambda: f"{int(self.boot.crash_image is not None)}\n"),
            }),
            "class": Dir(lambda: {
                "iommu": Dir(lambda: {"dmar0": Link("../../devices/virtual/iommu/dmar0")}),
                "vfio-dev": Dir(lambda: {
                    f"vfio{v.index}": Link(f"../../devices/pci0000:00/{v.hw.bdf}/vfio-dev/vfio{v.index}")
                    for v in self.boot.vfio.devices.values()}),
            }),
            "module": Dir(lambda: {"iommufd": Dir(lambda: {"parameters": Dir(lambda: {
                "allow_unsafe_interrupts": Attr(
                    lambda: "Y\n" if self.boot.allow_unsafe_interrupts else "N\n",
                    self._set_unsafe_interrupts)})})}),
        })

    def _set_unsafe_interrupts(self, text: str) -> None:
        value = text.strip()
        if value in ("1", "Y", "y", "on"):
            self.boot.allow_unsafe_interrupts = True
        elif value in ("0", "N", "n", "off"):
            self.boot.allow_unsafe_interrupts = False
        else:
            fail(E.EINVAL)

    def _bus_pci(self) -> Dir:
        pci = self.boot.pci
        return Dir(lambda: {
            "devices": Dir(lambda: {bdf: Link(f"../../../devices/pci0000:00/{bdf}") for bdf in pci.devices}),
            "drivers": Dir(lambda: {name: self._driver(name) for name in pci.drivers}),
            "drivers_probe": Attr(None, lambda text: pci.drivers_probe(text)),
            "drivers_autoprobe": Attr(lambda: "1\n"),
            "rescan": Attr(None, lambda text: None),
        })

    def _driver(self, name: str) -> Dir:
        pci = self.boot.pci

        def entries() -> dict[str, Node]:
            out: dict[str, Node] = {
                "bind": Attr(None, lambda text: pci.bind(name, text)),
                "unbind": Attr(None, lambda text: pci.unbind(name, text)),
                "new_id": Attr(None, lambda text: pci.new_id(name, text)),
                "remove_id": Attr(None, lambda text: pci.remove_id(name, text)),
            }
            for bdf, state in pci.devices.items():
                if state.driver == name:
                    out[bdf] = Link(f"../../../../devices/pci0000:00/{bdf}")
            return out
        return Dir(entries)

    def _pci_dev(self, bdf: str) -> Dir:
        pci = self.boot.pci
        state = pci.devices[bdf]
        hw = state.hw

        def set_override(text: str) -> None:
            if len(text) >= 4096:
                fail(E.EINVAL)
            value = text[:-1] if text.endswith("\n") else text
            state.driver_override = value or None

        def entries() -> dict[str, Node]:
            out: dict[str, Node] = {
                "vendor": Attr(lambda: f"0x{hw.vendor:04x}\n"),
                "device": Attr(lambda: f"0x{hw.device:04x}\n"),
                "subsystem_vendor": Attr(lambda: f"0x{hw.subsystem_vendor:04x}\n"),
                "subsystem_device": Attr(lambda: f"0x{hw.subsystem_device:04x}\n"),
                "class": Attr(lambda: f"0x{hw.class_code:06x}\n"),
                "revision": Attr(lambda: f"0x{hw.revision:02x}\n"),
                "config": Attr(lambda: bytes(hw.config[:64] if self.boot.euid else hw.config)),
                "driver_override": Attr(lambda: f"{state.driver_override or '(null)'}\n", set_override),
                "iommu_group": Link(f"../../../kernel/iommu_groups/{hw.iommu_group}"),
                "iommu": Link("../../virtual/iommu/dmar0"),
                "subsystem": Link("../../../bus/pci"),
                "numa_node": Attr(lambda: "-1\n"),
                "enable": Attr(lambda: "1\n" if state.driver else "0\n"),
            }
            if hw.reset_works:      # pci_dev_reset_attr_is_visible (K:drivers/pci/pci-sysfs.c:1584-1593)
                out["reset"] = Attr(None, lambda text: hw.reset())
            if state.driver is not None:
                out["driver"] = Link(f"../../../bus/pci/drivers/{state.driver}")
            vdev = self.boot.vfio.by_state(state)
            if vdev is not None:
                out["vfio-dev"] = Dir(lambda: {f"vfio{vdev.index}": Dir(lambda: {
                    "dev": Attr(lambda: f"239:{vdev.index}\n"),
                    "device": Link("../../../" + bdf),
                })})
            return out
        return Dir(entries)

    def _groups(self) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for number, group in self.boot.pci.groups.items():
            def entries(group: IommuGroup = group) -> dict[str, Node]:
                return {
                    "devices": Dir(lambda: {d.bdf: Link(f"../../../../devices/pci0000:00/{d.bdf}")
                                            for d in group.devices}),
                    "type": Attr(lambda: "DMA-FQ\n"),
                    "reserved_regions": Attr(lambda: "0x00000000fee00000 0x00000000feefffff msi\n"),
                }
            out[str(number)] = Dir(entries)
        return out

    def _dmar(self) -> Dir:
        caps = self.boot.iommu_caps
        return Dir(lambda: {
            "intel-iommu": Dir(lambda: {
                "cap": Attr(lambda: f"{caps.cap:x}\n"),
                "ecap": Attr(lambda: f"{caps.ecap:x}\n"),
                "version": Attr(lambda: "1:0\n"),
                "address": Attr(lambda: "fed90000\n"),
            }),
            "devices": Dir(lambda: {bdf: Link(f"../../../../pci0000:00/{bdf}")
                                    for bdf in self.boot.pci.devices}),
        })
