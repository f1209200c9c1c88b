"""``pyiommufd doctor`` (host readiness) and ``pyiommufd caps`` (ioctl probe).

Both read everything through the backend seam, so the fake kernel drives them
in tests. ``doctor`` exits 0 when every *required* check passes, 1 otherwise;
``caps`` never runs an ioctl handler: every probe passes ``size = 0``, which
the iommufd and LUO dispatchers refuse with EINVAL (known ioctl) or ENOTTY
(unknown) before anything executes (anchors 0.4, 4.2).
"""
from __future__ import annotations

import errno as E
import gzip
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click

from .. import exitcodes
from ..errors import errname
from .output import CommandError, echo_json, echo_table, error_object, exit_with, json_option, report_error

if TYPE_CHECKING:
    from ..backend import Backend

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"

#: (option, required, hint when missing)
CONFIG_OPTIONS = [
    ("IOMMUFD", True, "iommufd (/dev/iommu)"),
    ("VFIO_DEVICE_CDEV", True, "VFIO device cdevs (/dev/vfio/devices/vfioN)"),
    ("LIVEUPDATE", True, "the Live Update Orchestrator (/dev/liveupdate)"),
    ("LIVEUPDATE_MEMFD", True, "memfd preservation (guest RAM, Linux 7.3 mm/memfd_luo.c)"),
    ("KEXEC_HANDOVER", True, "KHO, which carries preserved state over kexec"),
    ("KEXEC_FILE", True, "kexec_file_load, the only loader KHO works with"),
    ("IOMMU_LIVEUPDATE", False, "the series' IOMMU state preservation (out of tree; absent on stock 7.3)"),
    ("INTEL_IOMMU", False, "Intel VT-d, the only IOMMU driver the series preserves"),
    ("IRQ_REMAP", False, "interrupt remapping; without it VFIO_DEVICE_BIND_IOMMUFD says EPERM "
                         "unless iommufd.allow_unsafe_interrupts=1"),
]


@dataclass
class Check:
    check: str
    status: str
    value: str
    hint: str = ""
    required: bool = False


def read_kernel_config(be: Backend, release: str) -> tuple[dict[str, str] | None, str]:
    """``{"IOMMUFD": "y", ...}`` from /proc/config.gz or /boot/config-<release>,
    and where it came from. Options shown as ``is not set`` map to ``"n"``."""
    text = None
    source = ""
    try:
        text = gzip.decompress(be.files.read_bytes("/proc/config.gz")).decode(errors="replace")
        source = "/proc/config.gz"
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    if text is None:
        path = f"/boot/config-{release}"
        try:
            text = be.files.read_text(path)
            source = path
        except OSError:
            return None, "no /proc/config.gz (CONFIG_IKCONFIG_PROC) and no " + path
    config: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key[7:]] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[9:-len(" is not set")]] = "n"
    return config, source


def _cmdline(be: Backend) -> list[str]:
    try:
        return be.files.read_text("/proc/cmdline").split()
    except OSError:
        return []


def _param(words: list[str], name: str) -> str | None:
    value = None
    for word in words:
        key, sep, val = word.partition("=")
        if key == name:
            value = val if sep else ""
    return value


_TRUE = ("1", "y", "yes", "on", "true")


def _holder_names(be: Backend, pids: list[int]) -> str:
    parts = []
    for pid in pids:
        try:
            comm = be.files.read_text(f"/proc/{pid}/comm").strip()
        except OSError:
            comm = "?"
        parts.append(f"{pid} ({comm})")
    return ", ".join(parts)


def _memlock() -> tuple[str, str]:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return OK, "unlimited"
    if soft < 64 << 20:
        return WARN, f"{soft >> 10} KiB"
    return OK, f"{soft >> 20} MiB"


