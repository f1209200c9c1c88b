"""The lifecycle commands through click's CliRunner on the fake kernel, with
the agent serving in a thread: plan, preserve, kexec, restore (--verify,
--exec), finish, status, agent; plus a bad-input matrix."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyiommufd import pci
from pyiommufd import restore as restore_flow
from pyiommufd.agent import AgentServer, in_process_agents
from pyiommufd.cli import cli, lifecycle
from pyiommufd_testing import SimulatedKexec

from cli_support import cli_runner

BDF = "0000:00:03.0"


class Cli:
    def __init__(self, kernel, sockdir, monkeypatch, *, agent: bool = True):
        self.k = kernel
        self.dir = sockdir
        self.path = os.path.join(sockdir, "agent.sock")
        monkeypatch.setenv("PYIOMMUFD_AGENT_SOCKET", self.path)
        monkeypatch.delenv("PYIOMMUFD_DEBUG", raising=False)
        monkeypatch.delenv("PYIOMMUFD_LU_ABI", raising=False)
        self.server = AgentServer(self.path, backend=kernel).serve_in_thread() if agent else None
        self.runner = cli_runner()

    def run(self, *args, code: int | None = 0):
        result = self.runner.invoke(cli, [str(a) for a in args])
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        if code is not None:
            assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    def vfio_pci(self):
        pci.PciDevice(BDF, self.k).bind_vfio()

    def kexec(self):
        """The old kernel's processes die, the new kernel boots, an agent starts."""
        if self.server is not None:
            self.server.shutdown(release=False)
        for srv in in_process_agents().values():
            srv.shutdown(release=False)
        self.k.kexec()
        self.server = AgentServer(self.path, backend=self.k).serve_in_thread()

    def close(self):
        if self.server is not None:
            self.server.shutdown()
        for path, srv in in_process_agents().items():
            if path.startswith(self.dir):
                srv.shutdown()


@pytest.fixture
def series(series_kernel, sockdir, monkeypatch):
    c = Cli(series_kernel, sockdir, monkeypatch)
    c.vfio_pci()
    yield c
    c.close()


@pytest.fixture
def stock(fake_kernel, sockdir, monkeypatch):
    c = Cli(fake_kernel, sockdir, monkeypatch)
    yield c
    c.close()


@pytest.fixture
def noagent(fake_kernel, sockdir, monkeypatch):
    c = Cli(fake_kernel, sockdir, monkeypatch, agent=False)
    yield c
    c.close()


STAGE1 = ["preserve", "--session", "vm0", "--memfd", "guest-ram:1M:fill=random:seed=3",
          "--device", BDF, "--hwpt-token", "0x789012", "--iommufd-token", "0x123456"]


# -- plan ---------------------------------------------------------------------------------------
def test_plan_text(noagent):
    out = noagent.run("plan", "--dry-run", "--session", "vm0", "--memfd", "ram:1M", "--device", BDF,
                      "--lu-abi", "v1").stdout
    assert "plan for session 'vm0' (LU ABI: lu-v1)" in out
    assert "1. create_memfd" in out and "preserve_cdev" in out
    assert "stage 2 will retrieve:" in out and "EOPNOTSUPP" in out
    assert "no problems" in out
    # the plan never touched the kernel: no agent was started, no session exists
    assert not os.path.exists(noagent.path)


def test_plan_file_json(noagent, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('session = "vm0"\n[[memfd]]\nname = "ram"\nsize = "64K"\ntoken = 7\n')
    doc = json.loads(noagent.run("plan", plan, "--json").stdout)
    assert doc["valid"] is True
    assert [o["action"] for o in doc["operations"]] == [
        "create_memfd", "seal", "create_session", "preserve_manifest", "preserve_memfd"]
    assert [r["token"] for r in doc["stage2"]] == [0, 7]


def test_plan_invalid(noagent, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"session": "vm0", "memfd": [{"name": "ram", "size": 4096, "seals": []}],
                                "iommufd": [{"name": "i", "ioas": [{"name": "a", "mappings": [{"memfd": "ram"}]}],
                                             "hwpt": [{"name": "h", "device": "d"}]}],
                                "device": [{"name": "d", "bdf": BDF, "hwpt": "h"}]}))
    r = noagent.run("plan", plan, code=2)
    assert "not sealed SEAL|SHRINK|GROW" in r.stdout
    errs = [line for line in r.stderr.splitlines() if line.startswith("pyiommufd: error:")]
    assert len(errs) == 1 and "the plan is invalid" in errs[0]
    doc = json.loads(noagent.run("plan", plan, "--json", code=2).stdout)
    assert doc["valid"] is False and "seals-missing" in {p["code"] for p in doc["problems"]}


