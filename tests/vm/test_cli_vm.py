"""The ``pyiommufd`` command on the real 7.3 kernel, in the guest.

Every command runs as a subprocess: the installed console script next to the
interpreter (the guest sees the host's ``/`` read-only, with the checkout's
``src`` first on ``PYTHONPATH``), else ``python3 -c 'from pyiommufd.cli import
main; main()'`` (there is no ``python3 -m pyiommufd``).

A CLI process costs about 6 s under TCG, so each test runs the commands it is
about and checks the rest directly (sysfs, the agent over its socket).

The kexec test drives the whole lifecycle through the holder agent: stage 1
``agent --background`` + ``preserve`` + ``status``, stage 2 ``agent
--background`` + ``restore --verify --exec`` + ``finish`` + ``agent stop``.
``/dev/liveupdate`` is exclusive and the plugin's
pytest process holds the run's one open file (``lu_stage.liveupdate``), which
other kexec tests keep using. So the agent cannot open it; instead the test
*shares* that open file with the agent: ``AgentClient.adopt(liveupdate=...)``
sends it by SCM_RIGHTS. The kernel's exclusivity is per open (``luo_open``
sets ``in_use``, ``luo_release`` clears it when the last reference goes) and
nothing else about the file is per process, so both processes use the same
open file, and it no longer matters in which order the kexec tests run.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

CLI_TIMEOUT = 180
VIRTIO_VENDOR = 0x1AF4
NETWORK_CLASS = 0x02


def find_virtio_net() -> str | None:
    """The guest's virtio-net (the device behind the vIOMMU; as tests/vm/conftest.py)."""
    from pyiommufd.pci import list_devices

    for info in list_devices():
        if info.vendor == VIRTIO_VENDOR and info.class_code is not None and \
                info.class_code >> 16 == NETWORK_CLASS:
            return info.bdf
    return None


def cli_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "pyiommufd")
    if os.access(script, os.X_OK):
        return [script]
    found = shutil.which("pyiommufd")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'pyiommufd'; "
            "from pyiommufd.cli import main; main()"]


