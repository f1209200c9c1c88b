"""The bad-input matrix over every command: each case runs ``pyiommufd ARGS``
through ``cli.main()`` against the fake kernel and checks the exact exit code,
exactly one ``pyiommufd: error:`` line on stderr (containing the expected
words) and no traceback anywhere.

Kernel set-ups: ``series`` (lu-v2, device on virtio-pci), ``bound`` (device
booted on vfio-pci, so /dev/vfio/devices/vfio0 exists), ``nonroot`` (bound,
euid 1000), ``busy`` (bound, /dev/liveupdate held open by this process before
the command runs), ``noqemu`` (no qemu-system-x86_64 on $PATH).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest

from pyiommufd import agent
from pyiommufd.backend import use
import cli_support
from pyiommufd.cli import COMMANDS
from pyiommufd_testing import FakeKernel, FakePciDevice

LONG = "x" * 64
HUGE_NAME = "n" * 10_000
NOT_UTF8 = "vm\udcff"      # what Python makes of the byte 0xff in argv
CDEV = "/dev/vfio/devices/vfio0"

PLANS = {
    "valid.toml": 'session = "s"\n[[memfd]]\nname = "a"\nsize = "1M"\n',
    "newline-session.json": '{"session": "vm\\n0", "memfd": [{"name": "a", "size": "1M"}]}',
    "bad.toml": "session = [\n",
    "bad.json": '{"session": \n',
    "unknown-key.json": '{"session": "s", "memfd": [{"name": "a", "size": "4K", "bogus": 1}]}',
    # the iommufd is preserved but the memfd its marked HWPT maps is not: PRESERVE_FD says ENOENT
    "huge-memfd.toml": 'session = "s"\n[[memfd]]\nname = "a"\nsize = 0x10000000000000000\n',
    "memfd-not-first.toml": """
session = "s"
lu_abi = "lu-v2"
[[memfd]]
name = "ram"
size = "1M"
preserve = false
[[iommufd]]
name = "i0"
  [[iommufd.ioas]]
  name = "ioas0"
  mappings = [{ memfd = "ram" }]
  [[iommufd.hwpt]]
  name = "hwpt0"
  ioas = "ioas0"
  device = "dev0"
  lu_token = 7
[[device]]
name = "dev0"
bdf = "0000:00:03.0"
hwpt = "hwpt0"
""",
    # dependencies are looked up only in the same session
    "split-session.toml": """
session = "s"
[[memfd]]
name = "ram"
size = "1M"
session = "other"
[[iommufd]]
name = "i0"
  [[iommufd.ioas]]
  name = "ioas0"
  mappings = [{ memfd = "ram" }]
