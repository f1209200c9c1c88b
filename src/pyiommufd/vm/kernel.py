"""Build (or reuse) a guest kernel for the VM tier: Debian's 7.3 tree, optionally
with patches (a posted series, a stand-in handler), and the VM tier's config.

Recipe, from Debian's ``linux-source-7.3`` tree (:func:`debian.kernel_source_tree`)::

    cp -al <pristine tree> <key>/src       (files a patch touches are copied, not linked)
    patch -p1 --fuzz=0 < each patch, in order (a hunk that needs fuzz is refused)
    make O=<key>/build KCONFIG_ALLCONFIG=<fragment + extras> allnoconfig
    make O=<key>/build olddefconfig
    (check that every option asked for survived)
    make O=<key>/build -j$(nproc) bzImage    (through ccache when it is installed)

``kernel.fragment`` is the whole config: ``allnoconfig`` gives everything it
does not name its smallest value, so the build has what the tiers use and
nothing else. A patched tree that has ``config IOMMU_LIVEUPDATE`` gets
``CONFIG_IOMMU_LIVEUPDATE=y`` as well; ``--config FRAGMENT`` adds more.

Cache layout (``debian.cache_root()`` is ``$PYIOMMUFD_CACHE`` or ``~/.cache/pyiommufd``)::

    kernels/<key>/          key: <source-version>-<sha256(config)[:12]>[-p<sha256(patches)[:12]>]
        bzImage      the image the VM boots (and kexecs into)
        config       its .config
        release      `uname -r` of that kernel
        label        what it is, e.g. "7.3.4 + series-v1-on-7.3.4.patch"
        iommufd_liveupdate   the series' C selftest, when the tree has it (static binary)
        lu_nr        the LU ioctl's nr in the tree's UAPI header, when it has one
        build.log    output of every patch/configure/make step of the last build
        src/         the patched tree (hard links to the pristine tree where unchanged)
        build/       the O= directory (kept, so a rebuild is incremental)
    kernels/<key>.lock   flock(2) taken while building; holds who builds and since when
    ccache/              compiler cache shared by every key

The pristine tree is never modified. A cache hit (``bzImage`` + ``config`` +
``release`` present) costs a few ``stat`` calls. A user kernel (``--kernel
PATH``) is used as it is; its release is read from the bzImage header.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import debian

Progress = Callable[[str], None]

FRAGMENT = Path(__file__).with_name("kernel.fragment")
IMAGE = "arch/x86/boot/bzImage"
# Added when the (patched) tree has the option: the series' Kconfig symbol.
LIVEUPDATE_OPTION = "IOMMU_LIVEUPDATE"
# The series' C selftest (patch 14) and the liveupdate selftest library it links.
C_SELFTEST_SOURCE = "tools/testing/selftests/iommu/iommufd_liveupdate.c"
C_SELFTEST_LIB = "tools/testing/selftests/liveupdate/lib"
C_SELFTEST_NAME = "iommufd_liveupdate"
DEFAULT_LOCK_TIMEOUT = 3600.0


class KernelBuildError(RuntimeError):
    """The guest kernel could not be built; ``log`` is the build log, if any."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


class PatchError(KernelBuildError):
    """A patch did not apply cleanly (no fuzz allowed); ``rejects`` lists
    ``(file, hunk)`` pairs as patch(1) reported them."""

    def __init__(self, message: str, patch: Path, rejects: list[tuple[str, str]],
                 log: Path | None = None):
        super().__init__(message, log)
        self.patch = patch
        self.rejects = rejects


@dataclass(frozen=True)
class KernelImage:
    bzimage: Path
    release: str | None
    config: Path | None = None
    key: str | None = None
    origin: str = "cache"        # "cache" | "built" | "user"
    seconds: float = 0.0         # time spent getting it (build time when built)
    label: str | None = None     # "7.3.4", "7.3.4 + series-v1-on-7.3.4.patch", a user path
    #: the series' C selftest (patch 14), built against the tree's own UAPI headers
    c_selftest: Path | None = None
    #: the LU ioctl's nr as the tree's UAPI header declares it (None: it has none)
    lu_nr: int | None = None

    def describe(self) -> str:
        rel = self.release or "unknown release"
        what = f"{self.label}, " if self.label else ""
        return f"Linux {rel} ({what}{self.origin}: {self.bzimage})"


