"""Fetch Debian's Linux 7.3 packages without touching the host's apt setup.

We need ``linux-source-7.3`` (to build the VM kernel) and ``linux-libc-dev``
(the real 7.3 UAPI headers for the conformance probe). Both live in
trixie-backports. Adding that suite to the host's sources could upgrade libc,
so we run apt with a private sources list, list directory and cache under
the pyiommufd cache, download with ``apt-get download`` and unpack with
``dpkg-deb -x``. The mirror is the one the host already uses for Debian.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SUITE = "trixie-backports"
LINUX_PACKAGE_VERSION = "7.3.4-1~bpo13+1"
LINUX_SOURCE = "linux-source-7.3"
LIBC_DEV = "linux-libc-dev"


class DebianFetchError(RuntimeError):
    pass


def cache_root() -> Path:
    root = os.environ.get("PYIOMMUFD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyiommufd")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def host_debian_mirror() -> str:
    """The Debian archive URI the host's apt is configured with."""
    override = os.environ.get("PYIOMMUFD_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    candidates: list[str] = []
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        # deb822 stanzas: URIs + Suites; one-line: deb URI SUITE ...
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.findall(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.findall(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and re.search(r"\b(bookworm|trixie)\b", suites[0]) \
                    and "security" not in suites[0]:
                candidates.extend(uris)
        for uri, suite in re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if re.match(r"(bookworm|trixie)$", suite):
                candidates.append(uri)
    for uri in candidates:
        if "/debian" in uri and "security" not in uri:
            return uri.rstrip("/")
    raise DebianFetchError("no Debian mirror in the host's apt sources; set PYIOMMUFD_DEBIAN_MIRROR")


def _apt_dir() -> Path:
    return cache_root() / "apt"


def _apt_options(apt: Path | None = None) -> list[str]:
    apt = apt or _apt_dir()
    return [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "Debug::NoLocking=1",
    ]


def _apt_update() -> None:
    apt = _apt_dir()
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb {host_debian_mirror()} {SUITE} main\n")
    _run(["apt-get", *_apt_options(), "update"], "apt-get update ({SUITE})")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    if shutil.which(cmd[0]) is None:
        raise DebianFetchError(f"{cmd[0]} is not installed (needed for {what})")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise DebianFetchError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def fetch_deb(package: str, version: str = LINUX_PACKAGE_VERSION) -> Path:
    """Download ``package=version`` from trixie-backports into the cache."""
    debs = _apt_dir() / "debs"
    found = sorted(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb")) if debs.exists() else []
    if found:
        return found[0]
    _apt_update()
    _run(["apt-get", *_apt_options(), "download", f"{package}={version}"],
         f"apt-get download {package}={version}", cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    found = [p for p in found if version.split(":")[-1] in p.name.replace("%3a", ":")]
    if not found:
        raise DebianFetchError(f"apt-get download {package}={version} produced no .deb")
    return found[0]


def fetch_closure(packages: list[str], dest: Path, *, suites: tuple[str, ...] = ("trixie", SUITE),
                  target_release: str = SUITE) -> list[Path]:
    """Download ``packages`` and everything they depend on, as a system with
    nothing installed needs them, from ``suites`` (the host's own package
    state is never consulted, so a bookworm host still gets trixie's libc),
    into ``dest``; return the .deb files. A private apt directory under
    ``dest``, like :func:`fetch_deb`'s."""
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    mirror = host_debian_mirror()
    (apt / "sources.list").write_text("".join(f"deb {mirror} {s} main\n" for s in suites))
    options = _apt_options(apt) + ["-o", f"Dir::State::status={apt / 'status'}"]
    _run(["apt-get", *options, "update"], f"apt-get update ({', '.join(suites)})")
    _run(["apt-get", *options, "install", "-y", "--download-only", "--no-install-recommends",
          "-t", target_release, *packages], f"apt-get install --download-only {' '.join(packages)}")
    debs = sorted((apt / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise DebianFetchError(f"apt-get downloaded no package for {' '.join(packages)}")
    return debs


def unpack_into(debs: list[Path], root: Path) -> None:
    """``dpkg-deb -x`` every package into ``root`` (no maintainer scripts run)."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")


def unpacked(package: str, version: str = LINUX_PACKAGE_VERSION) -> Path:
    """``dpkg-deb -x`` the package into the cache once; return the root."""
    dest = cache_root() / "debs-unpacked" / f"{package}_{version}"
    stamp = dest / ".unpacked"
    if not stamp.exists():
        deb = fetch_deb(package, version)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        stamp.touch()
    return dest


def uapi_include_dir(version: str = LINUX_PACKAGE_VERSION) -> Path:
    """``usr/include`` of linux-libc-dev 7.3 (has linux/iommufd.h, vfio.h, liveupdate.h)."""
    inc = unpacked(LIBC_DEV, version) / "usr" / "include"
    if not (inc / "linux" / "iommufd.h").exists():
        raise DebianFetchError(f"{inc}/linux/iommufd.h missing from {LIBC_DEV} {version}")
    return inc


def kernel_source_tree(version: str = LINUX_PACKAGE_VERSION) -> Path:
    """The unpacked linux-source-7.3 tree (the .tar.xz inside the package, extracted)."""
    tree = cache_root() / "linux-src" / version
    if not (tree / "Makefile").exists():
        root = unpacked(LINUX_SOURCE, version)
        tarballs = sorted((root / "usr" / "src").glob("linux-source-*.tar.*"))
        if not tarballs:
            raise DebianFetchError(f"no source tarball in {LINUX_SOURCE} {version}")
        tmp = tree.with_name(tree.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp), "--strip-components=1"],
             f"tar -xf {tarballs[0].name}")
        shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(tree)
    return tree