""",
}


@dataclass
class Case:
    id: str
    argv: list[str]
    code: int
    words: str                  # must appear in the error line
    setup: str = "series"
    env: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None


CASES = [
    # -- bad BDF -----------------------------------------------------------------------------
    Case("selftest/bad-bdf", ["selftest", "zz:00.0"], 2, "not a PCI address"),
    Case("selftest/not-a-device", ["selftest", "eth0"], 2, "neither a VFIO cdev"),
    Case("bind/bad-bdf", ["bind", "00:03"], 2, "not a PCI address"),
    Case("unbind/bad-bdf", ["unbind", "0000:00:03.0/.."], 2, "not a PCI address"),
    Case("bind/bdf-device-above-1f", ["bind", "0000:00:20.0"], 2, "above 0x1f"),
    Case("preserve/bad-bdf", ["preserve", "--session", "s", "--device", "zz"], 2, "not a PCI address"),
    Case("plan/bad-bdf", ["plan", "--session", "s", "--device", "zz"], 2, "not a PCI address"),
    # -- missing device or node ----------------------------------------------------------------
    Case("selftest/missing-node", ["selftest", "/dev/vfio/devices/vfio9"], 2, "no such device node"),
    Case("selftest/missing-vfioN", ["selftest", "vfio9"], 2, "no such device node /dev/vfio/devices/vfio9"),
    Case("selftest/missing-pci", ["selftest", "0000:00:09.0"], 2, "no PCI device 0000:00:09.0"),
    Case("selftest/unbound", ["selftest", "0000:00:03.0"], 2, "has no VFIO cdev"),
    Case("selftest/not-a-cdev", ["selftest", "/dev/iommu"], 2, "not a VFIO device cdev"),
    Case("selftest/legacy-group", ["selftest", "/dev/vfio/3"], 2, "legacy VFIO group"),
    Case("bind/missing", ["bind", "0000:00:09.0"], 2, "no PCI device 0000:00:09.0"),
    Case("unbind/missing", ["unbind", "0000:00:09.0"], 2, "no PCI device 0000:00:09.0"),
    Case("preserve/missing-node", ["preserve", "--session", "s", "--device", "/dev/vfio/devices/vfio9"], 2,
         "vfio9"),
    Case("preserve/missing-pci", ["preserve", "--session", "s", "--device", "0000:00:09.0"], 2, "0000:00:09.0"),
    Case("selftest/missing-kexec-kernel", ["selftest", CDEV, "--kexec", "/nonexistent/bzImage"], 2,
         "no such file", setup="bound"),
    Case("kexec/missing-kernel", ["kexec", "--kernel", "/nonexistent/bzImage"], 2, "no such file"),
    Case("kexec/kernel-is-a-directory", ["kexec", "--kernel", "/boot"], 2, "is a directory"),
    Case("selftest/kexec-kernel-is-a-directory", ["selftest", CDEV, "--kexec", "/boot"], 2,
         "is a directory", setup="bound"),
    Case("vm-run/missing-kernel", ["vm", "run", "--kernel", "/nonexistent/bzImage", "--", "true"], 2,
         "no such file"),
    Case("vm-selftest/missing-kernel", ["vm", "selftest", "--kernel", "/nonexistent/bzImage"], 2,
         "no such file"),
    # -- not root --------------------------------------------------------------------------------
    Case("selftest/not-root", ["selftest", CDEV], 6, "EACCES", setup="nonroot"),
    Case("bind/not-root", ["bind", "0000:00:03.0"], 6, "needs root", setup="nonroot"),
    Case("unbind/not-root", ["unbind", "0000:00:03.0"], 6, "needs root", setup="nonroot"),
    Case("caps/not-root", ["caps"], 6, "permission denied", setup="nonroot"),
    Case("doctor/not-root", ["doctor"], 1, "required check(s) failed: root", setup="nonroot"),
    Case("preserve/not-root", ["preserve", "--session", "s", "--memfd", "a:4096"], 6, "EACCES",
         setup="nonroot"),
    Case("restore/not-root", ["restore", "--session", "s"], 6, "EACCES", setup="nonroot"),
    Case("kexec/not-root", ["kexec", "--kernel", "/boot/vmlinuz-7.3.4", "--load-only"], 6, "EPERM",
         setup="nonroot"),
    # -- session name too long (64 bytes) ----------------------------------------------------------
    Case("selftest/long-session", ["selftest", CDEV, "--session", LONG], 2, "63 bytes", setup="bound"),
    Case("selftest/empty-session", ["selftest", CDEV, "--session", ""], 2, "63 bytes", setup="bound"),
    Case("preserve/long-session", ["preserve", "--session", LONG, "--memfd", "a:4096"], 2, "63 bytes"),
    Case("restore/long-session", ["restore", "--session", LONG], 2, "63 bytes"),
    Case("finish/long-session", ["finish", "--session", LONG], 2, "63 bytes"),
    Case("plan/long-session", ["plan", "--session", LONG, "--memfd", "a:4096"], 2, "63 bytes"),
    Case("vm-selftest/long-session", ["vm", "selftest", "--session", LONG], 2, "63 bytes"),
    # -- token collisions ----------------------------------------------------------------------------
    Case("plan/token-collision", ["plan", "--session", "s", "--memfd", "a:4096:token=5",
                                  "--memfd", "b:4096:token=5"], 2, "token 0x5"),
    Case("preserve/token-collision", ["preserve", "--session", "s", "--memfd", "a:4096:token=5",
                                      "--memfd", "b:4096:token=5"], 2, "token 0x5"),
    Case("plan/token-0-reserved", ["plan", "--session", "s", "--memfd", "a:4096:token=0"], 2,
         "reserved for the pyiommufd manifest"),
    # -- wrong order in a plan -------------------------------------------------------------------------
    Case("plan/memfd-not-preserved-first", ["plan", "{tmp}/memfd-not-first.toml"], 2, "not preserved"),
    Case("preserve/memfd-not-preserved-first", ["preserve", "--plan", "{tmp}/memfd-not-first.toml"], 2,
         "not preserved"),
    Case("plan/split-session", ["plan", "{tmp}/split-session.toml"], 2, "one session"),
    # -- busy /dev/liveupdate ------------------------------------------------------------------------------
    Case("selftest/busy", ["selftest", CDEV], 5, "EBUSY", setup="busy"),
    Case("preserve/busy", ["preserve", "--session", "s", "--memfd", "a:4096"], 5, "EBUSY", setup="busy"),
    Case("restore/busy", ["restore", "--session", "s"], 5, "EBUSY", setup="busy"),
    # -- unknown LU ABI ----------------------------------------------------------------------------------------
    Case("selftest/unknown-lu-abi", ["selftest", CDEV, "--lu-abi", "v3"], 2, "unknown LU ABI revision 'v3'",
         setup="bound"),
    Case("selftest/unknown-lu-abi-env", ["selftest", CDEV], 2, "$PYIOMMUFD_LU_ABI", setup="bound",
         env={"PYIOMMUFD_LU_ABI": "lu-v9"}),
    Case("selftest/bad-lu-nr-env", ["selftest", CDEV], 2, "not an ioctl nr", setup="bound",
         env={"PYIOMMUFD_LU_NR": "nope"}),
    Case("plan/unknown-lu-abi", ["plan", "--session", "s", "--memfd", "a:4096", "--lu-abi", "v3"], 2, "v3"),
    Case("preserve/unknown-lu-abi", ["preserve", "--session", "s", "--memfd", "a:4096", "--lu-abi", "v3"], 2,
         "v3"),
    Case("vm-selftest/unknown-lu-abi", ["vm", "selftest", "--lu-abi", "v3"], 2, "unknown LU ABI revision"),
    # -- malformed plan files -------------------------------------------------------------------------------------
    Case("plan/bad-toml", ["plan", "{tmp}/bad.toml"], 2, "not valid TOML"),
    Case("plan/bad-json", ["plan", "{tmp}/bad.json"], 2, "not valid JSON"),
    Case("plan/unknown-key", ["plan", "{tmp}/unknown-key.json"], 2, "unknown key"),
    Case("plan/missing-file", ["plan", "{tmp}/nonexistent.toml"], 2, "cannot read plan"),
    Case("preserve/bad-toml", ["preserve", "--plan", "{tmp}/bad.toml"], 2, "not valid TOML"),
    Case("preserve/plan-and-options", ["preserve", "--plan", "{tmp}/bad.toml", "--memfd", "a:4096"], 2,
         "not both"),
    # -- conflicting or missing options -----------------------------------------------------------------------------
    Case("selftest/kexec-and-hold", ["selftest", CDEV, "--kexec", "/boot/vmlinuz-7.3.4", "--hold"], 2,
         "exclude each other", setup="bound"),
    Case("selftest/initrd-without-kexec", ["selftest", CDEV, "--initrd", "/boot/initrd.img-7.3.4"], 2,
         "go with --kexec", setup="bound"),
    Case("kexec/no-kernel", ["kexec"], 2, "--kernel PATH is required"),
    Case("kexec/cmdline-and-reuse", ["kexec", "--kernel", "/boot/vmlinuz-7.3.4", "--cmdline", "x",
                                     "--reuse-cmdline"], 2, "not both"),
    Case("finish/no-session", ["finish"], 2, "--session NAME is required"),
    Case("vm-run/zero-timeout", ["vm", "run", "--timeout", "0", "--", "true"], 2, "--timeout"),
    Case("vm-build-kernel/zero-jobs", ["vm", "build-kernel", "--jobs", "0"], 2, "--jobs"),
    Case("vm-guest-selftest/outside-guest", ["vm", "guest-selftest", "--stage", "1"], 2, "only inside"),
    # -- missing tools and services ----------------------------------------------------------------------------------
    Case("vm-run/no-qemu", ["vm", "run", "--", "true"], 4, "qemu-system-x86_64 not found", setup="noqemu"),
    Case("vm-selftest/no-qemu", ["vm", "selftest"], 4, "qemu-system-x86_64 not found", setup="noqemu"),
    Case("status/no-agent", ["status"], 7, "no pyiommufd agent answers"),
    Case("finish/no-agent", ["finish", "--session", "s"], 7, "no pyiommufd agent answers"),
    Case("agent-status/no-agent", ["agent", "status"], 7, "no pyiommufd agent answers"),
    # -- found by trying (issue 10) ----------------------------------------------------------------------------------
    Case("plan/memfd-size-above-2^64", ["plan", "--session", "s", "--memfd", "a:0x10000000000000000"], 2,
         "more than the largest size"),
    Case("plan/memfd-size-above-off_t", ["plan", "--session", "s", "--memfd", "a:0x8000000000000000"], 2,
         "more than the largest size, 0x7fffffffffffffff"),
    Case("plan/memfd-size-huge-in-file", ["plan", "{tmp}/huge-memfd.toml"], 2, "more than the largest size"),
    Case("preserve/memfd-size-above-2^64", ["preserve", "--session", "s", "--memfd", "a:99999999999999999999T"],
         2, "more than the largest size"),
    Case("plan/iova-without-iommufd", ["plan", "--session", "s", "--memfd", "a:1M", "--iova", "0x100000"], 2,
         "--iova places the memfds in an IOAS"),
    Case("preserve/iova-without-iommufd", ["preserve", "--session", "s", "--memfd", "a:1M", "--iova", "0"], 2,
         "give --iommufd or --device"),
    Case("plan/iova-past-64-bits", ["plan", "--session", "s", "--memfd", "a:1M", "--iommufd",
                                    "--iova", "0xfffffffffffff000"], 2, "ends past the 64-bit IOVA space"),
    Case("plan/bogus-lu-abi-env", ["plan", "--session", "s", "--memfd", "a:1M"], 2, "$PYIOMMUFD_LU_ABI",
         env={"PYIOMMUFD_LU_ABI": "bogus"}),
    Case("plan/bogus-lu-abi-env-with-file", ["plan", "{tmp}/split-session.toml"], 2, "$PYIOMMUFD_LU_ABI",
         env={"PYIOMMUFD_LU_ABI": "bogus"}),
    Case("preserve/bogus-lu-abi-env", ["preserve", "--session", "s", "--memfd", "a:1M"], 2,
         "unknown LU ABI revision 'bogus'", env={"PYIOMMUFD_LU_ABI": "bogus"}),
    Case("plan/bad-lu-nr-env", ["plan", "--session", "s", "--memfd", "a:1M"], 2, "$PYIOMMUFD_LU_NR",
         env={"PYIOMMUFD_LU_NR": "nope"}),
    Case("plan/non-utf8-session", ["plan", "--session", NOT_UTF8, "--memfd", "a:1M"], 2, "not valid UTF-8"),
    Case("preserve/non-utf8-session", ["preserve", "--session", NOT_UTF8, "--memfd", "a:1M"], 2,
         "'vm\\xff' is not valid UTF-8"),
    Case("selftest/non-utf8-session", ["selftest", CDEV, "--session", NOT_UTF8], 2, "not valid UTF-8",
         setup="bound"),
    Case("restore/non-utf8-session", ["restore", "--session", NOT_UTF8], 2, "not valid UTF-8"),
    Case("finish/non-utf8-session", ["finish", "--session", NOT_UTF8], 2, "not valid UTF-8"),
    Case("plan/10000-character-session", ["plan", "--session", HUGE_NAME, "--memfd", "a:1M"], 2,
         "(10000 characters) is 10000"),
    Case("restore/10000-character-session", ["restore", "--session", HUGE_NAME], 2, "63 bytes"),
    Case("bind/10000-character-bdf", ["bind", HUGE_NAME], 2, "[10002 characters]"),
    Case("restore/exec-unbalanced-placeholder", ["restore", "--session", "s", "--exec", "--", "vmm", "{ram"], 2,
         "unbalanced brace"),
    Case("restore/exec-empty-placeholder", ["restore", "--session", "s", "--exec", "--", "vmm", "fd={}"], 2,
         "placeholder {} is not a token"),
    Case("restore/no-liveupdate", ["restore", "--session", "s"], 4, "no /dev/liveupdate", setup="noluo"),
    Case("vm-run/infinite-timeout", ["vm", "run", "--timeout", "inf", "--", "true"], 2, "--timeout"),
    Case("vm-run/bad-memory", ["vm", "run", "--memory", "lots", "--", "true"], 2, "--memory 'lots'"),
    Case("vm-run/blank-append", ["vm", "run", "--append", "a b", "--", "true"], 2, "--append"),
    # -- qemu: the VMM live update ---------------------------------------------------------------
    Case("qemu-launch/bad-memory", ["qemu", "launch", "vm0", "--memory", "3M", "--", "-S"], 2, "multiple of 2 MiB"),
    Case("qemu-launch/words-for-memory", ["qemu", "launch", "vm0", "--memory", "lots"], 2, "--memory 'lots'"),
    Case("qemu-launch/owned-m", ["qemu", "launch", "vm0", "--", "-m", "512"], 2, "QEMU option -m"),
    Case("qemu-launch/owned-incoming", ["qemu", "launch", "vm0", "--", "-incoming", "defer"], 2, "-incoming"),
    Case("qemu-launch/memory-backend", ["qemu", "launch", "vm0", "--", "-machine", "q35,memory-backend=r"], 2,
         "memory-backend="),
    Case("qemu-launch/long-name", ["qemu", "launch", LONG], 2, "session name"),
    Case("qemu-launch/newline-name", ["qemu", "launch", "vm\n0"], 2, "control character \\n"),
    Case("qemu-launch/bad-device", ["qemu", "launch", "vm0", "--device", "zz"], 2, "not a PCI address"),
    Case("qemu-launch/missing-qemu", ["qemu", "launch", "vm0", "--qemu", "/nonexistent/qemu"], 2,
         "--qemu /nonexistent/qemu: no such executable"),
    Case("qemu-launch/missing-qemu-env", ["qemu", "launch", "vm0"], 2, "$PYIOMMUFD_QEMU /nonexistent/qemu",
         env={"PYIOMMUFD_QEMU": "/nonexistent/qemu"}),
    Case("qemu-update/unknown-vm", ["qemu", "update", "nosuch", "--no-kexec"], 2, "no VM 'nosuch' was launched"),
    Case("qemu-update/kexec-or-not", ["qemu", "update", "vm0"], 2, "--kernel FILE"),
    Case("qemu-update/initrd-alone", ["qemu", "update", "vm0", "--no-kexec", "--initrd", "/x"], 2, "--kernel"),
    Case("qemu-abort/unknown-vm", ["qemu", "abort", "nosuch", "--qemu", "/bin/true"], 2, "no VM 'nosuch'"),
    Case("qemu-stop/unknown-vm", ["qemu", "stop", "nosuch"], 2, "no VM 'nosuch'"),
    Case("vm-live-update-demo/missing-kernel", ["vm", "live-update-demo", "--kernel", "/nonexistent/bzImage"], 2,
         "no such file"),
    # -- operators and newcomers (issue 19) ----------------------------------------------------------------
    # `plan` takes its file as an argument, `preserve` as --plan
    Case("plan/empty-session", ["plan", "--session", "", "--memfd", "a:1M"], 2,
         "--session NAME is required (or a plan FILE)"),
    Case("plan/no-session", ["plan", "--memfd", "a:1M"], 2, "--session NAME is required (or a plan FILE)"),
    Case("plan/nothing-to-plan", ["plan", "--session", "s"], 2, "--device BDF|CDEV (or a plan FILE)"),
    Case("preserve/empty-session", ["preserve", "--session", "", "--memfd", "a:1M"], 2,
         "--session NAME is required (or --plan FILE)"),
    # a --session that differs from the plan file's is refused, not silently taken
    Case("plan/file-and-other-session", ["plan", "{tmp}/valid.toml", "--session", "x"], 2,
         "--session 'x' differs from the plan's session 's'"),
    Case("preserve/file-and-other-session", ["preserve", "--plan", "{tmp}/valid.toml", "--session", "x"], 2,
         "--session 'x' differs from the plan's session 's'"),
    # control characters in a session name, wherever one is taken
    Case("plan/newline-session", ["plan", "--session", "vm\n0", "--memfd", "a:1M"], 2,
         "'vm\\n0' contains the control character \\n"),
    Case("plan/newline-session-in-file", ["plan", "{tmp}/newline-session.json"], 2,
         "'vm\\n0' contains the control character \\n"),
    Case("plan/control-session", ["plan", "--session", "vm\x01", "--memfd", "a:1M"], 2,
         "control character \\x01"),
    Case("preserve/newline-session", ["preserve", "--session", "vm\n0", "--memfd", "a:1M"], 2,
         "control character \\n"),
    Case("preserve/control-session", ["preserve", "--session", "\x01vm", "--memfd", "a:1M"], 2,
         "control character \\x01"),
    Case("restore/newline-session", ["restore", "--session", "vm\n0"], 2, "control character \\n"),
    Case("restore/control-session", ["restore", "--session", "vm\x01"], 2, "control character \\x01"),
    Case("finish/newline-session", ["finish", "--session", "vm\n0"], 2, "control character \\n"),
    Case("finish/control-session", ["finish", "--session", "vm\x01"], 2, "control character \\x01"),
    Case("selftest/newline-session", ["selftest", CDEV, "--session", "vm\n0"], 2, "control character \\n",
         setup="bound"),
    Case("vm-selftest/newline-session", ["vm", "selftest", "--session", "vm\n0"], 2, "control character \\n"),
    Case("restore/long-newline-session", ["restore", "--session", "\n" * 70], 2, "63 bytes"),
    # a key given twice in a --memfd spec; a --device spec has no keys at all
    Case("plan/memfd-token-twice", ["plan", "--session", "s", "--memfd", "a:4096:token=1:token=2"], 2,
         "'token' given twice"),
    Case("preserve/memfd-token-twice", ["preserve", "--session", "s", "--memfd", "a:4096:token=1:token=2"], 2,
         "'token' given twice"),
    Case("plan/memfd-fill-twice", ["plan", "--session", "s", "--memfd", "a:4096:fill=zero:fill=random:7"], 2,
         "'fill' given twice"),
    Case("plan/device-with-keys", ["plan", "--session", "s", "--device", "0000:00:03.0:token=1:token=2"], 2,
         "not a PCI address"),
]


@pytest.fixture
def env(monkeypatch, tmp_path):
    sockdir = tempfile.mkdtemp(prefix="pyiommufd-t", dir="/tmp")
    sock = os.path.join(sockdir, "agent.sock")
    monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", sock)
    monkeypatch.setenv("PYIOMMUFD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYIOMMUFD_CACHE", str(tmp_path / "cache"))
    for name in ("PYIOMMUFD_LU_ABI", "PYIOMMUFD_LU_NR", "PYIOMMUFD_DEBUG", "PYIOMMUFD_IN_GUEST",
                 "PYIOMMUFD_VM_SIMULATE"):
        monkeypatch.delenv(name, raising=False)
    for name, text in PLANS.items():
        (tmp_path / name).write_text(text)
    yield tmp_path
    server = agent.in_process_agents().get(sock)
    if server is not None:
        server.shutdown(release=False)
    shutil.rmtree(sockdir, ignore_errors=True)


def _kernel(setup: str) -> FakeKernel:
    if setup == "noluo":
        return FakeKernel(lu_abi="lu-v2", liveupdate=False)
    if setup in ("bound", "busy"):
        return FakeKernel(lu_abi="lu-v2", devices=[FakePciDevice(driver="vfio-pci")])
    if setup == "nonroot":
        return FakeKernel(lu_abi="lu-v2", euid=1000, devices=[FakePciDevice(driver="vfio-pci")])
    return FakeKernel(lu_abi="lu-v2")


def run_cli(capsys, argv):
    return tuple(cli_support.run_cli(capsys, *argv))


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)] if c.xfail else [])
    for c in CASES])
def test_bad_input(case, env, capsys, monkeypatch):
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.setup == "noqemu":
        import shutil as shutil_mod
        real_which = shutil_mod.which
        monkeypatch.setattr(shutil_mod, "which",
                            lambda name, *a, **kw: None if name.startswith("qemu") else real_which(name, *a, **kw))
    argv = [a.replace("{tmp}", str(env)) for a in case.argv]
    with _kernel(case.setup) as k, use(k):
        held = k.open("/dev/liveupdate") if case.setup == "busy" else None
        try:
            code, out, err = run_cli(capsys, argv)
        finally:
            if held is not None:
                k.close(held)
        boots = k.boot_count
    assert "Traceback" not in out + err
    assert code == case.code, (out, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("pyiommufd: error:")]
    assert len(errors) == 1, err
    assert case.words in errors[0], errors[0]
    assert all(ln.startswith("pyiommufd: ") for ln in err.splitlines()), err    # nothing split it
    assert len(errors[0]) < 600, "long input is cut, not repeated whole"
    assert boots == 1                       # no bad input ever reboots the (fake) machine
    # nothing left behind: no agent answers afterwards
    assert not agent.AgentClient(os.environ["PYIOMMUFD_AGENT_SOCKET"]).is_running()


# --json goes before `--`; the missing-QEMU cases patch PATH; guest-selftest is internal (hidden)
JSON_CASES = [c for c in CASES if c.code != 0 and "--" not in c.argv and c.setup != "noqemu"
              and "guest-selftest" not in c.argv]


@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.parametrize("case", JSON_CASES, ids=lambda c: c.id)
def test_bad_input_with_json_puts_the_error_object_on_stdout(case, where, env, capsys, monkeypatch):
    """The same failures with --json, after the subcommand's arguments or
    before the subcommand: stdout is one JSON document whose error object
    carries the exit code and the message of the stderr line."""
    import json

    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = [a.replace("{tmp}", str(env)) for a in case.argv]
    argv = argv + ["--json"] if where == "after" else ["--json"] + argv
    with _kernel(case.setup) as k, use(k):
        held = k.open("/dev/liveupdate") if case.setup == "busy" else None
        try:
            code, out, err = run_cli(capsys, argv)
        finally:
            if held is not None:
                k.close(held)
    assert code == case.code, (out, err)
    doc = json.loads(out)
    error = doc["error"]
    assert error["code"] == code and case.words in error["message"]
    assert set(error) == {"code", "errno", "errname", "message"}


def test_matrix_covers_every_command():
    """Every registered command (and the vm subcommands) has at least one bad-input case."""
    covered = {c.argv[0] if c.argv[0] not in ("vm", "qemu") else f"{c.argv[0]} {c.argv[1]}" for c in CASES}
    # `devices` takes no input to get wrong (see below); `exit-codes` neither; `qemu status` and
    # `qemu fetch` take none either
    expected = ((set(COMMANDS) - {"vm", "qemu", "exit-codes", "devices"})
                | {"vm run", "vm selftest", "vm build-kernel", "vm live-update-demo"}
                | {"qemu launch", "qemu update", "qemu abort", "qemu stop"})
    missing = expected - covered
    assert not missing, f"no bad-input case for: {sorted(missing)}"


@pytest.mark.parametrize("argv, words", [
    (["selftest"], "Missing argument"),
    (["bind"], "Missing argument"),
    (["nosuch-command"], "No such command"),
    (["devices", "--bogus"], "No such option"),
    (["vm", "run", "--timeout", "abc", "--", "true"], "not a valid float"),
    (["vm", "run"], "Missing argument"),
])
def test_click_usage_errors_exit_2(env, capsys, argv, words):
    """Errors click itself detects: exit 2 and click's usage text, never a traceback.
    (cli.main() prints these in click's own format, not as one `pyiommufd: error:` line.)"""
    with FakeKernel() as k, use(k):
        code, out, err = run_cli(capsys, argv)
    assert code == 2
    assert words in err and "Traceback" not in out + err


def test_devices_has_no_bad_input_but_works_unprivileged(env, capsys):
    """`devices` takes no arguments beyond --json; it reads sysfs only, so it works as non-root."""
    with _kernel("nonroot") as k, use(k):
        code, out, err = run_cli(capsys, ["devices"])
    assert code == 0 and err == "" and CDEV in out


def _all_commands(group=None, prefix=()):
    import click

    from pyiommufd.cli import cli

    group = group or cli
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command.hidden:
            continue
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, prefix + (name,))