@dataclass(frozen=True)
class KernelRecipe:
    """What a kernel is built from: patches applied in order and config
    fragments on top of ``kernel.fragment``."""

    patches: tuple[Path, ...] = ()
    fragments: tuple[Path, ...] = ()

    @classmethod
    def of(cls, patches: Sequence[str | os.PathLike[str]] = (),
           fragments: Sequence[str | os.PathLike[str]] = ()) -> "KernelRecipe":
        def files(paths: Sequence[str | os.PathLike[str]], what: str) -> tuple[Path, ...]:
            out = []
            for p in paths:
                path = Path(p).expanduser()
                if not path.is_file():
                    raise KernelBuildError(f"{what} {p}: no such file")
                out.append(path.resolve())
            return tuple(out)
        return cls(files(patches, "--patch"), files(fragments, "--config"))

    def patch_digest(self) -> str | None:
        if not self.patches:
            return None
        h = hashlib.sha256()
        for p in self.patches:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()[:12]

    def label(self, version: str) -> str:
        base = version.split("-", 1)[0]
        return " + ".join([base] + [p.name for p in self.patches])


STOCK = KernelRecipe()


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


def config_text(recipe: KernelRecipe = STOCK, tree: Path | None = None) -> str:
    """The whole KCONFIG_ALLCONFIG text of a recipe: ``kernel.fragment``, the
    series' option when the tree has it, then the user's fragments."""
    parts = [fragment_text()]
    if tree is not None and tree_has_option(tree, LIVEUPDATE_OPTION):
        parts.append(f"# the tree has {LIVEUPDATE_OPTION}\nCONFIG_{LIVEUPDATE_OPTION}=y\n")
    for frag in recipe.fragments:
        parts.append(f"# {frag.name}\n" + frag.read_text())
    return "\n".join(p if p.endswith("\n") else p + "\n" for p in parts)


_LU_CMD = re.compile(r"IOMMUFD_CMD_HWPT_LU_(?:SET|MARK)_PRESERVE\s*=\s*(0x[0-9a-fA-F]+|\d+)")


def tree_lu_nr(tree: Path) -> int | None:
    """The LU mark ioctl's nr, as the tree's ``include/uapi/linux/iommufd.h``
    declares it: a fact of the kernel's source, so nothing has to be probed
    for it (the series rebased onto 7.3 moved it to 0x96)."""
    try:
        text = (tree / "include" / "uapi" / "linux" / "iommufd.h").read_text(errors="replace")
    except OSError:
        return None
    m = _LU_CMD.search(text)
    return int(m.group(1), 0) if m else None


def patch_adds_option(patch_text: str, option: str) -> bool:
    """Does a patch add ``config OPTION`` to a Kconfig file?"""
    return re.search(rf"^\+\s*config\s+{re.escape(option)}\s*$", patch_text, re.M) is not None


def tree_has_option(tree: Path, option: str) -> bool:
    pattern = re.compile(rf"^\s*config\s+{re.escape(option)}\s*$", re.M)
    for kconfig in (tree / "drivers" / "iommu").rglob("Kconfig*"):
        if pattern.search(kconfig.read_text(errors="replace")):
            return True
    return False


def cache_key(fragment: str | bytes | None = None,
              version: str = debian.LINUX_PACKAGE_VERSION,
              recipe: KernelRecipe = STOCK) -> str:
    """``<source-version>-<sha256(config)[:12]>[-p<sha256(patches)[:12]>]``.

    The config hashed is ``kernel.fragment`` plus, for patches that add
    ``IOMMU_LIVEUPDATE``, that option, plus the recipe's fragments."""
    if fragment is None:
        fragment = fragment_text()
        if any(patch_adds_option(p.read_text(errors="replace"), LIVEUPDATE_OPTION)
               for p in recipe.patches):
            fragment += f"CONFIG_{LIVEUPDATE_OPTION}=y\n"
        for frag in recipe.fragments:
            fragment += frag.read_text()
    if isinstance(fragment, str):
        fragment = fragment.encode()
    key = f"{version}-{hashlib.sha256(fragment).hexdigest()[:12]}"
    digest = recipe.patch_digest()
    return f"{key}-p{digest}" if digest else key


def kernels_root() -> Path:
    return debian.cache_root() / "kernels"


def kernel_dir(key: str | None = None) -> Path:
    return kernels_root() / (key or cache_key())


# -- releases -------------------------------------------------------------------

def bzimage_release(path: str | os.PathLike[str]) -> str | None:
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
        label = (d / "label").read_text().strip() if (d / "label").is_file() else None
        selftest = d / C_SELFTEST_NAME
        lu_nr = int((d / "lu_nr").read_text(), 0) if (d / "lu_nr").is_file() else None
        return KernelImage(image, release.read_text().strip() or None, config,
                           d.name, "cache", label=label,
                           c_selftest=selftest if selftest.is_file() else None, lu_nr=lu_nr)
    return None