# -- the whole cycle on a series kernel ---------------------------------------------------------
def test_preserve_kexec_restore_finish(series):
    r = series.run(*STAGE1)
    assert "preserved into session 'vm0'" in r.stdout
    for token, kind in (("0x0", "manifest"), ("0x1", "memfd"), ("0x123456", "iommufd"), ("0x2", "vfio-cdev")):
        assert any(line.split()[:2] == [token, kind] for line in r.stdout.splitlines()), r.stdout
    st = json.loads(series.run("status", "--json").stdout)
    (s,) = st["sessions"]
    assert s["direction"] == "outgoing"
    assert {t["kind"] for t in s["tokens"]} == {"manifest", "memfd", "iommufd", "vfio-cdev"}
    assert "held by" not in series.run("status").stderr

    # the agent refuses to drop the preserved state
    r = series.run("agent", "stop", code=5)
    assert "unpreserves" in r.stderr

    series.kexec()
    series.vfio_pci()            # after kexec: bind vfio-pci before retrieving the cdev (seed-spec 3.4)
    r = series.run("restore", "--session", "vm0", "--verify", "--json")
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["tokens"]}
    assert rows["guest-ram"]["status"] == "retrieved" and rows["guest-ram"]["verify"] == "ok"
    assert rows["dev0"]["status"] == "retrieved"
    assert rows["iommufd0"]["status"] == "expected-failure" and rows["iommufd0"]["errno"] == "EOPNOTSUPP"
    assert doc["verified"] is True
    assert doc["manifest"]["lu_abi"] == "lu-v2"
    assert [r["kind"] for r in doc["tokens"]] == ["manifest", "memfd", "vfio-cdev", "iommufd"]

    # restore again: the agent holds the session already, the retrieves repeat
    assert "expected-failure" in series.run("restore", "--session", "vm0").stdout

    r = series.run("finish", "--session", "vm0", code=5)
    line, = r.stderr.strip().splitlines()
    assert line.startswith("pyiommufd: error: LIVEUPDATE_SESSION_FINISH")
    assert "unretrieved tokens: ['0x123456']" in line
    r = series.run("status")
    assert "iommufd0" in r.stdout and "failed" in r.stdout and "EOPNOTSUPP" in r.stdout


def test_stock_memfds_cycle_finishes(stock):
    r = stock.run("preserve", "--session", "ram-only", "--memfd", "a:64K:fill=hex:c0ffee",
                  "--memfd", "b:8K:fill=random", "--json")
    doc = json.loads(r.stdout)
    assert [p["kind"] for p in doc["preserved"]] == ["manifest", "memfd", "memfd"]
    assert doc["manifest"]["entries"][0]["sha256"]
    stock.kexec()
    doc = json.loads(stock.run("restore", "--session", "ram-only", "--verify", "--json").stdout)
    assert doc["verified"] is True and all(r["status"] == "retrieved" for r in doc["tokens"])
    stock.run("finish", "--session", "ram-only")
    assert "no sessions" in stock.run("status").stdout


def test_preserve_from_plan_file(series, tmp_path):
    img = tmp_path / "fw.bin"
    img.write_bytes(b"\x7fELF firmware")
    plan = tmp_path / "plan.toml"
    plan.write_text(f'''
session = "planned"
lu_abi = "lu-v2"
[[memfd]]
name = "fw"
size = "4K"
contents = "@{img}"
token = 0x890123
[[iommufd]]
name = "ictx"
token = 0x123456
  [[iommufd.ioas]]
  name = "ioas0"
  mappings = [{{ memfd = "fw", iova = 0x100000 }}]
  [[iommufd.hwpt]]
  name = "hwpt0"
  device = "nic"
  lu_token = 0x789012
[[device]]
name = "nic"
cdev = "/dev/vfio/devices/vfio0"
hwpt = "hwpt0"
token = 0x654321
''')
    doc = json.loads(series.run("preserve", "--plan", plan, "--json").stdout)
    iommufd = next(e for e in doc["manifest"]["entries"] if e["kind"] == "iommufd")
    assert iommufd["ioas"][0]["mappings"][0]["iova"] == 0x100000
    assert iommufd["hwpts"][0]["lu_token"] == 0x789012
    series.kexec()
    series.vfio_pci()
    doc = json.loads(series.run("restore", "--session", "planned", "--verify", "--json").stdout)
    assert doc["verified"] is True


