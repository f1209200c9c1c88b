"""Which QEMU runs the VM, and whether it can do what a command asks.

A VMM live update needs a QEMU with the ``cpr-reboot`` migration mode and
``x-ignore-shared`` (so the guest RAM stays in its memfd), a shareable
``memory-backend-file``, and for the device hand-off the ``iommufd`` object and
vfio-pci's ``iommufd`` property. Debian bookworm's QEMU 7.2 has none of them.

:func:`resolve` picks, in this order: the path the caller names (``--qemu``),
``$PYIOMMUFD_QEMU``, or the pinned QEMU from Debian trixie-backports that
:func:`fetch` unpacks into pyiommufd's cache (never through the host's apt
sources: trixie's libc would replace the host's). The cached QEMU runs through
its own root's dynamic loader, so it needs nothing of the host's libraries.
"""
from __future__ import annotations

import enum
import fcntl
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .errors import QemuError
from ..vm import debian

PACKAGE = "qemu-system-x86"
PACKAGE_VERSION = "1:11.1.3+ds-2~bpo13+1"
#: the first QEMU with the cpr-reboot migration mode and the iommufd backend
MINIMUM = (9, 0)
ENV_QEMU = "PYIOMMUFD_QEMU"
_ARCH_LIBS = "usr/lib/x86_64-linux-gnu"


class Feature(enum.Enum):
    """What a command needs of QEMU, each checked before it is used."""
    SHARED_RAM = "memory-backend-file"
    CPR_REBOOT = "cpr-reboot"
    IOMMUFD = "iommufd"
    VFIO_IOMMUFD = "vfio-pci,iommufd"
    SCALABLE_MODE = "intel-iommu,scalable-mode"