def test_every_command_takes_json():
    import click

    # a group that only dispatches (`vm`) has no output of its own
    missing = [" ".join(path) for path, command in _all_commands()
               if not (isinstance(command, click.Group) and not command.invoke_without_command)
               and "--json" not in {opt for p in command.params for opt in p.opts}]
    assert not missing, f"no --json on: {missing}"
    assert len(list(_all_commands())) >= 19


@pytest.mark.parametrize("argv", [["doctor"], ["exit-codes"], ["devices"], ["agent", "status"],
                                  ["plan", "--session", "s", "--memfd", "a:1M"]])
def test_json_before_the_subcommand_is_the_subcommands_json(env, capsys, argv):
    """The help says every command takes --json: before the subcommand too,
    with the same exit code and the same document (and a group's subcommand
    gets it as well)."""
    import json

    with _kernel("bound") as k, use(k):
        after = run_cli(capsys, argv + ["--json"])
        before = run_cli(capsys, ["--json"] + argv)
    assert before[0] == after[0] and "No such option" not in before[2]
    assert json.loads(before[1]) == json.loads(after[1])


def test_a_session_that_repeats_the_plan_files_is_accepted(env, capsys):
    """Only a --session that differs from the plan file's is refused."""
    with _kernel("series") as k, use(k):
        code, out, err = run_cli(capsys, ["plan", str(env / "valid.toml"), "--session", "s"])
    assert code == 0 and "plan for session 's'" in out, err