def test_preserve_rolls_back_on_a_kernel_error(stock):
    # stock 7.3 has no iommufd LUO handler: the iommufd preserve says ENOENT
    r = stock.run("preserve", "--session", "s", "--memfd", "ram:64K", "--iommufd", code=4)
    assert "no live-update handler" in r.stderr
    assert "released the half-built session 's'" in r.stderr
    assert "Traceback" not in r.stderr
    assert "no sessions" in stock.run("status").stdout


def test_preserve_without_lu_ioctl_is_unsupported(stock):
    stock.vfio_pci()
    r = stock.run("preserve", "--session", "s", "--memfd", "ram:64K", "--device", BDF, code=4)
    assert "IOAS_NOIOMMU_GET_PA" in r.stderr
    assert "no sessions" in stock.run("status").stdout


# -- restore --exec -----------------------------------------------------------------------------
def _stage1_then_kexec(c, *extra):
    c.run("preserve", "--session", "vm0", "--memfd", "guest-ram:64K:fill=hex:0123456789abcdef",
          "--memfd", "rom:4K:token=0x40:fill=random", *extra)
    c.kexec()


def test_restore_exec_child_reads_the_preserved_bytes(stock):
    """A real exec in a real child: the CLI runs in a subprocess (Linux backend,
    the fake's memfds are real memfds), the agent serves it from this process."""
    _stage1_then_kexec(stock)
    child = ("import os, sys; fds = [int(a) for a in sys.argv[1:]]; "
             "sys.stdout.write(os.pread(fds[0], 8, 0).hex() + ' ' + str(os.fstat(fds[1]).st_size))")
    proc = subprocess.run(
        [sys.executable, "-c", "from pyiommufd.cli import main; main()", "restore", "--session", "vm0",
         "--verify", "--exec", "--", sys.executable, "-c", child, "{guest-ram}", "{0x40}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0123456789abcdef 4096"
    # the report went to stderr, stdout belongs to the command
    assert "restored session 'vm0'" in proc.stderr


def test_restore_exec_with_sh(stock):
    _stage1_then_kexec(stock)
    proc = subprocess.run(
        [sys.executable, "-c", "from pyiommufd.cli import main; main()", "restore", "--session", "vm0",
         "--exec", "--", "sh", "-c", "head -c 8 /proc/self/fd/{guest-ram} | od -An -tx1 | tr -d ' \\n'"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0123456789abcdef"


def test_restore_exec_placeholders(stock, monkeypatch):
    _stage1_then_kexec(stock)
    calls = []

    def fake_exec(argv, fds, names):
        calls.append((list(argv), [stock.k.pread(fd, 4, 0) for fd in fds], names))

    monkeypatch.setattr(lifecycle, "exec_command", fake_exec)
    stock.run("restore", "--session", "vm0", "--exec", "--", "vmm", "ram={guest-ram}", "rom={64}",
              "again={0x40}", "m={manifest}", "{{literal}}")
    (argv, heads, names), = calls
    assert argv[0] == "vmm"
    # placeholders name where sd_listen_fds finds each file: 3, 4, ... in LISTEN_FDNAMES order
    ram, rom, rom2, man = (int(a.split("=")[1]) for a in argv[1:5])
    assert names == ["manifest", "guest-ram", "rom"] and (man, ram, rom) == (3, 4, 5) and rom2 == rom
    assert heads[1] == bytes.fromhex("01234567") and heads[0].startswith(b"{")
    assert argv[5] == "{literal}"


def test_restore_exec_passes_fds_the_systemd_way(stock):
    """A real exec: the child finds the files at 3, 4, ... with LISTEN_PID its
    own pid (execve keeps the pid), as sd_listen_fds(3) expects."""
    _stage1_then_kexec(stock)
    # (no braces: restore would read them as placeholders)
    child = ("import os, sys, json; n = int(os.environ['LISTEN_FDS']); "
             "print(json.dumps(dict(pid_is_mine=os.environ['LISTEN_PID'] == str(os.getpid()), n=n, "
             "names=os.environ['LISTEN_FDNAMES'].split(':'), heads=[os.pread(3 + i, 8, 0).hex() "
             "for i in range(n)], sizes=[os.fstat(3 + i).st_size for i in range(n)], argv=sys.argv[1:])))")
    proc = subprocess.run(
        [sys.executable, "-c", "from pyiommufd.cli import main; main()", "restore", "--session", "vm0",
         "--exec", "--", sys.executable, "-c", child, "{guest-ram}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["pid_is_mine"] is True
    assert got["n"] == 3 and got["names"] == ["manifest", "guest-ram", "rom"]
    assert got["heads"][1] == "0123456789abcdef" and got["sizes"][1:] == [64 << 10, 4096]
    assert got["argv"] == ["4"]


def _preserve_raw_manifest(c, text: bytes, *, seal: bool = True, session: str = "vm0"):
    """A session whose token 0 holds ``text`` and whose token 1 a 4 KiB memfd."""
    from pyiommufd.agent import AgentClient
    from pyiommufd.memfd import MemFD, Seal

    client = AgentClient(c.path)
    client.create_session(session)
    m = MemFD.create("pyiommufd-manifest", len(text), sealing=True, backend=c.k)
    m.write(text, 0)
    if seal:
        m.add_seals(Seal.WRITE | Seal.SEAL | Seal.GROW | Seal.SHRINK)
    ram = MemFD.create("ram", 4096, backend=c.k)
    client.preserve(session, 0, m, {"kind": "manifest"})
    client.preserve(session, 1, ram)
    m.close()
    ram.close()
    c.kexec()


def _manifest_text(session: str = "vm0", **entry) -> bytes:
    from pyiommufd.manifest import Entry, Manifest

    fields = dict(token=1, kind="memfd", name="ram", size=4096, seals=[])
    fields.update(entry)
    return Manifest(session, [Entry(**fields)], kernel_release="7.3.4").to_json().encode()


def _refused_before_exec(c, monkeypatch, code, *, report: bool = False):
    """The one error line of a restore --exec that must not exec. With
    ``report`` the table of what was retrieved comes first (on stderr: with
    --exec stdout belongs to the command)."""
    monkeypatch.setattr(lifecycle, "exec_command", lambda *a: pytest.fail("must not exec"))
    r = c.run("restore", "--session", "vm0", "--exec", "--", "vmm", "{ram}", code=code)
    lines = r.stderr.strip().splitlines()
    errors_ = [x for x in lines if x.startswith("pyiommufd: error: ")]
    assert len(errors_) == 1 and (report or len(lines) == 1), r.stderr
    return errors_[0]


def test_restore_refuses_a_tampered_manifest_in_one_line(stock, monkeypatch):
    text = _manifest_text().replace(b'"size": 4096', b'"size": 8192')
    _preserve_raw_manifest(stock, text)
    line = _refused_before_exec(stock, monkeypatch, 2)
    assert "fails its checksum" in line


def test_restore_refuses_a_truncated_manifest_in_one_line(stock, monkeypatch):
    text = _manifest_text()
    _preserve_raw_manifest(stock, text[:len(text) // 2])
    line = _refused_before_exec(stock, monkeypatch, 2)
    assert "truncated" in line


def test_restore_refuses_a_manifest_of_another_session(stock, monkeypatch):
    _preserve_raw_manifest(stock, _manifest_text(session="other"))
    line = _refused_before_exec(stock, monkeypatch, 1)
    assert "describes session 'other'" in line


def test_restore_refuses_a_manifest_that_could_have_been_rewritten(stock, monkeypatch):
    _preserve_raw_manifest(stock, _manifest_text(), seal=False)
    line = _refused_before_exec(stock, monkeypatch, 1)
    assert "not sealed against writes" in line


@pytest.mark.parametrize("entry, found", [
    (dict(size=8192), "size 0x1000, manifest says 0x2000"),
    (dict(sha256="0" * 64), "sha256"),
    (dict(kind="vfio-cdev", size=None, seals=None, bdf=BDF), "the manifest says vfio-cdev"),
])
def test_restore_never_execs_with_a_file_that_is_not_what_the_manifest_says(stock, monkeypatch, entry, found):
    _preserve_raw_manifest(stock, _manifest_text(**entry))
    monkeypatch.setattr(restore_flow, "vfio_ready", lambda *a: None)
    line = _refused_before_exec(stock, monkeypatch, 1, report=True)
    assert "differ from the manifest; not executing anything" in line
    # without --exec, --verify is not implied: restore only reports
    assert found in stock.run("restore", "--session", "vm0", "--verify", code=1).stdout


def test_restore_exec_unknown_placeholder_exits_2_before_exec(stock, monkeypatch):
    _stage1_then_kexec(stock)
    monkeypatch.setattr(lifecycle, "exec_command", lambda *a: pytest.fail("must not exec"))
    r = stock.run("restore", "--session", "vm0", "--exec", "--", "vmm", "{nope}", code=2)
    assert "unknown placeholder {nope}" in r.stderr
    r = stock.run("restore", "--session", "vm0", "--exec", "--", "vmm", "{0x99}", code=2)
    assert "token 0x99 is not in session" in r.stderr


def test_restore_exec_of_the_iommufd_is_unsupported(series, monkeypatch):
    series.run(*STAGE1)
    series.kexec()
    series.vfio_pci()
    monkeypatch.setattr(lifecycle, "exec_command", lambda *a: pytest.fail("must not exec"))
    r = series.run("restore", "--session", "vm0", "--exec", "--", "qemu", "fd={iommufd0}", code=4)
    assert "was not retrieved" in r.stderr
    assert "EOPNOTSUPP" in r.stderr or "Operation not supported" in r.stderr


def test_restore_session_without_manifest(stock):
    from pyiommufd.agent import AgentClient
    from pyiommufd.memfd import MemFD

    c = AgentClient(stock.path)
    c.create_session("bare")
    m = MemFD.create("x", 4096, backend=stock.k)
    c.preserve("bare", 5, m)
    m.close()
    stock.kexec()
    r = stock.run("restore", "--session", "bare", code=2)
    assert "no manifest at token 0" in r.stderr


def test_restore_verify_mismatch(stock, monkeypatch):
    _stage1_then_kexec(stock)
    from pyiommufd import manifest as M

    real = M.read_from_fd

    def tampered(fd, backend=None):
        m = real(fd, backend)
        m.entries[0].sha256 = "0" * 64
        return m

    monkeypatch.setattr(M, "read_from_fd", tampered)
    r = stock.run("restore", "--session", "vm0", "--verify", code=1)
    assert "sha256" in r.stdout and "differ from the manifest" in r.stderr


# -- kexec --------------------------------------------------------------------------------------
@pytest.fixture
def kernel_image(fake_kernel):
    """A kernel image on the fake host's disk (the real host's files are not the fake's)."""
    path = "/srv/images/bzImage"
    fake_kernel.files.put(path, b"MZ" + b"\0" * 4094)
    return path


def test_kexec_refuses_when_nothing_is_preserved(stock, kernel_image):
    r = stock.run("kexec", "--kernel", kernel_image, code=1)
    assert "refusing to kexec" in r.stderr and "--force" in r.stderr
    assert not stock.k.kexec_loaded


def test_kexec_load_only(stock, kernel_image):
    r = stock.run("kexec", "--kernel", kernel_image, "--load-only", "--cmdline", "console=ttyS0 liveupdate=on")
    assert "loaded" in r.stdout
    assert stock.k.kexec_loaded


def test_kexec_full_cycle_through_the_cli(stock, kernel_image):
    stock.run("preserve", "--session", "vm0", "--memfd", "guest-ram:64K:fill=hex:aa55")
    with pytest.raises(SimulatedKexec):
        stock.runner.invoke(cli, ["kexec", "--kernel", str(kernel_image), "--reuse-cmdline"],
                            catch_exceptions=False)
    # every process of the old kernel is gone; a new agent restores
    stock.server.shutdown(release=False)
    stock.server = AgentServer(stock.path, backend=stock.k).serve_in_thread()
    doc = json.loads(stock.run("restore", "--session", "vm0", "--verify", "--json").stdout)
    assert doc["verified"] is True
    stock.run("finish", "--session", "vm0")


def test_kexec_force_without_agent(noagent, kernel_image):
    with pytest.raises(SimulatedKexec):
        noagent.runner.invoke(cli, ["kexec", "--kernel", str(kernel_image), "--force"], catch_exceptions=False)


# -- agent and status ---------------------------------------------------------------------------
def test_agent_commands(stock):
    r = stock.run("agent", "status")
    assert f"pid {os.getpid()}" in r.stdout and "holds /dev/liveupdate" in r.stdout
    assert json.loads(stock.run("agent", "status", "--json").stdout)["agent"]["socket"] == stock.path
    stock.run("preserve", "--session", "s", "--memfd", "ram:4K")
    assert "unpreserves" in stock.run("agent", "stop", code=5).stderr
    r = stock.run("agent", "stop", "--force")
    assert "stopped" in r.stdout and "unpreserves" in r.stderr
    stock.run("agent", "status", code=7)
    stock.run("status", code=7)


def test_agent_background_requires_linux_backend(noagent):
    r = noagent.run("agent", "--background", code=2)
    assert "Linux backend" in r.stderr


def test_status_without_agent(noagent):
    r = noagent.run("status", code=7)
    assert r.stderr.startswith("pyiommufd: error: no pyiommufd agent answers")
    noagent.run("finish", "--session", "s", code=7)
    noagent.run("agent", "stop", code=7)


def test_background_agent_real_process(sockdir):
    """A real daemon (Linux backend, no /dev/liveupdate needed to start)."""
    path = os.path.join(sockdir, "bg.sock")
    env = dict(os.environ, PYIOMMUFD_AGENT_SOCKET=path)
    run = [sys.executable, "-c", "from pyiommufd.cli import main; main()"]
    start = subprocess.run(run + ["agent", "--background"], capture_output=True, text=True, timeout=60, env=env)
    assert start.returncode == 0, start.stderr
    try:
        st = subprocess.run(run + ["agent", "status", "--json"], capture_output=True, text=True, timeout=60,
                            env=env)
        assert st.returncode == 0, st.stderr
        info = json.loads(st.stdout)["agent"]
        assert info["pid"] != os.getpid() and info["backend"] == "linux"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert os.path.exists(os.path.join(sockdir, "agent.log"))
    finally:
        stop = subprocess.run(run + ["agent", "stop"], capture_output=True, text=True, timeout=60, env=env)
    assert stop.returncode == 0, stop.stderr
    assert not os.path.exists(path)


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    (["plan"], 2),
    (["plan", "--session", "x"], 2),
    (["plan", "/nonexistent/plan.toml"], 2),
    (["plan", "--session", "x", "--memfd", "bad"], 2),
    (["plan", "--session", "x" * 64, "--memfd", "a:1M"], 2),
    (["plan", "--session", "x", "--memfd", "a:1M", "--lu-abi", "v9"], 2),
    (["plan", "--session", "x", "--memfd", "a:1M:token=0"], 2),
    (["plan", "--session", "x", "--memfd", "a:1M", "--memfd", "a:4K"], 2),
    (["plan", "--session", "x", "--device", "zz:zz.z"], 2),
    (["preserve"], 2),
    (["preserve", "--session", "s", "--memfd", "a:0"], 2),
    (["preserve", "--session", "s", "--memfd", "a:1M:fill=@/nonexistent/file"], 2),
    (["preserve", "--session", "s", "--memfd", "a:1M", "--hwpt-token", "1"], 2),
    (["preserve", "--session", "s", "--memfd", "a:1M", "--device", BDF, "--hwpt-token", "0x100000000",
      "--lu-abi", "v1"], 2),
    (["preserve", "--session", "s", "--memfd", "a:1Q"], 2),
    (["preserve", "--session", "s", "--memfd", "a:1M:seals=glue"], 2),
    (["preserve", "--plan", "/nonexistent.toml"], 2),
    (["restore"], 2),
    (["restore", "--session", "s", "extra"], 2),
    (["restore", "--session", "s", "--exec"], 2),
    (["restore", "--session", "x" * 64], 2),
    (["restore", "--session", "never"], 3),
    (["finish"], 2),
    (["finish", "--session", ""], 2),
    (["finish", "--session", "never"], 2),
    (["kexec"], 2),
    (["kexec", "--kernel", "/nonexistent/bzImage"], 2),
    (["kexec", "--kernel", "/etc/hostname", "--cmdline", "x", "--reuse-cmdline"], 2),
    (["kexec", "--kernel", "/etc/hostname", "--initrd", "/nonexistent"], 2),
    (["status", "--bogus"], 2),
    (["agent", "stop", "--bogus"], 2),
]


@pytest.mark.parametrize("args,code", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input(stock, args, code):
    r = stock.run(*args, code=code)
    assert "Traceback" not in r.output
    if code != 0 and "--bogus" not in args:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("pyiommufd: error: "), r.stderr


def test_debug_shows_the_traceback(stock):
    r = stock.runner.invoke(cli, ["--debug", "finish", "--session", "never"])
    assert r.exit_code != 0 and r.exception is not None   # re-raised for the traceback


def test_restore_does_not_retrieve_a_cdev_before_vfio_pci(series):
    """A failed retrieve is sticky (seed-spec 4.1): restore must not try the cdev
    while the device is on another driver; --bind-vfio binds it first."""
    series.run(*STAGE1)
    series.kexec()
    r = series.run("restore", "--session", "vm0", "--json", code=1)
    rows = {row["name"]: row for row in json.loads(r.stdout)["tokens"]}
    assert rows["dev0"]["status"] == "not-bound" and "vfio-pci" in rows["dev0"]["note"]
    assert rows["guest-ram"]["status"] == "retrieved"
    assert "pyiommufd bind 0000:00:03.0" in r.stderr
    # nothing was spoiled: the cdev is still pending in the agent
    st = json.loads(series.run("status", "--json").stdout)["sessions"][0]
    assert {t["name"]: t["state"] for t in st["tokens"]}["dev0"] == "pending"
    doc = json.loads(series.run("restore", "--session", "vm0", "--bind-vfio", "--json").stdout)
    rows = {row["name"]: row for row in doc["tokens"]}
    assert rows["dev0"]["status"] == "retrieved"
    assert pci.PciDevice(BDF, series.k).driver == "vfio-pci"


def test_manifest_records_the_bdf_of_a_cdev_device(series):
    doc = json.loads(series.run("preserve", "--session", "c", "--memfd", "ram:64K", "--device",
                                "/dev/vfio/devices/vfio0", "--json").stdout)
    cdev = next(e for e in doc["manifest"]["entries"] if e["kind"] == "vfio-cdev")
    assert cdev["bdf"] == BDF and cdev["cdev"] == "/dev/vfio/devices/vfio0"


@pytest.mark.parametrize("device,match", [("/dev/vfio/devices/vfio9", "vfio9: no such device node"),
                                          ("0000:00:1f.7", "no PCI device 0000:00:1f.7")])
def test_preserve_missing_device_is_bad_input(series, device, match):
    r = series.run("preserve", "--session", "s", "--memfd", "ram:4K", "--device", device, code=2)
    assert match in r.stderr
    assert "no sessions" in series.run("status").stdout


# -- what a crash of the agent would lose ---------------------------------------------------------
def test_status_says_what_a_crash_of_the_agent_would_lose(stock):
    assert "it holds no session now" in stock.run("status").stdout
    stock.run("preserve", "--session", "vm0", "--memfd", "ram:64K", "--memfd", "rom:4K")
    out = stock.run("status").stdout
    assert ("warning: no fd store (not started by systemd with FileDescriptorStoreMax=): if the agent "
            "crashes or is killed, the kernel drops session 'vm0' (outgoing, 3 file(s))") in out


def test_status_under_systemd_says_a_crash_loses_nothing(fake_kernel, sockdir, monkeypatch):
    import socket as _socket

    notify = os.path.join(sockdir, "notify")
    manager = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    manager.bind(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", notify)     # the agent reads it as under systemd
    c = Cli(fake_kernel, sockdir, monkeypatch)
    try:
        c.run("preserve", "--session", "vm0", "--memfd", "ram:64K")
        out = c.run("status").stdout
        assert "fd store: systemd keeps a copy of the agent's 4 fd(s); a crash loses nothing" in out
        assert "warning" not in out
    finally:
        c.close()
        manager.close()


def test_doctor_says_what_a_crash_of_the_agent_would_lose(stock):
    doc = json.loads(stock.run("doctor", "--json", code=None).stdout)
    check = next(c for c in doc["checks"] if c["check"] == "agent crash safety")
    assert check["status"] == "ok" and "holds no session now" in check["value"]
    stock.run("preserve", "--session", "vm0", "--memfd", "ram:64K")
    doc = json.loads(stock.run("doctor", "--json", code=None).stdout)
    check = next(c for c in doc["checks"] if c["check"] == "agent crash safety")
    assert check["status"] == "warn" and "the kernel drops session 'vm0' (outgoing, 2 file(s))" in check["value"]
    assert "contrib/systemd/pyiommufd-agent.service" in check["hint"]


def test_doctor_without_an_agent(noagent):
    doc = json.loads(noagent.run("doctor", "--json", code=None).stdout)
    check = next(c for c in doc["checks"] if c["check"] == "agent crash safety")
    assert check["status"] == "info" and check["value"].startswith("no agent on ")