@dataclass(frozen=True)
class Qemu:
    """One QEMU binary and how to start it."""
    binary: Path
    prefix: tuple[str, ...]          # what goes before the binary's own arguments
    firmware: tuple[str, ...]        # -L directories
    env: tuple[tuple[str, str], ...]
    origin: str                      # "--qemu", "$PYIOMMUFD_QEMU" or "cache"

    def command(self, args: list[str]) -> list[str]:
        """The argv that runs this QEMU with ``args``."""
        out = list(self.prefix)
        for d in self.firmware:
            out += ["-L", d]
        return out + list(args)

    def environment(self) -> dict[str, str]:
        return dict(os.environ, **dict(self.env))

    def _probe(self, *args: str) -> str:
        """What ``qemu ARGS`` prints, remembered on disk per binary: a resume
        after the kexec must not start QEMU twice inside the blackout only to
        ask what launch already asked (a QEMU start is seconds under TCG)."""
        key = " ".join(args)
        answers = _load_answers(self.binary)
        if key in answers:
            return answers[key]
        out = self._run(*args)
        answers[key] = out
        _save_answers(self.binary, answers)
        return out

    def _run(self, *args: str) -> str:
        try:
            proc = subprocess.run(self.command(list(args)), capture_output=True, text=True,
                                  timeout=60, env=self.environment(), stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise QemuError(f"cannot run {self.binary}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise QemuError(f"{self.binary} {' '.join(args)} did not answer in 60 s") from None
        if proc.returncode:
            raise QemuError(f"{self.binary} {' '.join(args)} failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def version(self) -> tuple[int, int, int]:
        text = self._probe("-version")
        m = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
        if not m:
            raise QemuError(f"{self.binary} -version printed no version: {text.strip()[:200]!r}")
        return int(m[1]), int(m[2]), int(m[3])

    def missing(self, features: set[Feature]) -> list[str]:
        """What of ``features`` this QEMU lacks, each named ([] when it has all)."""
        missing: list[str] = []
        major_minor = self.version()[:2]
        if major_minor < MINIMUM:
            v = ".".join(map(str, self.version()))
            missing.append(f"QEMU {v} is older than {MINIMUM[0]}.{MINIMUM[1]} (no cpr-reboot, no iommufd)")
            return missing
        objects = self._probe("-object", "help") if features & {Feature.SHARED_RAM, Feature.IOMMUFD} else ""
        if Feature.SHARED_RAM in features and "memory-backend-file" not in objects:
            missing.append("no memory-backend-file object")
        if Feature.IOMMUFD in features and not re.search(r"^\s*iommufd$", objects, re.M):
            missing.append("no iommufd object (-object iommufd)")
        if Feature.VFIO_IOMMUFD in features and "iommufd=" not in self._probe("-device", "vfio-pci,help"):
            missing.append("vfio-pci has no iommufd property")
        if Feature.SCALABLE_MODE in features and "scalable-mode" not in self._probe("-device", "intel-iommu,help"):
            missing.append("intel-iommu has no scalable-mode")
        return missing

    def require(self, features: set[Feature], what: str) -> None:
        missing = self.missing(features)
        if missing:
            raise QemuError(f"{what} needs a newer QEMU than {self.binary}: {'; '.join(missing)}; "
                            f"leave --qemu and ${ENV_QEMU} unset to use the QEMU "
                            f"{PACKAGE_VERSION.split(':')[1].split('+')[0]} pyiommufd fetches")


def _answers_file(binary: Path) -> tuple[Path, str] | None:
    try:
        st = binary.stat()
    except OSError:
        return None
    identity = f"{binary.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return debian.cache_root() / "qemu" / "answers.json", identity


def _load_answers(binary: Path) -> dict[str, str]:
    where = _answers_file(binary)
    if where is None:
        return {}
    try:
        doc = json.loads(where[0].read_text())
    except (OSError, ValueError):
        return {}
    answers = doc.get(where[1]) if isinstance(doc, dict) else None
    return {k: v for k, v in answers.items() if isinstance(v, str)} if isinstance(answers, dict) else {}


def _save_answers(binary: Path, answers: dict[str, str]) -> None:
    where = _answers_file(binary)
    if where is None:
        return
    path, identity = where
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
    doc[identity] = answers
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".answers.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass        # a read-only cache (the test VM's): asked again next time


def cache_dir() -> Path:
    return debian.cache_root() / "qemu" / PACKAGE_VERSION.replace(":", "_")


def _cached(root: Path) -> Qemu:
    loader = root / _ARCH_LIBS / "ld-linux-x86-64.so.2"
    binary = root / "usr/bin/qemu-system-x86_64"
    libs = ":".join(str(root / d) for d in (_ARCH_LIBS, f"{_ARCH_LIBS}/pulseaudio"))
    firmware = tuple(str(root / d) for d in ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"))
    return Qemu(binary, (str(loader), "--library-path", libs, str(binary)), firmware,
                (("QEMU_MODULE_DIR", str(root / _ARCH_LIBS / "qemu")),), "cache")


def fetch(progress: Callable[[str], None] | None = None) -> Qemu:
    """The pinned QEMU in the cache, fetched and unpacked on first use (about
    40 MB of packages, 170 MB unpacked). Safe against concurrent callers."""
    d = cache_dir()
    root = d / "root"
    stamp = d / ".complete"
    if stamp.exists():
        return _cached(root)
    d.mkdir(parents=True, exist_ok=True)
    with open(d.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            if progress:
                progress(f"[qemu] fetching {PACKAGE} {PACKAGE_VERSION} and its libraries from "
                         f"{debian.SUITE} into {d}")
            try:
                debs = debian.fetch_closure([f"{PACKAGE}={PACKAGE_VERSION}"], d)
                shutil.rmtree(root, ignore_errors=True)
                debian.unpack_into(debs, root)
            except debian.DebianFetchError as exc:
                raise QemuError(f"cannot fetch QEMU: {exc}") from None
            if not (root / "usr/bin/qemu-system-x86_64").is_file():
                raise QemuError(f"{PACKAGE} {PACKAGE_VERSION} unpacked without qemu-system-x86_64")
            shutil.rmtree(d / "apt" / "cache", ignore_errors=True)
            stamp.touch()
    return _cached(root)


def resolve(path: str | None = None, *, fetch_missing: bool = True,
            progress: Callable[[str], None] | None = None) -> Qemu:
    """The QEMU to run: ``path``, else ``$PYIOMMUFD_QEMU``, else the cached one."""
    origin = "--qemu"
    if not path:
        path, origin = os.environ.get(ENV_QEMU) or None, f"${ENV_QEMU}"
    if path:
        found = shutil.which(path) if os.sep not in path else path
        if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
            raise UsageError(f"{origin} {path}: no such executable")
        return Qemu(Path(found), (found,), (), (), origin)
    if not fetch_missing and not (cache_dir() / ".complete").exists():
        raise QemuError(f"no QEMU in the cache ({cache_dir()}); run `pyiommufd qemu fetch`, "
                        f"or name one with --qemu or ${ENV_QEMU}")
    return fetch(progress)


__all__ = ["Qemu", "QemuError", "Feature", "resolve", "fetch", "cache_dir", "PACKAGE_VERSION", "ENV_QEMU"]