def test_debug_after_the_subcommand_adds_a_traceback_and_keeps_the_exit_code(env, capsys):
    argv = ["restore", "--session", LONG]
    with FakeKernel() as k, use(k):
        plain = run_cli(capsys, argv)
        after = run_cli(capsys, argv + ["--debug"])
        before = run_cli(capsys, ["--debug"] + argv)
    assert plain[0] == after[0] == before[0] == 2
    assert "Traceback" in after[2] and "Traceback" in before[2] and "Traceback" not in plain[2]
    assert [ln for ln in after[2].splitlines() if ln.startswith("pyiommufd: error:")] == \
        [ln for ln in plain[2].splitlines() if ln.startswith("pyiommufd: error:")]


@pytest.mark.parametrize("extra", [[], ["--json"], ["--debug"]])
def test_an_unexpected_exception_is_an_internal_error_with_its_own_code(env, capsys, monkeypatch, extra):
    import json

    from pyiommufd import planner
    from pyiommufd import exitcodes

    def broken(*a, **kw):
        raise KeyError("boom")

    monkeypatch.setattr(planner, "report", broken)
    with FakeKernel() as k, use(k):
        code, out, err = run_cli(capsys, ["plan", "--session", "s", "--memfd", "a:1M"] + extra)
    assert code == exitcodes.INTERNAL_ERROR == 70
    [line] = [ln for ln in err.splitlines() if ln.startswith("pyiommufd: internal error:")]
    assert "KeyError" in line
    assert ("Traceback" in err) == ("--debug" in extra)
    if "--json" in extra:
        assert json.loads(out)["error"]["code"] == 70


def test_restore_exec_with_an_unknown_name_stops_only_an_agent_holding_nothing(env, capsys):
    """No incoming session: the agent restore started holds nothing and is stopped."""
    sock = os.environ["PYIOMMUFD_AGENT_SOCKET"]
    with FakeKernel(lu_abi="lu-v2") as k, use(k):
        code, out, err = run_cli(capsys, ["restore", "--session", "vm0", "--exec", "--", "vmm", "{nope}"])
        assert code == 3 and "no incoming session" in err
        assert not agent.AgentClient(sock).is_running()
        agent.in_process_agents()[sock].shutdown(release=False)  # its thread, before the kernel goes