def run_checks(be: Backend) -> list[Check]:
    from .. import luo

    checks: list[Check] = []
    add = checks.append

    euid = be.geteuid()
    add(Check("root", OK if euid == 0 else FAIL, f"euid {euid}",
              "" if euid == 0 else "run as root: /dev/iommu, /dev/liveupdate, sysfs binds and kexec need it",
              required=True))

    release = be.kernel_release()
    add(Check("kernel release", INFO, release))

    iommu = be.files.exists("/dev/iommu")
    add(Check("/dev/iommu", OK if iommu else FAIL, "present" if iommu else "missing",
              "" if iommu else "load iommufd (CONFIG_IOMMUFD, modprobe iommufd)", required=True))

    lu = be.files.exists(luo.DEVICE)
    if not lu:
        add(Check(luo.DEVICE, FAIL, "missing", "boot with CONFIG_LIVEUPDATE, liveupdate=on and KHO "
                  "enabled (kho=on or CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT)", required=True))
    else:
        holders = luo.holders_of(be)
        if holders:
            add(Check(luo.DEVICE, WARN, f"present, held by pid {_holder_names(be, holders)}",
                      "it is exclusive: another open gets EBUSY; hand fds to `pyiommufd agent` "
                      "instead, or stop the holder", required=True))
        else:
            add(Check(luo.DEVICE, OK, "present, not held", required=True))

    try:
        cdevs = [n for n in be.files.listdir("/dev/vfio/devices") if n.startswith("vfio")]
    except OSError:
        cdevs = []
    add(Check("VFIO cdevs", OK if cdevs else WARN,
              ", ".join(f"/dev/vfio/devices/{n}" for n in cdevs) if cdevs else "none",
              "" if cdevs else "bind a device with `pyiommufd bind BDF` (needs CONFIG_VFIO_DEVICE_CDEV)"))

    config, source = read_kernel_config(be, release)
    add(Check("kernel config", INFO if config is not None else WARN, source,
              "" if config is not None else "config checks skipped"))
    if config is not None:
        for option, required, what in CONFIG_OPTIONS:
            value = config.get(option, "n")
            good = value in ("y", "m")
            status = OK if good else (FAIL if required else WARN)
            add(Check(f"CONFIG_{option}", status, value, "" if good else f"needed for {what}",
                      required=required))

    words = _cmdline(be)
    kho_param = _param(words, "kho")
    if be.files.exists("/sys/kernel/debug/kho"):
        kho = (OK, "on (/sys/kernel/debug/kho)")
    elif kho_param is not None and kho_param.lower() in _TRUE:
        kho = (OK, f"on (kho={kho_param})")
    elif kho_param is None and config is not None and \
            config.get("KEXEC_HANDOVER_ENABLE_DEFAULT") == "y":
        kho = (OK, "on (CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT)")
    elif kho_param is None and lu:
        kho = (OK, f"on ({luo.DEVICE} exists)")
    else:
        kho = (FAIL, "off" if kho_param is None else f"off (kho={kho_param})")
    add(Check("KHO enabled", kho[0], kho[1], "" if kho[0] == OK else "boot with kho=on", required=True))

    lu_param = _param(words, "liveupdate")
    if lu_param is not None and lu_param.lower() in _TRUE:
        add(Check("cmdline liveupdate=on", OK, f"liveupdate={lu_param}", required=True))
    else:
        add(Check("cmdline liveupdate=on", OK if lu else FAIL,
                  "absent" if lu_param is None else f"liveupdate={lu_param}",
                  "" if lu else "boot with liveupdate=on", required=True))

    intel = _param(words, "intel_iommu")
    default_on = config is not None and config.get("INTEL_IOMMU_DEFAULT_ON") == "y"
    if intel is not None and "on" in intel.split(","):
        add(Check("cmdline intel_iommu=on", OK, f"intel_iommu={intel}"))
    elif default_on and intel is None:
        add(Check("cmdline intel_iommu=on", OK, "absent (CONFIG_INTEL_IOMMU_DEFAULT_ON=y)"))
    else:
        add(Check("cmdline intel_iommu=on", WARN, "absent" if intel is None else f"intel_iommu={intel}",
                  "boot with intel_iommu=on for VT-d"))

    try:
        units = be.files.listdir("/sys/class/iommu")
    except OSError:
        units = []
    dmar = [n for n in units if n.startswith("dmar")]
    others = [n for n in units if not n.startswith("dmar")]
    value = ", ".join(dmar) or "none"
    if others:
        value += f" (other IOMMU units: {', '.join(others)})"
    add(Check("VT-d units", OK if dmar else WARN, value,
              "" if dmar else "the series preserves Intel VT-d domains only "
              "(QEMU: -device intel-iommu,intremap=on)"))

    checks.append(_lu_abi_check(be, iommu))

    checks.append(_agent_check())

    status, value = _memlock()
    add(Check("RLIMIT_MEMLOCK", status if euid != 0 else INFO, value,
              "" if status == OK or euid == 0 else
              "pinned DMA pages count against it: raise it or run as root (CAP_IPC_LOCK)"))
    return checks


