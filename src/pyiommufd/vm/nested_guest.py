"""The nested guest of the VMM live-update demonstration: our slim kernel with a
busybox initramfs whose ``/init`` keeps a known RAM pattern and counts.

It is the smallest real Linux that can show a VM was *not* rebooted: its boot
id, its tick counter and its uptime go on, and the pattern it wrote into its
root file system (the initramfs: guest RAM, so in pyiommufd's preserved memfd) keeps its sha256. Every
line it prints on its serial console starts with ``nested:``::

    nested: boot 3f0c... pattern-sha256 9a1b...
    nested: tick 1 uptime 4.21 boot 3f0c...
    nested: check 10 pattern-sha256 9a1b...   (every CHECK_EVERY ticks)

:func:`parse_console` turns a console log into :class:`ConsoleState`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .initramfs import CpioWriter, cached_archive, find_busybox

#: MiB of pattern the guest keeps in its tmpfs (guest RAM)
PATTERN_MIB = 8
#: ticks between two sha256 checks of the pattern
CHECK_EVERY = 10

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# a pattern only this boot has, in the initramfs' own file system: guest RAM, nowhere else
dd if=/dev/urandom of=/pattern/data bs=1M count=@PATTERN_MIB@ 2>/dev/null
boot=$(cat /proc/sys/kernel/random/boot_id)
sum=$(sha256sum /pattern/data | cut -d' ' -f1)
echo "nested: boot $boot pattern-sha256 $sum"
n=0
while true; do
    n=$((n + 1))
    read up idle < /proc/uptime
    echo "nested: tick $n uptime $up boot $boot"
    if [ $((n % @CHECK_EVERY@)) -eq 0 ]; then
        echo "nested: check $n pattern-sha256 $(sha256sum /pattern/data | cut -d' ' -f1)"
    fi
    sleep 1
done
"""

CMDLINE = "console=ttyS0 panic=-1 quiet no_timer_check"


def init_script() -> str:
    return (INIT_SCRIPT.replace("@PATTERN_MIB@", str(PATTERN_MIB))
            .replace("@CHECK_EVERY@", str(CHECK_EVERY)))


def archive_bytes() -> bytes:
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "pattern"):
        w.directory(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", find_busybox().read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", init_script().encode(), 0o755)
    return w.getvalue()


def build_initramfs() -> Path:
    """The nested guest's initramfs, written into the cache once."""
    return cached_archive(archive_bytes(), "nested-")


_BOOT = re.compile(r"nested: boot (\S+) pattern-sha256 ([0-9a-f]{64})")
_TICK = re.compile(r"nested: tick (\d+) uptime ([0-9.]+) boot (\S+)")
_CHECK = re.compile(r"nested: check (\d+) pattern-sha256 ([0-9a-f]{64})")


@dataclass(frozen=True)
class Tick:
    number: int
    uptime: float
    boot: str


@dataclass
class ConsoleState:
    """What a console log shows of the nested guest."""
    boots: list[tuple[str, str]] = field(default_factory=list)   # (boot id, pattern sha256)
    ticks: list[Tick] = field(default_factory=list)
    checks: list[tuple[int, str]] = field(default_factory=list)   # (tick, pattern sha256)

    @property
    def last_tick(self) -> Tick | None:
        return self.ticks[-1] if self.ticks else None


def parse_console(text: str) -> ConsoleState:
    state = ConsoleState()
    for line in text.splitlines():
        if m := _TICK.search(line):
            state.ticks.append(Tick(int(m[1]), float(m[2]), m[3]))
        elif m := _CHECK.search(line):
            state.checks.append((int(m[1]), m[2]))
        elif m := _BOOT.search(line):
            state.boots.append((m[1], m[2]))
    return state


__all__ = ["build_initramfs", "parse_console", "ConsoleState", "Tick", "CMDLINE", "CHECK_EVERY",
           "PATTERN_MIB"]
