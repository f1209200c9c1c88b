"""The VMM live-update demonstration: a nested Linux guest survives a real
kexec of the test VM it runs in (``pyiommufd vm live-update-demo``).

The test VM runs the job's two stages, one per boot, each with the real
``pyiommufd`` commands:

1. start the holder agent; ``pyiommufd qemu launch demo`` (QEMU 11.1, the
   nested guest: our slim kernel and :mod:`pyiommufd.vm.nested_guest`'s
   initramfs, its console in the results share); wait for its ticks;
   ``pyiommufd qemu update demo --no-kexec``; exit, and the test VM's agent
   kexecs while the holder agent still holds the session;
2. a fresh holder agent; ``pyiommufd qemu resume demo``; wait until the guest
   has ticked and checked its RAM pattern again; check that it was never
   rebooted, that the session finished, that no fd leaked; ``pyiommufd qemu
   stop demo``.

Each stage writes ``vmm-demo-<n>.json`` into the results share;
:func:`run_demo` runs the VM from the host and returns :class:`DemoResult`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import nested_guest

NAME = "demo"
MEMORY = "128M"
#: ticks the nested guest must show before the update, and after the resume
TICKS_BEFORE = 5
TICKS_AFTER = nested_guest.CHECK_EVERY + 2
WAIT = 300.0
RESULTS_ENV = "PYIOMMUFD_VM_RESULTS"


def _results() -> Path:
    return Path(os.environ.get(RESULTS_ENV, "/run/pyiommufd-results"))


def nested_qemu_args(kernel: str, initrd: str, console: str) -> list[str]:
    """The nested guest's QEMU arguments (pyiommufd adds the RAM and QMP)."""
    return ["-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg", "-smp", "1",
            "-kernel", kernel, "-initrd", initrd, "-append", nested_guest.CMDLINE,
            "-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console"]


def _pyiommufd(*args: str) -> dict[str, Any]:
    """Run the ``pyiommufd`` command with ``--json``; its document, or exit."""
    argv = [sys.executable, "-m", "pyiommufd", *args[:2], "--json", *args[2:]]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=WAIT)
    shown = " ".join(a for a in args if not a.startswith("/"))
    print(f"$ pyiommufd {shown}  ({time.monotonic() - started:.1f} s, exit {proc.returncode})", flush=True)
    if proc.stderr.strip():
        print(proc.stderr.rstrip(), flush=True)
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        doc = {"error": {"message": f"no JSON from pyiommufd {args[0]}: {proc.stdout[-300:]!r}"}}
    if proc.returncode:
        raise SystemExit(f"vmm-demo: pyiommufd {' '.join(args[:2])} failed ({proc.returncode}): "
                         f"{doc.get('error', {}).get('message')}")
    return doc


def _console_text(console: Path) -> str:
    """The console log so far; the 9p results share answers ENODATA now and
    then while QEMU appends, so a failed read is tried again."""
    for _ in range(100):
        try:
            return console.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        except OSError:
            time.sleep(0.1)
    return console.read_text(errors="replace")


def _wait_console(console: Path, done: Callable[[nested_guest.ConsoleState], bool],
                  what: str) -> nested_guest.ConsoleState:
    deadline = time.monotonic() + WAIT
    while True:
        state = nested_guest.parse_console(_console_text(console))
        if done(state):
            return state
        if time.monotonic() > deadline:
            raise SystemExit(f"vmm-demo: the nested guest did not {what} within {WAIT:g} s; "
                             f"its console ends: {_console_text(console)[-400:]!r}")
        time.sleep(0.5)


def _agent_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _write(stage: int, record: dict[str, Any]) -> None:
    path = _results() / f"vmm-demo-{stage}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


PAGE = 4096
VIRTIO_NET = (0x1AF4, 0x1041)
VTD_DEBUGFS = "/sys/kernel/debug/iommu/intel"
#: guest physical 1 MiB..2 MiB: RAM on q35 (below it lie the VGA and BIOS holes)
HANDOFF_RANGE = (1 << 20, 1 << 20)