def user_kernel(path: str | os.PathLike[str]) -> KernelImage:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KernelBuildError(f"--kernel {path}: no such file")
    p = p.resolve()
    config = None
    for name in (".config", "config"):
        if (p.parent / name).is_file():
            config = p.parent / name
            break
    label = None
    if (p.parent / "label").is_file():
        label = (p.parent / "label").read_text().strip() or None
    return KernelImage(p, bzimage_release(p), config, None, "user", label=label or str(p))


# -- the build lock -------------------------------------------------------------------

def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = info.get("since")
    held = f", for {time.time() - since:.0f}s" if isinstance(since, (int, float)) else ""
    return f"pid {info.get('pid', '?')} ({info.get('what', 'a kernel build')}{held})"


@contextlib.contextmanager
def _locked(path: Path, what: str = "a kernel build", progress: Progress = print,
            timeout: float | None = None, poll: float = 2.0,
            report_every: float = 60.0) -> Iterator[None]:
    """flock ``path``; while another process holds it, say who and for how long
    (every ``report_every`` s) and give up after ``timeout`` s."""
    if timeout is None:
        timeout = float(os.environ.get("PYIOMMUFD_BUILD_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        waited = 0.0
        next_report = 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= next_report:
                    progress(f"[kernel] waiting for {path.name}: held by {_holder(path)}; "
                             f"waited {waited:.0f}s of {timeout:.0f}s")
                    next_report += report_every
                if waited >= timeout:
                    raise KernelBuildError(
                        f"gave up after {timeout:.0f}s waiting for {path}, held by "
                        f"{_holder(path)} (PYIOMMUFD_BUILD_LOCK_TIMEOUT sets the limit)")
                time.sleep(poll)
                waited += poll
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "since": time.time(), "what": what}))
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
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
                heartbeat: Callable[[], None] | None = None, every: float = 60.0,
                env: dict[str, str] | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, **env} if env else None)
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


# -- patches ---------------------------------------------------------------------------

_PATCHED_FILE = re.compile(r"^\+\+\+ (?:b/)?(\S+)", re.M)
_OLD_FILE = re.compile(r"^--- (?:a/)?(\S+)", re.M)


def patched_files(patch_text: str) -> list[str]:
    """Tree-relative paths a ``-p1`` patch writes (new files included)."""
    out: list[str] = []
    for rx in (_OLD_FILE, _PATCHED_FILE):
        for m in rx.finditer(patch_text):
            path = m.group(1)
            if path != "/dev/null" and path not in out:
                out.append(path)
    return out


_HUNK_FAILED = re.compile(r"^Hunk #(\d+) FAILED at (\d+)", re.M)
_PATCHING = re.compile(r"^(?:patching|checking) file '?([^'\n]+)'?$", re.M)
_FUZZ = re.compile(r"^Hunk #(\d+) succeeded at (\d+) with fuzz (\d+)", re.M)


def rejected_hunks(patch_output: str) -> list[tuple[str, str]]:
    """``(file, "hunk #N at line L")`` for every hunk patch(1) refused."""
    out: list[tuple[str, str]] = []
    current = "?"
    for line in patch_output.splitlines():
        m = _PATCHING.match(line)
        if m:
            current = m.group(1)
            continue
        m = _HUNK_FAILED.match(line) or _FUZZ.match(line)
        if m:
            out.append((current, f"hunk #{m.group(1)} at line {m.group(2)}"))
        elif "can't find file to patch" in line or "No file to patch" in line:
            out.append((current, "the file is not in the tree"))
        elif "Reversed (or previously applied) patch detected" in line:
            out.append((current, "already applied (reversed patch detected)"))
    return out


def apply_patch(tree: Path, patch: Path, log: Path) -> None:
    """``patch -p1 --fuzz=0`` into ``tree``: a dry run first, so a patch that
    does not apply leaves the tree as it was; :class:`PatchError` names each
    refused hunk."""
    base = ["patch", "-p1", "--fuzz=0", "--forward", "--batch", "--no-backup-if-mismatch",
            "-d", str(tree), "-i", str(patch)]
    dry = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(base)} --dry-run\n{dry.stdout}{dry.stderr}")
    if dry.returncode:
        rejects = rejected_hunks(dry.stdout + dry.stderr)
        where = "; ".join(f"{f}: {h}" for f, h in rejects) or (dry.stdout + dry.stderr).strip()[-500:]
        raise PatchError(f"patch {patch} does not apply to the pristine 7.3 tree without fuzz: "
                         f"{where}", patch, rejects, log)
    text = patch.read_text(errors="replace")
    for rel in patched_files(text):
        _unlink_copy(tree / rel)
    _run_logged(base, log)


