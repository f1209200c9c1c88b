"""The guest's initramfs: busybox-static plus an ``/init`` that runs the agent.

The archive is an uncompressed cpio "newc" written by Python (fixed mtimes,
so identical inputs give identical bytes) and cached by content hash::

    <cache_root>/initramfs/<sha256(cpio)[:16]>.cpio

``/init`` (busybox sh) on every boot, the first and each one after a kexec:

1. mounts proc, sysfs, devtmpfs, devpts, /dev/shm;
2. mounts the 9p share ``results`` (read-write) at /results and the 9p share
   ``hostroot`` (the host's /, read-only) at /mnt/root;
3. reads ``/results/boot.env`` (written by the host runner: which python,
   PYTHONPATH, working directory);
4. prepares /mnt/root as a chroot: tmpfs on /tmp and /run, the guest's /dev
   (rbind), /proc, /sys, debugfs, and the results share at
   ``/run/pyiommufd-results``, and the 9p share ``pycache`` (writable, the
   host's ``<cache_root>/guest-pycache``) at ``/run/pyiommufd-pycache`` as
   ``PYTHONPYCACHEPREFIX``, so byte code and pytest's rewritten modules are
   compiled once, not on every boot;
5. runs ``python3 -S -m pyiommufd.vm.guest`` in the chroot (``-S``: no
   site-packages, a faster start under TCG) (the checkout has the
   same path as on the host), appends its exit status to
   ``/results/agent-exit``, syncs and powers off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from . import debian

RESULTS_IN_CHROOT = "/run/pyiommufd-results"
HOSTROOT_TAG = "hostroot"
RESULTS_TAG = "results"
PYCACHE_TAG = "pycache"
PYCACHE_IN_CHROOT = "/run/pyiommufd-pycache"
MSIZE = 262144

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

INIT_SCRIPT = r"""#!/bin/busybox sh
# pyiommufd VM init: mount, chroot into the host's / (read-only 9p), run the agent.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() { echo "pyiommufd-init: $*"; }
bye() {
    say "$*"
    [ -d /results/. ] && echo "init: $*" >> /results/init-error
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@,cache=none @RESULTS_TAG@ /results \
    || bye "cannot mount the results share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@,ro,cache=loose @HOSTROOT_TAG@ /mnt/root \
    || bye "cannot mount the host root share"
[ -f /results/boot.env ] || bye "no boot.env in the results share"
. /results/boot.env
R=/mnt/root
# Host dirs under /tmp or /run the job needs (e.g. a CI checkout): keep a view
# of each before the guest's own tmpfs hides them, and bind them back after.
n=0
for p in $PYIOMMUFD_BINDS; do
    mkdir -p /keep/$n && mount -o bind "$R$p" /keep/$n || bye "cannot keep $p"
    n=$((n + 1))
done
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || bye "cannot mount tmpfs on $R/tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || bye "cannot mount tmpfs on $R/run"
n=0
for p in $PYIOMMUFD_BINDS; do
    mkdir -p "$R$p" && mount -o bind /keep/$n "$R$p" || bye "cannot bind $p back"
    n=$((n + 1))
done
mount -o rbind /dev $R/dev || bye "cannot bind /dev"
mount -t proc proc $R/proc || bye "cannot mount proc"
mount -t sysfs sysfs $R/sys || bye "cannot mount sysfs"
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mkdir -p $R@RESULTS_IN_CHROOT@
mount -o bind /results $R@RESULTS_IN_CHROOT@ || bye "cannot bind the results share"
# Byte-code cache (incl. pytest's rewritten test modules) kept on the host
# across runs: the host root is read-only. Without it, compile every time.
PYCACHE_ENV=PYTHONDONTWRITEBYTECODE=1
mkdir -p /pycache $R@PYCACHE_IN_CHROOT@
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@,cache=none @PYCACHE_TAG@ /pycache 2>/dev/null \
        && mount -o bind /pycache $R@PYCACHE_IN_CHROOT@; then
    PYCACHE_ENV=PYTHONPYCACHEPREFIX=@PYCACHE_IN_CHROOT@
fi
say "Linux $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s; starting the agent"
chroot $R /usr/bin/env -i \
    PATH="$PYIOMMUFD_PATH" HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 TERM=dumb \
    PYTHONPATH="$PYIOMMUFD_PYTHONPATH" "$PYCACHE_ENV" PYTHONUNBUFFERED=1 \
    HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
    PYIOMMUFD_IN_GUEST=1 PYIOMMUFD_VM_RESULTS=@RESULTS_IN_CHROOT@ \
    PYIOMMUFD_CACHE="$PYIOMMUFD_CACHE" \
    "$PYIOMMUFD_PYTHON" -S -m pyiommufd.vm.guest
rc=$?
echo "$rc" >> /results/agent-exit
say "agent exited with status $rc; powering off"
sync
umount $R@RESULTS_IN_CHROOT@ $R@PYCACHE_IN_CHROOT@ 2>/dev/null
umount /results /pycache 2>/dev/null
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""


def init_script() -> str:
    return (INIT_SCRIPT.replace("@MSIZE@", str(MSIZE))
            .replace("@RESULTS_TAG@", RESULTS_TAG)
            .replace("@HOSTROOT_TAG@", HOSTROOT_TAG)
            .replace("@PYCACHE_TAG@", PYCACHE_TAG)
            .replace("@PYCACHE_IN_CHROOT@", PYCACHE_IN_CHROOT)
            .replace("@RESULTS_IN_CHROOT@", RESULTS_IN_CHROOT))


class InitramfsError(RuntimeError):
    pass


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and _is_static(p):
            return p
    which = shutil.which("busybox")
    if which and _is_static(Path(which)):
        return Path(which)
    raise InitramfsError("no static busybox found (install busybox-static)")


def _is_static(path: Path) -> bool:
    """An ELF without a PT_INTERP program header."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:   # 64-bit only
                return False
            phoff = int.from_bytes(head[0x20:0x28], "little")
            phentsize = int.from_bytes(head[0x36:0x38], "little")
            phnum = int.from_bytes(head[0x38:0x3A], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") == 3:  # PT_INTERP
            return False
    return True


# -- cpio newc --------------------------------------------------------------------

def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Minimal SVR4 "newc" writer (no checksums), deterministic."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        raw = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(raw), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(header + raw + b"\0" * _pad4(len(header) + len(raw)))
        if data:
            self._parts.append(data + b"\0" * _pad4(len(data)))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0, nlink=1)
        body = b"".join(self._parts) + b"".join(trailer._parts)
        return body + b"\0" * _pad4(len(body))   # kernel is happy with any 4-aligned end


def archive_bytes(busybox: Path | None = None) -> bytes:
    busybox = busybox or find_busybox()
    w = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "run", "mnt", "mnt/root", "results", "pycache", "etc"):
        w.directory(d, 0o1777 if d == "tmp" else 0o755)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", init_script().encode(), 0o755)
    return w.getvalue()


def build_initramfs(*, busybox: Path | None = None) -> Path:
    """Write the initramfs into the cache (if not there yet) and return its path."""
    return cached_archive(archive_bytes(busybox))


def cached_archive(data: bytes, prefix: str = "") -> Path:
    """``data`` as ``<cache>/initramfs/<prefix><sha256[:16]>.cpio``, written once."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    root = debian.cache_root() / "initramfs"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{prefix}{digest}.cpio"
    if not path.is_file() or path.stat().st_size != len(data):
        tmp = root / f".{prefix}{digest}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


__all__ = ["build_initramfs", "cached_archive", "archive_bytes", "init_script", "CpioWriter", "find_busybox",
           "InitramfsError", "RESULTS_IN_CHROOT", "HOSTROOT_TAG", "RESULTS_TAG"]