def _agent_check() -> Check:
    """What a crash of the holder agent would lose (seen through its socket)."""
    from ..agent import AgentClient, AgentError
    from ..agent.client import crash_exposure

    client = AgentClient(timeout=2.0)
    try:
        st = client.status()
    except AgentError:
        return Check("agent crash safety", INFO, f"no agent on {client.socket_path}")
    safe, sentence = crash_exposure(st)
    return Check("agent crash safety", OK if safe else WARN, sentence,
                 "" if safe else "run the agent under systemd with contrib/systemd/pyiommufd-agent.service "
                 "(README: \"The agent under systemd\")")


def _lu_abi_check(be: Backend, iommu_present: bool) -> Check:
    from .. import abi

    if not iommu_present:
        return Check("LU ABI", WARN, "not probed (no /dev/iommu)")
    result = abi.probe_lu_abi(backend=be)
    if result.supported:
        return Check("LU ABI", OK, f"{result.status} at nr {result.nr:#x}", result.reason)
    upstream = " (upstream 7.3 gives 0x95 to IOMMU_IOAS_NOIOMMU_GET_PA)" \
        if result.nr == abi.DEFAULT_NR else ""
    hint = {
        "foreign": f"kernel lacks the series' IOMMU_HWPT_LU_* ioctl at nr {result.nr:#x}{upstream}; "
                   f"a kernel that moved it is probed with ${abi.ENV_NR}",
        "absent": "kernel lacks the series' IOMMU_HWPT_LU_* ioctl (or CONFIG_IOMMU_LIVEUPDATE=n)",
    }.get(result.status, result.reason)
    return Check("LU ABI", WARN, f"{result.status} at nr {result.nr:#x}", hint)


@click.command("doctor")
@json_option
def doctor(as_json: bool) -> None:
    """Check this host's readiness for IOMMU live update."""
    from ..backend import get_backend

    checks = run_checks(get_backend())
    failed = [c for c in checks if c.required and c.status == FAIL]
    message = f"{len(failed)} required check(s) failed: " + ", ".join(c.check for c in failed)
    if as_json:
        doc = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        if failed:
            doc["error"] = error_object(exitcodes.CHECK_FAILED, message)
        echo_json(doc)
    else:
        echo_table(([c.check, c.status, c.value, c.hint] for c in checks),
                   ["CHECK", "STATUS", "VALUE", "HINT"])
    if failed:
        exit_with(report_error(message, exitcodes.CHECK_FAILED))


# -- caps ---------------------------------------------------------------------

def probe_size0(be: Backend, fd: int, request: int) -> int | None:
    """Issue ``request`` with a struct whose ``size`` is 0: the dispatcher
    refuses it (EINVAL: known, ENOTTY: unknown) before any handler runs."""
    buf = bytearray(8)
    try:
        be.ioctl(fd, request, buf)
    except OSError as exc:
        return exc.errno
    return None


def _verdict(err: int | None) -> str:
    if err == E.EINVAL:
        return "known"
    if err == E.ENOTTY:
        return "unknown"
    return f"unexpected ({errname(err)})"


