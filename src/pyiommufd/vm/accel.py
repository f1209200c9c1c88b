"""KVM when a guest really boots with it, TCG otherwise.

``/dev/kvm`` being there proves little: on some hosts it opens but a guest
never gets going. So the first run on a host boots the VM kernel under KVM
once, for a few seconds, and watches its serial console for the kernel's
banner; the verdict is kept in ``<cache_root>/accel.json``, keyed by the host
kernel and the QEMU binary, so later runs pay nothing. ``$PYIOMMUFD_VM_ACCEL``
(``kvm`` or ``tcg``) decides without a probe.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import debian

ENV_ACCEL = "PYIOMMUFD_VM_ACCEL"
PROBE_SECONDS = 20.0
BANNER = b"Linux version"
ACCELS = {"kvm": "kvm", "tcg": "tcg,thread=multi"}


def _host_key(qemu: str) -> str:
    try:
        st = os.stat(qemu)
        qemu_id = f"{os.path.realpath(qemu)}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        qemu_id = qemu
    return f"{os.uname().release}|{qemu_id}"


def _cache() -> Path:
    return debian.cache_root() / "accel.json"


def kvm_openable(path: str = "/dev/kvm") -> str | None:
    """None when ``path`` opens read-write, else why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {os.strerror(exc.errno) if exc.errno is not None else exc}"
    os.close(fd)
    return None


def probe_kvm(qemu: str, kernel: str, seconds: float = PROBE_SECONDS) -> str | None:
    """Boot ``kernel`` under KVM for at most ``seconds``; None when its banner
    reached the serial console, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="pyiommufd-kvm-") as tmp:
        serial = Path(tmp) / "serial.log"
        cmd = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-machine", "q35", "-accel", "kvm", "-cpu", "max", "-m", "256M",
               "-kernel", kernel, "-append", "console=ttyS0 panic=-1",
               "-serial", f"file:{serial}", "-monitor", "none"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if serial.exists() and BANNER in serial.read_bytes():
                    return None
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    first = next((ln.strip() for ln in err.splitlines() if ln.strip()), "")
                    return f"QEMU exited with {proc.returncode}: {first[:200]}"
                time.sleep(0.2)
            return f"no kernel banner on the serial console within {seconds:.0f}s under KVM"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def choose(qemu: str, kernel: str,
           say: Callable[[str], None] = lambda _m: None) -> tuple[str, str]:
    """``(accel, why)``: ``"kvm"`` or ``"tcg"`` and how that was decided."""
    forced = os.environ.get(ENV_ACCEL)
    if forced:
        if forced not in ACCELS:
            raise ValueError(f"${ENV_ACCEL} must be kvm or tcg, not {forced!r}")
        return forced, f"${ENV_ACCEL}={forced}"
    why_not = kvm_openable()
    if why_not:
        return "tcg", why_not
    key = _host_key(qemu)
    try:
        known = json.loads(_cache().read_text())
    except (OSError, ValueError):
        known = {}
    if known.get("host") == key and known.get("accel") in ACCELS:
        return known["accel"], f"{known.get('why', '')} (probed {known.get('when', '?')})"
    say("probing whether a guest boots under KVM (once per host)")
    failure = probe_kvm(qemu, kernel)
    accel, why = ("kvm", "a guest booted under KVM") if failure is None else \
        ("tcg", f"KVM did not boot a guest: {failure}")
    try:
        _cache().write_text(json.dumps({"host": key, "accel": accel, "why": why,
                                        "when": time.strftime("%Y-%m-%d %H:%M")}))
    except OSError:
        pass
    return accel, why