def _memfd_pfns(fd: int, offset: int, length: int) -> list[int]:
    """Physical frame of each page of a memfd range (root reads real PFNs)."""
    import mmap

    from .._uapi import ffi

    with mmap.mmap(fd, offset + length, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        view = ffi.from_buffer(mm)
        try:
            base = int(ffi.cast("uintptr_t", view))
        finally:
            ffi.release(view)
        for off in range(offset, offset + length, PAGE):
            mm[off]                                   # present in our page table
        with open("/proc/self/pagemap", "rb") as pm:
            pm.seek((base + offset) // PAGE * 8)
            raw = pm.read(length // PAGE * 8)
    return [int.from_bytes(raw[i:i + 8], "little") & ((1 << 55) - 1) for i in range(0, len(raw), 8)]


def _device_pfns(bdf: str, iova: int, length: int) -> list[int | None]:
    """What the device's VT-d second-stage table maps ``iova``..+length to
    (debugfs; a superpage leaf covers 512 or 512*512 pages)."""
    import re

    table: dict[int, int] = {}
    with open(f"{VTD_DEBUGFS}/{bdf}/domain_translation_struct") as f:
        for line in f:
            m = re.match(r"^0x([0-9a-f]+) \|\s+(.*)$", line)
            if not m:
                continue
            entries = [int(v, 16) for v in m.group(2).split()]
            leaf, pages = entries[-1], 1
            if leaf & (1 << 7):
                pages = 512 if len(entries) == 4 else 512 * 512
            for k in range(pages):
                table[int(m.group(1), 16) + k] = (leaf & (((1 << 52) - 1) & ~(PAGE - 1))) // PAGE + k
    return [table.get(iova // PAGE + i) for i in range(length // PAGE)]


def device_handoff(agent: Any) -> dict[str, Any]:
    """QEMU realizes vfio-pci from pyiommufd's iommufd and cdev fds: seen by
    QMP (query-pci) and by the kernel (the device's IOMMU maps the guest RAM)."""
    from ..pci import PciDevice, list_devices
    from ..qemu.liveupdate import RAM_TOKEN
    from ..qemu.monitor import Monitor

    bdf = next((d.bdf for d in list_devices() if (d.vendor, d.device) == VIRTIO_NET), None)
    if bdf is None:
        return {"error": "no virtio-net device in the test VM"}
    binding = PciDevice(bdf).bind_vfio()
    out: dict[str, Any] = {"bdf": bdf}
    try:
        launched = _pyiommufd("qemu", "launch", "handoff", "--memory", "64M", "--device", bdf, "--",
                              "-S", "-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg")
        try:
            mon = Monitor(launched["qmp_socket"], pid=launched["pid"])
            try:
                devices = [d for bus in mon.execute("query-pci") for d in bus["devices"]]
            finally:
                mon.close()
            listed = [d for d in devices if d.get("qdev_id") == "pyiommufd-dev0"]
            out["qmp"] = [{"qdev_id": d["qdev_id"], "vendor": d["id"]["vendor"], "device": d["id"]["device"],
                           "class": d.get("class_info", {}).get("desc")} for d in listed]
            offset, length = HANDOFF_RANGE
            ram_fd = agent.lend("handoff", [RAM_TOKEN])[RAM_TOKEN]
            try:
                ram = _memfd_pfns(ram_fd, offset, length)
            finally:
                os.close(ram_fd)
            mapped = _device_pfns(bdf, offset, length)
            out["pages"] = len(ram)
            out["translated"] = sum(1 for a, b in zip(ram, mapped) if a == b)
        finally:
            _pyiommufd("qemu", "stop", "handoff")
    finally:
        binding.restore()
    print(f"vmm-demo: QEMU realized {bdf} from pyiommufd's iommufd and cdev fds: QMP lists "
          f"{out.get('qmp')}; the device's IOMMU maps {out.get('translated')} of {out.get('pages')} "
          "guest RAM pages to the memfd's own", flush=True)
    return out


def guest_stage_1(kernel: str, initrd: str) -> int:
    from ..agent.client import ensure_running

    console = _results() / "nested-console.log"
    agent = ensure_running(timeout=180)
    agent_pid = int(agent.ping()["pid"])
    handoff = device_handoff(agent)
    launched = _pyiommufd("qemu", "launch", NAME, "--memory", MEMORY, "--",
                          *nested_qemu_args(kernel, initrd, str(console)))
    print(f"vmm-demo: QEMU {launched['pid']} runs the nested guest; waiting for {TICKS_BEFORE} ticks", flush=True)
    before = _wait_console(console, lambda s: bool(s.ticks) and s.ticks[-1].number >= TICKS_BEFORE,
                           f"tick {TICKS_BEFORE} times")
    updated = _pyiommufd("qemu", "update", NAME, "--no-kexec")
    status = agent.status()
    last = nested_guest.parse_console(_console_text(console)).last_tick
    assert last is not None
    print(f"vmm-demo: before the kexec the nested guest is at tick {last.number}, uptime {last.uptime:.2f} s",
          flush=True)
    _write(1, {"handoff": handoff, "launched": launched, "updated": updated, "agent_status": status,
               "qemu_alive_after_update": os.path.exists(f"/proc/{launched['pid']}/exe"),
               "agent_pid": agent_pid, "last_tick": last.number, "last_uptime": last.uptime,
               "boot_line_seen": bool(before.boots)})
    return 0


def guest_stage_2() -> int:
    from ..agent.client import ensure_running

    console = _results() / "nested-console.log"
    first = json.loads((_results() / "vmm-demo-1.json").read_text())
    agent = ensure_running(timeout=180)
    agent_pid = int(agent.ping()["pid"])
    fds_before = _agent_fds(agent_pid)
    resumed = _pyiommufd("qemu", "resume", NAME)
    after = _wait_console(console, lambda s: bool(s.checks) and s.checks[-1][0] > first["last_tick"]
                          and s.ticks[-1].number >= first["last_tick"] + TICKS_AFTER,
                          f"tick {TICKS_AFTER} times and check its RAM after the resume")
    status = agent.status()
    fds_resumed = _agent_fds(agent_pid)
    _pyiommufd("qemu", "stop", NAME)
    fds_stopped = _agent_fds(agent_pid)
    last = after.last_tick
    assert last is not None
    print(f"vmm-demo: after the kexec the nested guest is at tick {last.number}, uptime {last.uptime:.2f} s",
          flush=True)
    _write(2, {"resumed": resumed, "agent_status": status, "agent_fds": {
        "before_resume": fds_before, "after_resume": fds_resumed, "after_stop": fds_stopped}})
    return 0


# -- host side ---------------------------------------------------------------------------

@dataclass
class DemoResult:
    """What the demonstration showed, judged on the host from the guest's records."""
    ok: bool
    problems: list[str]
    ticks: list[nested_guest.Tick]
    boots: list[tuple[str, str]]
    checks: list[tuple[int, str]]
    tick_before: int | None
    tick_after: int | None
    blackout: dict[str, Any] | None
    stage_records: list[dict[str, Any]] = field(default_factory=list)
    vm_summary: str = ""
    kernel_release: str | None = None
    kexecs: int = 0

    def report(self) -> str:
        lines = [f"live-update demo on Linux {self.kernel_release or '?'}: "
                 f"{'nested guest survived the kexec' if self.ok else 'FAILED'}"]
        if self.tick_before is not None and self.tick_after is not None:
            lines.append(f"nested guest counter: {self.tick_before} before the host kexec, "
                         f"{self.tick_after} after it (boot id {self.boots[0][0] if self.boots else '?'}, "
                         f"booted {len(self.boots)} time(s))")
        if self.checks and self.boots:
            same = all(c[1] == self.boots[0][1] for c in self.checks)
            lines.append(f"RAM pattern sha256 {self.boots[0][1][:16]}…: {len(self.checks)} checks, "
                         f"{'all equal' if same else 'DIFFERENT'}")
        handoff = self.stage_records[0].get("handoff", {}) if self.stage_records else {}
        if handoff.get("qmp"):
            d = handoff["qmp"][0]
            lines.append(f"device hand-off: QEMU realized {handoff['bdf']} ({d['vendor']:04x}:{d['device']:04x} "
                         f"{d['class']}) from pyiommufd's iommufd and cdev fds; its IOMMU maps "
                         f"{handoff['translated']} of {handoff['pages']} guest RAM pages to the memfd's own")
        if self.blackout:
            from ..qemu.liveupdate import Blackout, Phase

            lines.append(Blackout(tuple(Phase.from_dict(p) for p in self.blackout["phases"])).table())
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def judge(console_text: str, records: list[dict[str, Any]]) -> tuple[list[str], nested_guest.ConsoleState]:
    """Everything the demonstration promises, as a list of what did not hold."""
    state = nested_guest.parse_console(console_text)
    problems: list[str] = []
    if len(records) < 2:
        return [f"the guest wrote {len(records)} of 2 stage records"], state
    first, second = records
    if len(state.boots) != 1:
        problems.append(f"the nested guest booted {len(state.boots)} times (a reboot restarts it)")
    numbers = [t.number for t in state.ticks]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append("the tick counter did not go on one by one from 1 (it restarted or jumped)")
    if {t.boot for t in state.ticks} != {b for b, _ in state.boots}:
        problems.append("ticks come from more than one boot of the nested guest")
    if any(b.uptime < a.uptime for a, b in zip(state.ticks, state.ticks[1:])):
        problems.append("the nested guest's uptime went backwards")
    after = [t for t in state.ticks if t.number > first["last_tick"]]
    if len(after) < TICKS_AFTER:
        problems.append(f"only {len(after)} ticks after the resume")
    if state.boots and not state.checks:
        problems.append("the nested guest never checked its RAM pattern")
    if state.boots and any(digest != state.boots[0][1] for _, digest in state.checks):
        problems.append("the RAM pattern's sha256 changed")
    if not [c for c in state.checks if c[0] > first["last_tick"]]:
        problems.append("no RAM check after the resume")
    if first.get("qemu_alive_after_update"):
        problems.append("QEMU still ran after the update")
    held = {s["name"]: s for s in first["agent_status"].get("sessions", []) if s.get("direction") == "outgoing"}
    tokens = {t["token"]: t for t in held.get(NAME, {}).get("tokens", [])}
    if sorted(tokens) != [0, 1, 2]:
        problems.append(f"before the kexec the session held tokens {sorted(tokens)}, not 0, 1, 2")
    elif tokens[2].get("kind") != "memfd":
        problems.append(f"the VM state was a {tokens[2].get('kind')}, not a memfd")
    handoff = first.get("handoff", {})
    if not any((d["vendor"], d["device"]) == VIRTIO_NET for d in handoff.get("qmp", [])):
        problems.append(f"QEMU did not realize the device from pyiommufd's fds: {handoff}")
    if not handoff.get("pages") or handoff.get("translated") != handoff.get("pages"):
        problems.append(f"the device's IOMMU maps {handoff.get('translated')} of {handoff.get('pages')} guest "
                        "RAM pages to the memfd's pages")
    if not first["updated"].get("state_bytes"):
        problems.append("the saved VM state is empty")
    after_status = {(s["name"], s["direction"]): s for s in second["agent_status"].get("sessions", [])}
    if (NAME, "incoming") in after_status:
        problems.append("the incoming session was not finished")
    rearmed = after_status.get((NAME, "outgoing"))
    if rearmed is None or [t["token"] for t in rearmed.get("tokens", [])] != [1]:
        problems.append("after the resume the guest RAM is not preserved alone in a new session")
    fds = second["agent_fds"]
    if fds["after_resume"] != fds["before_resume"] + 2:
        problems.append(f"the agent holds {fds['after_resume'] - fds['before_resume']} more fds after the "
                        "resume, not 2 (the new session and the guest RAM)")
    if fds["after_stop"] != fds["before_resume"]:
        problems.append(f"the agent leaked {fds['after_stop'] - fds['before_resume']} fds")
    return problems, state


def run_demo(kernel: str | None = None, *, nested_kernel: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 1200.0, progress: Callable[[str], None] | None = print) -> DemoResult:
    """Run the demonstration in a test VM on ``kernel`` (default: the stock
    7.3.4 build); the nested guest runs ``nested_kernel`` (default: the same
    slim stock kernel)."""
    from ..qemu import binary
    from . import runner
    from .kernel import resolve_kernel

    # fetched, and its features asked, on the host: the guest sees the cache read-only
    binary.resolve(progress=progress).missing(set(binary.Feature))
    nested = nested_kernel or str(resolve_kernel(None, progress=progress or (lambda _: None)).bzimage)
    initrd = str(nested_guest.build_initramfs())
    argv = [runner.python_executable(), "-m", "pyiommufd.vm.vmm_demo"]
    job = runner.command_job(argv + ["1", nested, initrd], kexec_stages=[argv + ["2"]], env=env)
    res = runner.run(job, kernel=kernel, timeout=timeout, progress=progress)
    records = []
    for n in (1, 2):
        path = res.share / f"vmm-demo-{n}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
    console = res.share / "nested-console.log"
    problems, state = judge(console.read_text(errors="replace") if console.exists() else "", records)
    if not res.ok:
        problems.insert(0, res.summary())
    before = records[0]["last_tick"] if records else None
    return DemoResult(not problems, problems, state.ticks, state.boots, state.checks, before,
                      state.ticks[-1].number if state.ticks else None,
                      records[1]["resumed"].get("blackout") if len(records) > 1 else None,
                      records, res.summary(), res.kernel_release,
                      sum(1 for b in res.boots if b.via == "kexec"))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["1"] and len(args) == 3:
        return guest_stage_1(args[1], args[2])
    if args == ["2"]:
        return guest_stage_2()
    print("usage: python -m pyiommufd.vm.vmm_demo 1 KERNEL INITRD | 2", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