def _unlink_copy(path: Path) -> None:
    """Replace a hard link to the pristine tree with a private copy."""
    if path.is_file() and not path.is_symlink():
        tmp = path.with_name(path.name + ".pyiommufd-copy")
        shutil.copy2(path, tmp)
        os.replace(tmp, path)


PATCHED_STAMP = ".pyiommufd-patches"


def prepare_tree(pristine: Path, dest: Path, patches: Sequence[Path], log: Path) -> Path:
    """A tree at ``dest``: hard links to ``pristine``, with ``patches`` applied.
    A tree left by an earlier build of the same patches is reused as it is (a
    rebuild stays incremental: unchanged files keep their times)."""
    stamp = "".join(hashlib.sha256(p.read_bytes()).hexdigest() + "\n" for p in patches)
    if (dest / PATCHED_STAMP).is_file() and (dest / PATCHED_STAMP).read_text() == stamp:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _run_logged(["cp", "-al", str(pristine), str(tmp)], log)
    try:
        for patch in patches:
            apply_patch(tmp, patch, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / PATCHED_STAMP).write_text(stamp)
    tmp.rename(dest)
    return dest


# -- building -------------------------------------------------------------------

def _ccache_env() -> dict[str, str] | None:
    """Build through ccache when it is installed. Every key builds in
    ``<key>/build`` from ``<key>/src``, so with the key's directory as base_dir
    the same file compiles to the same cache entry in every key."""
    if shutil.which("ccache") is None or os.environ.get("PYIOMMUFD_NO_CCACHE"):
        return None
    return {"CCACHE_DIR": str(debian.cache_root() / "ccache"), "CCACHE_NOHASHDIR": "1",
            "CCACHE_MAXSIZE": os.environ.get("CCACHE_MAXSIZE", "8G")}


def build_kernel(*, jobs: int | None = None, progress: Progress = print,
                 force: bool = False, source_tree: Path | None = None,
                 recipe: KernelRecipe = STOCK) -> KernelImage:
    """Return the cached kernel for ``recipe`` (default: stock 7.3 with
    ``kernel.fragment``), building it if needed."""
    start = time.monotonic()
    key = cache_key(recipe=recipe)
    if not force:
        hit = cached_kernel(key)
        if hit:
            return hit
    d = kernel_dir(key)
    with _locked(kernels_root() / f"{key}.lock", f"building kernel {key}", progress):
        if not force:   # someone else may have built it while we waited
            hit = cached_kernel(key)
            if hit:
                return hit
        return _build(key, d, jobs or os.cpu_count() or 1, progress, source_tree, start, recipe)


