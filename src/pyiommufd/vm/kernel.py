"""Build (or reuse) the guest kernel for the VM tier.

Recipe, from Debian's ``linux-source-7.3`` tree (:func:`debian.kernel_source_tree`)::

    make O=<build> defconfig kvm_guest.config
    scripts/kconfig/merge_config.sh -m -O <build> <build>/.config kernel.fragment
    make O=<build> olddefconfig
    (check that every option of kernel.fragment survived)
    make O=<build> -j$(nproc) bzImage

Cache layout (``debian.cache_root()`` is ``$PYIOMMUFD_CACHE`` or ``~/.cache/pyiommufd``)::

    kernels/<source-version>-<sha256(kernel.fragment)[:12]>/
        bzImage      the image the VM boots (and kexecs into)
        config       its .config
        release      `uname -r` of that kernel
        build.log    output of every configure/make step of the last build
        build/       the O= directory (kept, so a rebuild is incremental)
    kernels/<key>.lock   flock(2) taken while building

A cache hit (``bzImage`` + ``config`` + ``release`` present) costs a few
``stat`` calls. A user kernel (``--kernel PATH``) is used as it is; its
release is read from the bzImage header.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import debian

Progress = Callable[[str], None]

FRAGMENT = Path(__file__).with_name("kernel.fragment")
BASE_CONFIGS = ("defconfig", "kvm_guest.config")
IMAGE = "arch/x86/boot/bzImage"


class KernelBuildError(RuntimeError):
    """The guest kernel could not be built; ``log`` is the build log, if any."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class KernelImage:
    bzimage: Path
    release: str | None
    config: Path | None = None
    key: str | None = None
    origin: str = "cache"        # "cache" | "built" | "user"
    seconds: float = 0.0         # time spent getting it (build time when built)

    def describe(self) -> str:
        rel = self.release or "unknown release"
        return f"Linux {rel} ({self.origin}: {self.bzimage})"


# -- fragment and config checks ---------------------------------------------------

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """``{option: value}`` of a .config or fragment; ``"n"`` for ``# X is not set``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _SET.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def missing_options(fragment_text: str, config_text: str) -> list[str]:
    """Options the fragment asks for that the final .config does not have,
    as ``"CONFIG_X=y (got n)"`` strings, in fragment order."""
    want = parse_config(fragment_text)
    have = parse_config(config_text)
    bad = []
    for opt, value in want.items():
        got = have.get(opt, "n")
        if got != value:
            bad.append(f"{opt}={value} (got {'not set' if got == 'n' else got})")
    return bad


def fragment_text() -> str:
    return FRAGMENT.read_text()


def cache_key(fragment: str | bytes | None = None,
              version: str = debian.LINUX_PACKAGE_VERSION) -> str:
    """``<source-version>-<sha256(fragment)[:12]>``."""
    if fragment is None:
        fragment = fragment_text()
    if isinstance(fragment, str):
        fragment = fragment.encode()
    return f"{version}-{hashlib.sha256(fragment).hexdigest()[:12]}"


def kernels_root() -> Path:
    return debian.cache_root() / "kernels"


def kernel_dir(key: str | None = None) -> Path:
    return kernels_root() / (key or cache_key())


# -- releases -------------------------------------------------------------------

def bzimage_release(path: str | os.PathLike) -> str | None:
    """The ``uname -r`` string embedded in a bzImage (boot protocol >= 2.00:
    the setup header's ``kernel_version`` field at 0x20e points to it, +0x200)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (off,) = struct.unpack_from("<H", head, 0x20E)
    start = off + 0x200
    if not off or start >= len(head):
        return None
    raw = head[start:start + 256].split(b"\0", 1)[0].decode(errors="replace")
    return raw.split(" ", 1)[0] or None


def cached_kernel(key: str | None = None) -> KernelImage | None:
    """The cached kernel for ``key`` (default: the current fragment), or None."""
    d = kernel_dir(key)
    image, config, release = d / "bzImage", d / "config", d / "release"
    if image.is_file() and config.is_file() and release.is_file():
        return KernelImage(image, release.read_text().strip() or None, config,
                           d.name, "cache")
    return None


def user_kernel(path: str | os.PathLike) -> KernelImage:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KernelBuildError(f"--kernel {path}: no such file")
    p = p.resolve()
    config = None
    for name in (".config", "config"):
        if (p.parent / name).is_file():
            config = p.parent / name
            break
    return KernelImage(p, bzimage_release(p), config, None, "user")


# -- building -------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None,
                heartbeat: Callable[[], None] | None = None, every: float = 60.0) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=every)
                    break
                except subprocess.TimeoutExpired:
                    if heartbeat:
                        heartbeat()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc:
        raise KernelBuildError(
            f"`{' '.join(cmd)}` failed with exit code {rc}; log: {log}\n{_tail(log)}", log)