def cli(*args: str, env: dict | None = None, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``pyiommufd ARGS``; check the exit code unless ``expect`` is None."""
    proc = subprocess.run(cli_command() + list(args), capture_output=True, text=True,
                          env=env, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    print(f"$ pyiommufd {' '.join(args)}  -> exit {proc.returncode}")
    if expect is not None and proc.returncode != expect:
        pytest.fail(f"pyiommufd {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                    f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}", pytrace=False)
    return proc


def cli_json(*args: str, env: dict | None = None, expect: int | None = 0):
    proc = cli(*args, "--json", env=env, expect=expect)
    try:
        return json.loads(proc.stdout), proc
    except ValueError:
        pytest.fail(f"pyiommufd {' '.join(args)} --json printed no JSON:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)


def _config_has(option: str) -> bool:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return any(line.strip() == f"CONFIG_{option}=y" for line in f)
    except OSError:
        return False


def test_doctor_json():
    import pyiommufd

    report, _ = cli_json("doctor")
    print(f"entry: {cli_command()[0]} (pyiommufd from {os.path.dirname(pyiommufd.__file__)} on "
          "PYTHONPATH; there is no `python3 -m pyiommufd`)")
    checks = {c["check"]: c for c in report["checks"]}
    print("\n".join(f"  {c['check']}: {c['status']} {c['value']}" for c in report["checks"]))
    assert report["ok"] is True
    assert checks["root"]["status"] == "ok"
    assert checks["kernel release"]["value"] == os.uname().release
    assert checks["/dev/iommu"]["status"] == "ok"
    assert checks["/dev/liveupdate"]["status"] == "ok"
    assert checks["/dev/liveupdate"]["value"] == "present, not held"
    for option in ("IOMMUFD", "VFIO_DEVICE_CDEV", "LIVEUPDATE", "LIVEUPDATE_MEMFD", "KEXEC_HANDOVER",
                   "KEXEC_FILE", "INTEL_IOMMU"):
        assert checks[f"CONFIG_{option}"]["status"] == "ok", checks[f"CONFIG_{option}"]
    assert checks["KHO enabled"]["status"] == "ok"
    assert checks["cmdline liveupdate=on"] == dict(checks["cmdline liveupdate=on"], status="ok",
                                                    value="liveupdate=on")
    assert checks["cmdline intel_iommu=on"]["status"] == "ok"
    units = checks["VT-d units"]
    assert units["status"] == "ok" and "dmar" in units["value"]
    dmar = sorted(n for n in os.listdir("/sys/class/iommu") if n.startswith("dmar"))
    others = sorted(n for n in os.listdir("/sys/class/iommu") if not n.startswith("dmar"))
    assert units["value"].split(" (")[0].split(", ") == dmar
    for name in others:  # e.g. CONFIG_IOMMUFD_TEST's iommufd_selftest_iommu.0
        assert "other IOMMU units: " in units["value"] and name in units["value"]
    lu_abi = checks["LU ABI"]
    if _config_has("IOMMU_LIVEUPDATE"):
        assert lu_abi["status"] == "ok" and lu_abi["value"].startswith(("lu-v1", "lu-v2")), lu_abi
    else:   # stock 7.3: nr 0x95 is IOMMU_IOAS_NOIOMMU_GET_PA
        assert lu_abi["status"] == "warn" and lu_abi["value"] == "foreign at nr 0x95", lu_abi
        assert checks["CONFIG_IOMMU_LIVEUPDATE"]["status"] == "warn"
    print(f"doctor: ok; VT-d {units['value']}; LU ABI {lu_abi['value']}")


def test_caps_json():
    report, _ = cli_json("caps")
    assert report["kernel"] == os.uname().release
    iommufd = report["iommufd"]
    assert iommufd["open"] == "ok"
    names = {e["name"]: e for e in iommufd["ioctls"]}
    unknown = [e["name"] for e in iommufd["ioctls"] if e["status"] != "known"]
    assert not unknown, f"7.3 knows every iommufd ioctl we define: {unknown}"
    for name in ("IOMMU_IOAS_ALLOC", "IOMMU_IOAS_MAP_FILE", "IOMMU_HWPT_ALLOC", "IOMMU_IOAS_NOIOMMU_GET_PA"):
        assert name in names
    assert names["IOMMU_IOAS_NOIOMMU_GET_PA"]["nr"] == "0x95"
    if not _config_has("IOMMU_LIVEUPDATE"):
        assert report["lu_abi"]["status"] == "foreign" and report["lu_abi"]["nr"] == "0x95", report["lu_abi"]
    lu = report["luo"]
    assert lu["open"] == "ok", lu
    verdicts = {e["name"]: e["status"] for e in lu["ioctls"]}
    assert verdicts["LIVEUPDATE_IOCTL_CREATE_SESSION"] == "known"
    assert verdicts["LIVEUPDATE_IOCTL_RETRIEVE_SESSION"] == "known"
    print(f"caps: {len(names)} iommufd ioctls known, LU ABI {report['lu_abi']['status']}, "
          f"LUO device ioctls known")


def test_devices_json_finds_the_virtio_net():
    listing, _ = cli_json("devices")
    bdf = find_virtio_net()
    assert bdf is not None
    dev = next((d for d in listing if d["bdf"] == bdf), None)
    assert dev is not None, [d["bdf"] for d in listing]
    assert dev["vendor"] == f"{VIRTIO_VENDOR:04x}"
    assert int(dev["class"], 16) >> 16 == NETWORK_CLASS
    assert dev["iommu_group"] is not None
    virtio = [d["bdf"] for d in listing if d["vendor"] == f"{VIRTIO_VENDOR:04x}"]
    print(f"devices: {len(listing)} PCI devices; virtio-net {bdf} on {dev['driver']}, IOMMU group "
          f"{dev['iommu_group']}, cdev {dev['vfio_cdev']}; virtio devices {virtio}")


def test_bind_unbind_round_trip(tmp_path):
    from pyiommufd.pci import VFIO_PCI_DRIVER, PciDevice

    bdf = find_virtio_net()
    dev = PciDevice(bdf)
    before = dev.driver
    assert before != VFIO_PCI_DRIVER, "another test left the virtio-net on vfio-pci"
    state_dir = tmp_path / "state"
    env = dict(os.environ, PYIOMMUFD_STATE_DIR=str(state_dir))
    try:
        proc = cli("bind", bdf, env=env)
        cdev = proc.stdout.strip()
        assert cdev.startswith("/dev/vfio/devices/vfio") and os.path.exists(cdev), proc.stdout
        assert f"{before or 'no driver'} -> vfio-pci" in proc.stderr
        assert dev.driver == VFIO_PCI_DRIVER and dev.vfio_cdev == cdev
        assert json.loads((state_dir / "bind-state.json").read_text())["devices"][bdf]["driver"] == before
        again = cli("bind", bdf, env=env)
        assert again.stdout.strip() == cdev and "already on vfio-pci" in again.stderr
        # the record of the first bind survives the second
        assert json.loads((state_dir / "bind-state.json").read_text())["devices"][bdf]["driver"] == before
        proc = cli("unbind", bdf, env=env)
        assert f"vfio-pci -> {before or 'no driver'}" in proc.stdout
        assert dev.driver == before and dev.driver_override is None and not os.path.exists(cdev)
        assert json.loads((state_dir / "bind-state.json").read_text())["devices"] == {}
        print(f"bind/unbind: {bdf} {before} -> vfio-pci ({cdev}), bind again: already; unbind -> "
              f"{before}; state file {state_dir}/bind-state.json written and emptied")
    finally:
        if dev.driver == VFIO_PCI_DRIVER or dev.driver_override == VFIO_PCI_DRIVER:
            dev.restore()


# -- the live-update lifecycle across the run's kexec ------------------------------------------

SESSION = "cli-vm"
AGENT_DIR = "/tmp/pyiommufd-cli-vm"
AGENT_SOCKET = f"{AGENT_DIR}/agent.sock"
SHA_CODE = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def _agent_env() -> dict:
    return dict(os.environ, PYIOMMUFD_AGENT_SOCKET=AGENT_SOCKET)


def _start_agent_sharing(lu, env: dict) -> dict:
    """Start ``pyiommufd agent --background`` (it cannot open the device this
    process holds) and share this process's /dev/liveupdate with it."""
    from pyiommufd.agent import AgentClient

    proc = cli("agent", "--background", env=env)
    assert "agent started in the background" in proc.stdout
    client = AgentClient(AGENT_SOCKET)
    lu_state = client.ping()["liveupdate"]
    assert lu_state["held"] is False and "EBUSY" in (lu_state.get("error") or ""), lu_state
    result = client.adopt(liveupdate=lu)
    assert result["liveupdate"] == "adopted", result
    info = client.ping()
    assert info["liveupdate"]["held"] is True
    print(f"agent pid {info['pid']}: /dev/liveupdate EBUSY at start; adopted this process's "
          f"open file (fd {lu.fileno()} here, fd {info['liveupdate']['fd']} there)")
    return info


def _stop_agent(env: dict, force: bool = False) -> None:
    cli("agent", "stop", *(["--force"] if force else []), env=env, expect=None if force else 0)


def _agent_memfd_sha256(pid: int, name: str) -> str:
    """sha256 of the agent's own reference to memfd ``name`` (via /proc/PID/fd)."""
    hits = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{name} "):
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                hits.append(hashlib.sha256(f.read()).hexdigest())
    assert len(hits) == 1, f"agent {pid} holds {len(hits)} memfd(s) named {name!r}"
    return hits[0]


@pytest.mark.pyiommufd_kexec
def test_cli_preserve_restore_finish_across_kexec(lu_stage):
    from pyiommufd.agent import AgentClient

    lu = lu_stage.liveupdate          # opened here first, so the agent gets EBUSY and adopts it
    env = _agent_env()
    client = AgentClient(AGENT_SOCKET)
    if lu_stage.stage == 1:
        agent = _start_agent_sharing(lu, env)
        try:
            out, _ = cli_json("preserve", "--session", SESSION, "--memfd", "guest-ram:1M:fill=random",
                              "--memfd", "firmware:12K:fill=hex:5a17:seals=seal,grow,shrink,write",
                              env=env)
            assert out["session"] == SESSION
            kinds = {p["name"]: (p["token"], p["kind"]) for p in out["preserved"]}
            assert kinds["pyiommufd-manifest"] == (0, "manifest")
            assert {kinds["guest-ram"][1], kinds["firmware"][1]} == {"memfd"}
            st, _ = cli_json("status", env=env)
            assert st["agent"]["pid"] == agent["pid"]
            session = next(s for s in st["sessions"] if s["name"] == SESSION)
            assert session["direction"] == "outgoing"
            tokens = {t["name"]: t for t in session["tokens"]}
            assert set(tokens) == {"pyiommufd-manifest", "guest-ram", "firmware"}
            assert all(t["state"] == "preserved" and t["held"] for t in tokens.values())
            assert {name: t["token"] for name, t in tokens.items()} == {n: k[0] for n, k in kinds.items()}
            ram = tokens["guest-ram"]
            assert ram["kind"] == "memfd" and ram["meta"]["size"] == 1 << 20
            assert sorted(tokens["firmware"]["meta"]["seals"]) == ["grow", "seal", "shrink", "write"]
            digest = _agent_memfd_sha256(agent["pid"], "guest-ram")
            assert ram["meta"]["sha256"] == digest, "the manifest's checksum is the memfd's"
            assert tokens["firmware"]["meta"]["sha256"] == _agent_memfd_sha256(agent["pid"], "firmware")
        except BaseException:
            _stop_agent(env, force=True)
            raise
        lu_stage.save("sha256", digest)
        lu_stage.save("tokens", {name: t["token"] for name, t in tokens.items()})
        print(f"stage 1: preserve -> session {SESSION!r} held by agent {agent['pid']}; status --json: "
              + ", ".join(f"{t['token']:#x} {name}" for name, t in tokens.items())
              + f"; guest-ram sha256 {digest[:16]}… (read from the agent's own fd) = the manifest's")
        return

    digest = lu_stage.load("sha256")
    tokens = lu_stage.load("tokens")
    agent = _start_agent_sharing(lu, env)
    try:
        proc = cli("restore", "--session", SESSION, "--verify", "--exec", "--",
                   sys.executable, "-c", SHA_CODE, "/proc/self/fd/{guest-ram}", env=env)
        assert proc.stdout.strip() == digest, (proc.stdout, proc.stderr)
        assert f"restored session {SESSION!r}" in proc.stderr     # with --exec the report is on stderr
        session = next(s for s in client.status()["sessions"] if s["name"] == SESSION)
        assert session["direction"] == "incoming" and session["manifest"] is True
        states = {t["name"]: (t["token"], t["state"]) for t in session["tokens"]}
        assert states == {name: (token, "retrieved") for name, token in tokens.items()}, states
        assert session["unretrieved"] == []
        proc = cli("finish", "--session", SESSION, env=env)
        assert f"finished session {SESSION!r}" in proc.stdout
        assert [s for s in client.status()["sessions"] if s["name"] == SESSION] == []
        with pytest.raises(OSError) as err:
            lu.retrieve_session(SESSION)            # finished and closed by the agent: gone
        assert err.value.errno == errno.ENOENT
    except BaseException:
        _stop_agent(env, force=True)
        raise
    _stop_agent(env)
    assert not client.is_running()
    assert lu.try_retrieve_session(SESSION) is None     # our handle still works without the agent
    print(f"stage 2: agent {agent['pid']} adopted the new handle; restore --verify --exec printed "
          f"sha256 {digest[:16]}… (as in stage 1); every token retrieved; finish exit 0; the "
          "session is gone (ENOENT); agent stopped, this process's /dev/liveupdate still works")