def _build(key: str, d: Path, jobs: int, progress: Progress, source_tree: Path | None,
           start: float, recipe: KernelRecipe) -> KernelImage:
    def say(msg: str) -> None:
        progress(f"[kernel] {msg} (+{time.monotonic() - start:.0f}s)")

    for tool in ("make", "gcc", "flex", "bison", "bc", "patch"):
        if shutil.which(tool) is None:
            raise KernelBuildError(f"{tool} is not installed (needed to build the VM kernel)")
    d.mkdir(parents=True, exist_ok=True)
    log = d / "build.log"
    log.write_text(f"# pyiommufd kernel build {key}\n")
    try:
        pristine = source_tree or debian.kernel_source_tree()
    except debian.DebianFetchError as exc:
        raise KernelBuildError(f"cannot get the kernel source: {exc}") from exc
    label = recipe.label(debian.LINUX_PACKAGE_VERSION)
    say(f"{label}: tree from {pristine}"
        + (f", {len(recipe.patches)} patch(es), no fuzz" if recipe.patches else ""))
    src = prepare_tree(pristine, d / "src", recipe.patches, log)
    build = d / "build"
    build.mkdir(exist_ok=True)
    ccache = _ccache_env()
    make = ["make", "-C", str(src), f"O={build}"]
    if ccache:
        make.append("CC=ccache gcc")
        ccache["CCACHE_BASEDIR"] = str(d)
    want = config_text(recipe, src)
    allconfig = build / "pyiommufd.allconfig"
    allconfig.write_text(want)

    say("configure: allnoconfig with kernel.fragment"
        + (" + " + ", ".join(f.name for f in recipe.fragments) if recipe.fragments else "")
        + (f" + CONFIG_{LIVEUPDATE_OPTION}" if f"CONFIG_{LIVEUPDATE_OPTION}=y" in want else "")
        + ", olddefconfig")
    _run_logged(make + [f"KCONFIG_ALLCONFIG={allconfig}", "allnoconfig"], log, env=ccache)
    _run_logged(make + ["olddefconfig"], log, env=ccache)
    config = (build / ".config").read_text()
    bad = missing_options(want, config)
    if bad:
        raise KernelBuildError(
            "config options did not survive olddefconfig (unmet dependencies?): "
            + ", ".join(bad), log)

    say(f"make -j{jobs} bzImage{' via ccache' if ccache else ''} (log: {log})")
    t0 = time.monotonic()

    def heartbeat() -> None:
        last = _tail(log, 1).strip()
        say(f"still building ({time.monotonic() - t0:.0f}s): {last[:100]}")

    _run_logged(make + [f"-j{jobs}", "bzImage"], log, heartbeat=heartbeat, env=ccache)
    image = build / IMAGE
    if not image.is_file():
        raise KernelBuildError(f"make bzImage succeeded but {image} is missing", log)
    selftest = None
    if (src / C_SELFTEST_SOURCE).is_file():
        say(f"the tree has {C_SELFTEST_SOURCE}: building it against the tree's UAPI headers")
        selftest = build_c_selftest(src, build, d / C_SELFTEST_NAME, log, make, ccache)
    release_file = build / "include/config/kernel.release"
    release = release_file.read_text().strip() if release_file.is_file() else bzimage_release(image)
    # Publish: bzImage, config and label first, release last (the hit marker).
    for name, srcpath in (("bzImage", image), ("config", build / ".config")):
        tmp = d / f".{name}.tmp"
        shutil.copyfile(srcpath, tmp)
        os.replace(tmp, d / name)
    (d / "label").write_text(label + "\n")
    lu_nr = tree_lu_nr(src)
    if lu_nr is not None:
        (d / "lu_nr").write_text(f"{lu_nr:#x}\n")
    else:
        (d / "lu_nr").unlink(missing_ok=True)
    (d / ".release.tmp").write_text((release or "") + "\n")
    os.replace(d / ".release.tmp", d / "release")
    took = time.monotonic() - start
    say(f"built Linux {release} ({label}) in {took:.0f}s: {d / 'bzImage'}")
    return KernelImage(d / "bzImage", release, d / "config", key, "built", took, label, selftest,
                       lu_nr)


def build_c_selftest(src: Path, build: Path, out: Path, log: Path, make: list[str],
                     env: dict[str, str] | None = None) -> Path:
    """``make headers`` (the tree's UAPI into ``build/usr/include``), then the
    selftest and its library as kselftest's Makefile builds them: tools/include
    first, the exported headers as system headers, statically linked (the guest
    runs it from the host's root)."""
    _run_logged(make + ["headers"], log, env=env)
    selftests = src / "tools" / "testing" / "selftests"
    lib = src / C_SELFTEST_LIB
    tmp = out.with_name(out.name + ".tmp")
    _run_logged(["gcc", "-O2", "-static", "-D_GNU_SOURCE=", "-I", str(src / "tools" / "include"),
                 "-I", str(lib / "include"), "-isystem", str(build / "usr" / "include"),
                 str(src / C_SELFTEST_SOURCE), *map(str, sorted(lib.glob("*.c"))),
                 "-o", str(tmp)], log, cwd=selftests)
    os.replace(tmp, out)
    # the source beside it: a failed assert is reported by line number
    shutil.copyfile(src / C_SELFTEST_SOURCE, out.with_name(Path(C_SELFTEST_SOURCE).name))
    return out


def resolve_kernel(kernel: str | os.PathLike[str] | None = None, *,
                   progress: Progress = print, jobs: int | None = None,
                   recipe: KernelRecipe = STOCK) -> KernelImage:
    """``kernel`` (a user bzImage) if given, else the cached/built kernel of ``recipe``."""
    if kernel is not None:
        return user_kernel(kernel)
    return build_kernel(progress=progress, jobs=jobs, recipe=recipe)


__all__ = [
    "KernelBuildError", "PatchError", "KernelImage", "KernelRecipe", "STOCK", "build_kernel",
    "resolve_kernel", "cached_kernel", "user_kernel", "cache_key", "kernel_dir", "kernels_root",
    "missing_options", "parse_config", "bzimage_release", "fragment_text", "config_text",
    "apply_patch", "prepare_tree", "patched_files", "rejected_hunks", "FRAGMENT",
]