def build_kernel(*, jobs: int | None = None, progress: Progress = print,
                 force: bool = False, source_tree: Path | None = None) -> KernelImage:
    """Return the cached kernel for the current fragment, building it if needed."""
    start = time.monotonic()
    key = cache_key()
    if not force:
        hit = cached_kernel(key)
        if hit:
            return hit
    d = kernel_dir(key)
    with _locked(kernels_root() / f"{key}.lock"):
        if not force:   # someone else may have built it while we waited
            hit = cached_kernel(key)
            if hit:
                return hit
        return _build(key, d, jobs or os.cpu_count() or 1, progress, source_tree, start)


def _build(key: str, d: Path, jobs: int, progress: Progress, source_tree: Path | None,
           start: float) -> KernelImage:
    def say(msg: str) -> None:
        progress(f"[kernel] {msg} (+{time.monotonic() - start:.0f}s)")

    for tool in ("make", "gcc", "flex", "bison", "bc"):
        if shutil.which(tool) is None:
            raise KernelBuildError(f"{tool} is not installed (needed to build the VM kernel)")
    d.mkdir(parents=True, exist_ok=True)
    log = d / "build.log"
    log.write_text(f"# pyiommufd kernel build {key}\n")
    try:
        src = source_tree or debian.kernel_source_tree()
    except debian.DebianFetchError as exc:
        raise KernelBuildError(f"cannot get the kernel source: {exc}") from exc
    say(f"source tree {src}")
    build = d / "build"
    build.mkdir(exist_ok=True)
    make = ["make", "-C", str(src), f"O={build}"]
    frag = fragment_text()

    say("configure: defconfig + kvm_guest.config + kernel.fragment, olddefconfig")
    _run_logged(make + list(BASE_CONFIGS), log)
    _run_logged([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build),
                 str(build / ".config"), str(FRAGMENT)], log, cwd=src)
    _run_logged(make + ["olddefconfig"], log)
    config_text = (build / ".config").read_text()
    bad = missing_options(frag, config_text)
    if bad:
        raise KernelBuildError(
            "kernel.fragment options did not survive olddefconfig (unmet dependencies?): "
            + ", ".join(bad), log)

    say(f"make -j{jobs} bzImage (log: {log})")
    t0 = time.monotonic()

    def heartbeat() -> None:
        last = _tail(log, 1).strip()
        say(f"still building ({time.monotonic() - t0:.0f}s): {last[:100]}")

    _run_logged(make + [f"-j{jobs}", "bzImage"], log, heartbeat=heartbeat)
    image = build / IMAGE
    if not image.is_file():
        raise KernelBuildError(f"make bzImage succeeded but {image} is missing", log)
    release_file = build / "include/config/kernel.release"
    release = release_file.read_text().strip() if release_file.is_file() else bzimage_release(image)
    # Publish atomically-ish: bzImage and config first, release last (the hit marker).
    for name, srcpath in (("bzImage", image), ("config", build / ".config")):
        tmp = d / f".{name}.tmp"
        shutil.copyfile(srcpath, tmp)
        os.replace(tmp, d / name)
    (d / ".release.tmp").write_text((release or "") + "\n")
    os.replace(d / ".release.tmp", d / "release")
    took = time.monotonic() - start
    say(f"built Linux {release}: {d / 'bzImage'}")
    return KernelImage(d / "bzImage", release, d / "config", key, "built", took)


def resolve_kernel(kernel: str | os.PathLike | None = None, *,
                   progress: Progress = print, jobs: int | None = None) -> KernelImage:
    """``kernel`` (a user bzImage) if given, else the cached/built kernel."""
    if kernel is not None:
        return user_kernel(kernel)
    return build_kernel(progress=progress, jobs=jobs)


__all__ = [
    "KernelBuildError", "KernelImage", "build_kernel", "resolve_kernel", "cached_kernel",
    "user_kernel", "cache_key", "kernel_dir", "kernels_root", "missing_options",
    "parse_config", "bzimage_release", "fragment_text", "FRAGMENT",
]