def run_caps(be: Backend) -> tuple[dict[str, Any], int]:
    """Probe every registered iommufd ioctl, the LUO ioctls and the LU ABI.
    Returns the report and the exit code."""
    from .. import abi, ioctl, luo  # noqa: F401 - luo registers the LUO ioctls

    for module in ("iommufd", "vfio"):  # register their ioctls
        try:
            __import__(f"pyiommufd.{module}")
        except ImportError:
            pass

    code = exitcodes.OK
    report: dict[str, Any] = {"kernel": be.kernel_release()}
    iommufd: dict[str, Any] = {"device": "/dev/iommu", "open": "ok", "ioctls": []}
    report["iommufd"] = iommufd
    lu_names = {rev.ioctl_name for rev in abi.REVISIONS.values()}  # the LU ABI row covers them
    defs = sorted((d for d in ioctl.REGISTRY.values() if d.interface == "iommufd"
                   and d.arg == ioctl.ARG_STRUCT and d.name not in lu_names), key=lambda d: d.nr)
    try:
        fd = be.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        iommufd["open"] = errname(exc.errno)
        code = exitcodes.UNSUPPORTED if exc.errno == E.ENOENT else exitcodes.for_errno(exc.errno)
        report["lu_abi"] = None
        for d in defs:
            iommufd["ioctls"].append({"name": d.name, "nr": f"{d.nr:#04x}", "status": "not probed",
                                      "errno": None})
    else:
        try:
            lu_probe = abi.probe_lu_abi(fd, backend=be)
            report["lu_abi"] = lu_probe.as_dict()
            for d in defs:
                err = probe_size0(be, fd, d.request)
                entry = {"name": d.name, "nr": f"{d.nr:#04x}", "status": _verdict(err),
                         "errno": errname(err)}
                if d.nr == lu_probe.nr and lu_probe.supported:
                    entry["status"] = "shadowed"
                    entry["note"] = (f"nr {d.nr:#04x} is the series' LU ioctl here "
                                     f"({lu_probe.status}), not {d.name} (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA)")
                elif d.nr == lu_probe.nr:
                    entry["note"] = "nr shared with the series' IOMMU_HWPT_LU_* ioctl (Linux 7.3 include/uapi/linux/iommufd.h: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA)"
                iommufd["ioctls"].append(entry)
        finally:
            be.close(fd)

    lu: dict[str, Any] = {"device": luo.DEVICE, "open": "ok", "ioctls": []}
    report["luo"] = lu
    device_level = [luo.CREATE_SESSION, luo.RETRIEVE_SESSION]
    session_level = [luo.PRESERVE_FD, luo.RETRIEVE_FD, luo.FINISH, luo.GET_NAME]
    try:
        fd = be.open(luo.DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        lu["open"] = errname(exc.errno)
        if exc.errno == E.EBUSY:
            holders = luo.holders_of(be)
            lu["held_by"] = holders
            lu["note"] = "held by another process (exclusive open); not probed"
        for d in device_level + session_level:
            lu["ioctls"].append({"name": d.name, "nr": f"{d.nr:#04x}", "status": "not probed",
                                 "errno": None})
    else:
        try:
            for d in device_level:
                err = probe_size0(be, fd, d.request)
                lu["ioctls"].append({"name": d.name, "nr": f"{d.nr:#04x}", "status": _verdict(err),
                                     "errno": errname(err)})
        finally:
            be.close(fd)
        for d in session_level:
            lu["ioctls"].append({"name": d.name, "nr": f"{d.nr:#04x}",
                                 "status": "not probed (needs a session fd)", "errno": None})
    return report, code


@click.command("caps")
@json_option
def caps(as_json: bool) -> None:
    """Probe, without side effects, the ioctls and the LU ABI revision this kernel has."""
    from ..backend import get_backend

    report, code = run_caps(get_backend())
    if as_json:
        if code != exitcodes.OK:
            report["error"] = error_object(code, f"cannot open /dev/iommu: {iommufd_open_reason(report)}")
        echo_json(report)
    else:
        rows = []
        iommufd, lu = report["iommufd"], report["luo"]
        if iommufd["open"] != "ok":
            rows.append(["/dev/iommu", "-", f"open: {iommufd['open']}", ""])
        for e in iommufd["ioctls"]:
            rows.append([e["name"], e["nr"], e["status"], e.get("note", "")])
        if report.get("lu_abi"):
            p = report["lu_abi"]
            rows.append(["IOMMU_HWPT_LU_* (LU ABI)", p["nr"], p["status"], p["reason"]])
        if lu["open"] != "ok":
            note = lu.get("note", "")
            if lu.get("held_by"):
                note = f"held by pid {', '.join(map(str, lu['held_by']))}"
            rows.append([lu["device"], "-", f"open: {lu['open']}", note])
        for e in lu["ioctls"]:
            rows.append([e["name"], e["nr"], e["status"], ""])
        click.echo(f"kernel {report['kernel']}")
        echo_table(rows, ["IOCTL", "NR", "STATUS", "NOTE"])
    if code != exitcodes.OK:
        raise CommandError(f"cannot open /dev/iommu: {iommufd_open_reason(report)}", code)


def iommufd_open_reason(report: dict[str, Any]) -> str:
    err: str = report["iommufd"]["open"]
    return {"ENOENT": "no such device (CONFIG_IOMMUFD, modprobe iommufd)",
            "EACCES": "permission denied (run as root)",
            "EPERM": "operation not permitted (run as root)"}.get(err, err)
