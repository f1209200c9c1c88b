"""pytest plugin for the real-kernel VM tier. Opt-in: a project loads it with
``-p pyiommufd_testing.pytest_plugin`` (pyiommufd's own pyproject does); it
acts only on tests marked ``pyiommufd_vm`` or ``pyiommufd_kexec``, so another
project's ``vm`` marker never boots a VM.

On the host
    Tests marked ``pyiommufd_vm`` (or ``pyiommufd_kexec``, which implies it)
    are not run in the host process. If any are selected, the plugin boots one
    VM per kernel (:mod:`pyiommufd.vm.runner`) and runs pytest *inside the
    guest* on exactly those node ids, then reports every host item with the
    guest's outcome, traceback and captured output, plus a ``vm`` report
    section with the kernel it ran on. The "VM tier" terminal summary lists
    each kernel, and each vm test as ``[vm stock 7.3.4] nodeid PASSED``, or says
    loudly that a kernel's run did not happen and why. If the VM cannot run at
    all (no QEMU, kernel build failed, a patch is missing, the guest never came
    up), that kernel's tests are skipped with the reason, or fail when ``$CI``
    is ``true``.

    Kernels: the ini option ``pyiommufd_vm_kernels`` lists them, one a line:
    ``NAME [PATCH ...] [FRAGMENT.config ...] [VAR=VALUE ...]``: a name, the
    patches to apply to the pristine 7.3 tree and config fragments to add
    (paths relative to the rootdir), and environment for the
    guest's pytest (e.g. ``PYIOMMUFD_LU_NR=0x96`` where the series moved its
    ioctl). Without it, one kernel: ``stock``. The first kernel's run reports
    under the tests' own node ids; every other kernel's under
    ``nodeid@NAME``.

    Options: ``--vm-kernel PATH`` (boot this bzImage instead of the listed
    kernels), ``--vm-kernels NAME,...`` (run only these), ``--vm-timeout S``
    (hard limit per VM), ``--no-vm`` (deselect the vm tests, with a loud
    summary line), ``--vm-machine local`` (run the "guest" pytest as host
    processes with a simulated kexec: for tests of this plugin only).

In the guest (``$PYIOMMUFD_IN_GUEST=1`` and ``$PYIOMMUFD_VM_PYTEST_REPORT``)
    vm tests run normally and each phase report is appended to the JSON-lines
    report in the results share.

Two-stage kexec tests (``@pytest.mark.pyiommufd_kexec``)
    One test function holds both stages and branches on the ``lu_stage``
    fixture (``.stage`` is 1 or 2; ``.save(key, value)``/``.load(key)`` persist
    JSON data across the kexec; ``.keep(*objs)`` keeps objects and their fds
    alive through the kexec; ``.liveupdate`` is the one shared
    ``pyiommufd.luo.LiveUpdate`` of the run, since /dev/liveupdate is exclusive).
    In stage 1 the guest runs them after all other vm tests; if any passed,
    the plugin kexecs *from the pytest process* at the very end (so preserved
    session fds stay open), and the next boot runs pytest again on those tests
    with ``.stage == 2``. A kexec test passes only if both stages pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

import pytest

if TYPE_CHECKING:   # pragma: no cover
    from pyiommufd.luo import LiveUpdate
    from pyiommufd.vm.kernel import KernelRecipe
    from pyiommufd.vm.runner import Job, VmResult

# A phase report of a vm test: a pytest TestReport, often rebuilt from the
# guest's JSON, carrying the plugin's own attributes (_vm_release, _vm_boot).
Report = Any

ENV_IN_GUEST = "PYIOMMUFD_IN_GUEST"
ENV_REPORT = "PYIOMMUFD_VM_PYTEST_REPORT"     # file name inside the results share
ENV_LU_STAGE = "PYIOMMUFD_LU_STAGE"
ENV_RESULTS = "PYIOMMUFD_VM_RESULTS"
PENDING = "kexec-pending.json"
KEXEC_ERROR = "kexec-error.txt"
LU_STATE_DIR = "lu-state"
DEFAULT_VM_TIMEOUT = 900.0

_KEPT: list[Any] = []                 # objects kept alive until the kexec
_SHARED: dict[str, Any] = {}          # the shared LiveUpdate handle


def _in_guest() -> bool:
    return os.environ.get(ENV_IN_GUEST) == "1"


def _results() -> Path:
    return Path(os.environ.get(ENV_RESULTS) or "/run/pyiommufd-results")


VM_MARK = "pyiommufd_vm"
KEXEC_MARK = "pyiommufd_kexec"
ENV_TARGET = "PYIOMMUFD_VM_TARGET"    # the kernel's name, for reports only


def _is_vm(item: pytest.Item) -> bool:
    return item.get_closest_marker(VM_MARK) is not None or _is_kexec(item)


def _is_kexec(item: pytest.Item) -> bool:
    return item.get_closest_marker(KEXEC_MARK) is not None


# -- hooks shared by both sides -------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyiommufd-vm", "pyiommufd VM tier (real Linux 7.3 in QEMU)")
    group.addoption("--vm-kernel", metavar="PATH", default=None,
                    help="boot this bzImage instead of the kernels of pyiommufd_vm_kernels")
    group.addoption("--vm-kernels", metavar="NAME,...", default=None,
                    help="run the vm tier only on these kernels of pyiommufd_vm_kernels")
    group.addoption("--vm-timeout", metavar="S", type=float, default=DEFAULT_VM_TIMEOUT,
                    help=f"hard time limit for the VM (default {DEFAULT_VM_TIMEOUT:.0f}s)")
    group.addoption("--no-vm", action="store_true", default=False,
                    help="deselect the vm (and kexec) tests")
    group.addoption("--vm-machine", choices=("qemu", "local"), default="qemu",
                    help="'local' runs the guest side as host processes with a simulated "
                         "kexec (for tests of the plugin itself)")


    parser.addini("pyiommufd_vm_kernels", type="linelist", default=[],
                  help="kernels for the vm tier, one a line: NAME [PATCH ...] [VAR=VALUE ...]")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{VM_MARK}: runs inside a QEMU guest on a real Linux 7.3 kernel (pyiommufd)")
    config.addinivalue_line(
        "markers", f"{KEXEC_MARK}: two-stage test around a real kexec (implies {VM_MARK}); "
                   "use the lu_stage fixture")
    if _in_guest():
        if os.environ.get(ENV_REPORT):
            config.pluginmanager.register(GuestSide(config), "pyiommufd-vm-guest")
    else:
        config.pluginmanager.register(HostSide(config), "pyiommufd-vm-host")


# -- the lu_stage fixture ----------------------------------------------------------------

class LuStage:
    """Handle of a two-stage kexec test (see the module docstring)."""

    def __init__(self, stage: int, nodeid: str, results: Path | None = None):
        self.stage = stage
        self.nodeid = nodeid
        self._results = results or _results()

    @property
    def _state_file(self) -> Path:
        digest = hashlib.sha256(self.nodeid.encode()).hexdigest()[:16]
        return self._results / LU_STATE_DIR / f"{digest}.json"

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._state_file.read_text())
            return data
        except FileNotFoundError:
            return {}

    def save(self, key: str, value: Any) -> None:
        """Persist ``value`` (JSON) for stage 2 of this test."""
        data = self._read()
        data[key] = value
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self._state_file)

    _MISSING = object()

    def load(self, key: str, default: Any = _MISSING) -> Any:
        data = self._read()
        if key in data:
            return data[key]
        if default is not LuStage._MISSING:
            return default
        raise KeyError(f"lu_stage: nothing saved under {key!r} in stage 1 of {self.nodeid}")

    def keep(self, *objects: Any) -> Any:
        """Keep ``objects`` (and the fds they own) alive until the kexec."""
        _KEPT.extend(objects)
        return objects[0] if len(objects) == 1 else objects

    @property
    def liveupdate(self) -> LiveUpdate:
        """The run's one open ``pyiommufd.luo.LiveUpdate`` (opened on first use)."""
        lu: LiveUpdate | None = _SHARED.get("liveupdate")
        if lu is None:
            from pyiommufd.luo import LiveUpdate
            lu = _SHARED["liveupdate"] = LiveUpdate.open()
        return lu

    @property
    def boot(self) -> int:
        return int(os.environ.get("PYIOMMUFD_VM_BOOT") or 0)

    def __repr__(self) -> str:
        return f"<LuStage {self.stage} of {self.nodeid}>"


@pytest.fixture
def lu_stage(request: pytest.FixtureRequest) -> LuStage:
    """Stage handle for ``@pytest.mark.pyiommufd_kexec`` tests (1 before, 2 after the kexec)."""
    if request.node.get_closest_marker(KEXEC_MARK) is None:
        pytest.fail(f"the lu_stage fixture is for @pytest.mark.{KEXEC_MARK} tests only",
                    pytrace=False)
    stage = os.environ.get(ENV_LU_STAGE)
    if not _in_guest() or stage not in ("1", "2"):
        pytest.skip("two-stage kexec tests run only inside the pyiommufd VM (driven by pytest "
                    "on the host)")
    return LuStage(int(stage), request.node.nodeid)


# -- guest side ----------------------------------------------------------------------------

class GuestSide:
    """Runs in the guest's pytest: reorder/select, record reports, kexec at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.stage = int(os.environ.get(ENV_LU_STAGE) or 1)
        self.report = _results() / os.environ[ENV_REPORT]
        self.release = os.uname().release
        self.boot = int(os.environ.get("PYIOMMUFD_VM_BOOT") or 0)
        self.kexec_items: dict[str, list[str]] = {}
        self.kexec_now = False

    def _append(self, rec: dict[str, Any]) -> None:
        rec.update(stage=self.stage, release=self.release, boot=self.boot)
        with open(self.report, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        if self.stage == 2:
            try:
                pending = set(json.loads((_results() / PENDING).read_text())["nodeids"])
            except (OSError, ValueError, KeyError):
                pending = set()
            keep = [it for it in items if _is_kexec(it) and it.nodeid in pending]
            drop = [it for it in items if it not in keep]
            if drop:
                config.hook.pytest_deselected(items=drop)
            items[:] = keep
        else:
            items[:] = [it for it in items if not _is_kexec(it)] + \
                       [it for it in items if _is_kexec(it)]
        self.kexec_items = {it.nodeid: [] for it in items if _is_kexec(it)}
        self._append({"kind": "collected", "nodeids": [it.nodeid for it in items]})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._append({"kind": "test", "report": data})
        if report.nodeid in self.kexec_items:
            self.kexec_items[report.nodeid].append(
                "passed" if report.passed and not hasattr(report, "wasxfail") else report.outcome)

    def pytest_warning_recorded(self, warning_message: Any, when: str, nodeid: str,
                                location: tuple[str, int, str] | None) -> None:
        self._append({"kind": "warning", "nodeid": nodeid, "when": when,
                      "category": type(warning_message.message).__name__,
                      "message": str(warning_message.message),
                      "where": f"{warning_message.filename}:{warning_message.lineno}"})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            data = self.config.hook.pytest_report_to_serializable(config=self.config,
                                                                  report=report)
            self._append({"kind": "collect", "report": data})

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._append({"kind": "session", "exitstatus": int(exitstatus)})
        if self.stage != 1:
            return
        passed = [n for n, outs in self.kexec_items.items()
                  if len(outs) == 3 and all(o == "passed" for o in outs)]
        if passed:
            from pyiommufd.vm import guest
            guest.write_json(_results() / PENDING, {"nodeids": passed, "time": time.time()})
            self.kexec_now = True

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if not self.kexec_now:
            return
        tw = config.get_terminal_writer()
        n = len(json.loads((_results() / PENDING).read_text())["nodeids"])
        tw.line(f"pyiommufd: {n} kexec test(s) passed stage 1; kexec now "
                f"(keeping {len(_KEPT)} object(s) alive)")
        tw.flush()
        from pyiommufd.vm import guest
        try:
            guest.kexec_same_kernel(by="pytest")
        except Exception as exc:   # the host reports the kexec tests as failed
            msg = f"{type(exc).__name__}: {exc}"
            (_results() / KEXEC_ERROR).write_text(msg + "\n")
            tw.line(f"pyiommufd: kexec FAILED: {msg}", red=True)


# -- host side -------------------------------------------------------------------------------

def _outcome_word(reports: list[Report]) -> str:
    for r in reports:
        if r.when in ("setup", "teardown") and r.failed:
            return "ERROR"
    for r in reports:
        if hasattr(r, "wasxfail"):
            return "XFAIL" if r.skipped else "XPASS"
        if r.failed:
            return "FAILED"
        if r.skipped:
            return "SKIPPED"
    return "PASSED" if reports else "NO RESULT"


#: a guest test's ``request.node.add_report_section(when, SUMMARY_SECTION, text)`` lands in
#: the VM tier's terminal summary (e.g. the fail-nth table), whatever the outcome
SUMMARY_SECTION = "vm summary"


def _summary_sections(reports: list[Report]) -> list[str]:
    return [(f"{title.split(':')[0]}: " if title.startswith("stage ") else "") + text
            for r in reports for title, text in r.sections if SUMMARY_SECTION in title]


def _uses_hypothesis(item: pytest.Item) -> bool:
    return bool(getattr(getattr(item, "obj", None), "is_hypothesis_test", False))


def _uses_fixture(name: str) -> Callable[[pytest.Item], bool]:
    return lambda item: name in getattr(item, "fixturenames", ())


# plugin module -> "does this vm item need it?"
_ON_DEMAND_PLUGINS: dict[str, Callable[[pytest.Item], bool]] = {
    "_hypothesis_pytestplugin": _uses_hypothesis,
    "pytest_benchmark.plugin": _uses_fixture("benchmark"),
}


class KernelTarget:
    """One kernel the vm tier runs on: a name, patches on the pristine tree,
    guest environment; ``unavailable`` says why it cannot be built."""

    def __init__(self, name: str, patches: tuple[Path, ...] = (), env: dict[str, str] | None = None,
                 user_kernel: str | None = None, unavailable: str | None = None,
                 fragments: tuple[Path, ...] = ()) -> None:
        self.name = name
        self.patches = patches
        self.fragments = fragments
        self.env = dict(env or {})
        self.user_kernel = user_kernel
        self.unavailable = unavailable

    @classmethod
    def parse(cls, line: str, rootdir: Path) -> "KernelTarget":
        words = line.split()
        if not words or "=" in words[0] or "/" in words[0]:
            raise pytest.UsageError(f"pyiommufd_vm_kernels: {line!r} does not start with a name")
        patches: list[Path] = []
        fragments: list[Path] = []
        env: dict[str, str] = {}
        missing = []
        for word in words[1:]:
            if "=" in word:
                var, _, value = word.partition("=")
                env[var] = value
                continue
            path = (rootdir / word).resolve()
            (fragments if word.endswith(".config") else patches).append(path)
            if not path.is_file():
                missing.append(word)
        why = (f"patch {', '.join(missing)} not found (relative to {rootdir})" if missing else None)
        return cls(words[0], tuple(patches), env, unavailable=why, fragments=tuple(fragments))

    def recipe(self) -> KernelRecipe:
        from pyiommufd.vm import kernel as vmkernel

        return vmkernel.KernelRecipe.of(self.patches, self.fragments)

    def describe(self) -> str:
        if self.user_kernel:
            return f"{self.name} ({self.user_kernel})"
        if not self.patches:
            return f"{self.name} (pristine 7.3.4)"
        return f"{self.name} (7.3.4 + {' + '.join(p.name for p in self.patches)})"


def kernel_targets(config: pytest.Config) -> list[KernelTarget]:
    """The kernels this session's vm tier runs on, in order."""
    user = config.getoption("vm_kernel")
    if user:
        return [KernelTarget("user", user_kernel=user)]
    lines = config.getini("pyiommufd_vm_kernels") or ["stock"]
    targets = [KernelTarget.parse(line, Path(config.rootpath)) for line in lines]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise pytest.UsageError(f"pyiommufd_vm_kernels: duplicate kernel names in {names}")
    only = config.getoption("vm_kernels")
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise pytest.UsageError(f"--vm-kernels: unknown kernel(s) {', '.join(unknown)}; "
                                    f"pyiommufd_vm_kernels has {', '.join(names)}")
        targets = [t for t in targets if t.name in wanted]
    return targets


class _VmOutcome:
    """What happened to the VM run as a whole."""

    def __init__(self) -> None:
        self.ran = False               # pytest started in the guest
        self.unavailable: str | None = None   # why the tier did not run at all
        self.result: VmResult | None = None
        self.records: dict[int, dict[str, list[Report]]] = {1: {}, 2: {}}
        self.collect_errors: list[Report] = []
        self.guest_release: dict[int, str] = {}
        self.guest_boot: dict[int, int] = {}
        self.kexec_error: str | None = None
        self.warnings: list[tuple[int, dict[str, Any]]] = []
        self.seconds = 0.0


def _clone(item: Any, target: str) -> pytest.Item:
    """A host item standing for ``item`` run on another kernel (never run on
    the host: the plugin reports the guest's outcome for it). Its node id is
    the item's with ``@target``: ``test_x[p]@target`` (pytest < 9.2 builds ids
    from the name) or ``test_x@target[p]`` (9.2 builds them from the original
    name and the parameters)."""
    original = getattr(item, "originalname", None) or item.name
    clone: pytest.Item = type(item).from_parent(
        item.parent, name=f"{item.name}@{target}", callspec=getattr(item, "callspec", None),
        callobj=getattr(item, "obj", None), fixtureinfo=getattr(item, "_fixtureinfo", None),
        originalname=f"{original}@{target}", keywords=dict(item.keywords))
    for mark in item.own_markers:
        if mark not in clone.own_markers:
            clone.own_markers.append(mark)
            clone.keywords[mark.name] = mark
    return clone


def split_target(nodeid: str) -> tuple[str, str | None]:
    """``(the test's own node id, kernel)`` of a host item's node id; kernel is
    None for the first kernel's items, which keep the test's own id."""
    m = re.match(r"^(?P<head>.*::[^\[@]+)@(?P<k>[\w.-]+)(?P<params>\[.*\])?$", nodeid)
    if m:
        return m.group("head") + (m.group("params") or ""), m.group("k")
    m = re.match(r"^(?P<rest>.*\])@(?P<k>[\w.-]+)$", nodeid)
    if m:
        return m.group("rest"), m.group("k")
    return nodeid, None


class HostSide:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.targets: list[KernelTarget] = []
        self.vm_items: list[pytest.Item] = []          # the tests' own items (what the guest collects)
        self.placement: dict[str, tuple[KernelTarget, pytest.Item]] = {}   # host nodeid -> (kernel, item)
        self.deselected = 0
        self.outcomes: dict[str, _VmOutcome] = {}
        self.lines: dict[str, list[str]] = {}

    # collection
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        for it in items:
            if _is_kexec(it) and it.get_closest_marker(VM_MARK) is None:
                it.add_marker(VM_MARK)
        vm = [it for it in items if _is_vm(it)]
        if not vm:
            return
        if config.getoption("no_vm"):
            config.hook.pytest_deselected(items=vm)
            items[:] = [it for it in items if not _is_vm(it)]
            self.deselected = len(vm)
            return
        self.targets = kernel_targets(config)
        self.vm_items = vm
        first, *others = self.targets
        for it in vm:
            self.placement[it.nodeid] = (first, it)
        for target in others:
            for it in vm:
                clone = _clone(it, target.name)
                self.placement[clone.nodeid] = (target, it)
                items.append(clone)

    # running
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        placed = self.placement.get(item.nodeid)
        if placed is None:
            return None
        target, original = placed
        if target.name not in self.outcomes:
            self.outcomes[target.name] = self._run_vm(target)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self._reports_for(item, original, target)
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # Nothing was set up on the host for this item, but the previous host
        # item's fixtures may still be up (its teardown planned for this item).
        item.session._setupstate.teardown_exact(nextitem)
        return True

    def _say(self, msg: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.ensure_newline()
            tr.write_line(msg)
            tr._tw.flush()
        else:
            print(msg, flush=True)

    def _job(self, target: KernelTarget) -> Job:
        from pyiommufd.vm import runner
        rootdir = str(self.config.rootpath)
        base = [runner.python_executable(), "-m", "pytest", "-p", "no:cacheprovider", "-v",
                "--rootdir", rootdir, *self._plugin_args()]
        if self.config.inipath:
            base += ["-c", str(self.config.inipath)]
        ids = [it.nodeid for it in self.vm_items]
        kexec_ids = [it.nodeid for it in self.vm_items if _is_kexec(it)]
        # Scanning every installed distribution for pytest11 entry points is slow
        # under TCG over 9p; load exactly the plugins the host session has.
        env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        stages = [runner.Stage(base + ids, env={**env, ENV_LU_STAGE: "1",
                                                ENV_REPORT: "pytest-1.jsonl"},
                               cwd=rootdir, kexec="self" if kexec_ids else "none")]
        if kexec_ids:
            stages.append(runner.Stage(base + kexec_ids,
                                       env={**env, ENV_LU_STAGE: "2",
                                            ENV_REPORT: "pytest-2.jsonl"},
                                       cwd=rootdir, needs_kexec=True))
        return runner.Job(stages, env={**target.env, ENV_TARGET: target.name})

    def _plugin_args(self) -> list[str]:
        """``-p`` options that load, in the guest, the plugins this host session
        loaded from entry points or ``-p`` (ours first). Heavy plugins that only
        matter to tests using them (:data:`_ON_DEMAND_PLUGINS`) are loaded only
        if a vm test needs them: importing them costs seconds under TCG."""
        names = [__name__]
        for plugin, _dist in self.config.pluginmanager.list_plugin_distinfo():
            name = getattr(plugin, "__name__", None)
            needed = _ON_DEMAND_PLUGINS.get(name) if name is not None else None
            if needed is not None and not any(needed(it) for it in self.vm_items):
                continue
            if name and name not in names:
                names.append(name)
        for spec in getattr(self.config.option, "plugins", None) or []:
            if spec not in names and spec != "no:cacheprovider":
                names.append(spec)
        out: list[str] = []
        for name in names:
            out += ["-p", name]
        return out

    def _run_vm(self, target: KernelTarget) -> _VmOutcome:
        out = _VmOutcome()
        t0 = time.monotonic()
        if target.unavailable:
            out.unavailable = f"kernel {target.name}: {target.unavailable}"
            return out
        n = len(self.vm_items)
        nk = sum(1 for it in self.vm_items if _is_kexec(it))
        self._say(f"[vm] kernel {target.describe()}: running {n} vm test(s) in the guest"
                  + (f" ({nk} two-stage kexec test(s))" if nk else ""))
        try:
            from pyiommufd.qemu import binary
            # the guest's VMM tests run QEMU 11.1 from the cache, which they see read-only
            binary.resolve(progress=self._say).missing(set(binary.Feature))
        except Exception as exc:    # noqa: BLE001 - those tests fail in the guest, saying why
            self._say(f"[vm] no QEMU for the guest's VMM tests: {exc}")
        try:
            from pyiommufd.vm import runner
            res = runner.run(self._job(target), kernel=target.user_kernel, recipe=target.recipe(),
                             timeout=self.config.getoption("vm_timeout"), progress=self._say,
                             machine=self.config.getoption("vm_machine"))
        except Exception as exc:   # VmError and anything unexpected: the tier did not run
            why = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            out.unavailable = f"kernel {target.name}: {why}"
            out.seconds = time.monotonic() - t0
            return out
        out.result = res
        out.seconds = time.monotonic() - t0
        for stage in (1, 2):
            path = res.share / f"pytest-{stage}.jsonl"
            if not path.exists():
                continue
            out.ran = True
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                out.guest_release.setdefault(stage, rec.get("release"))
                out.guest_boot.setdefault(stage, rec.get("boot"))
                if rec.get("kind") == "test":
                    rep = self.config.hook.pytest_report_from_serializable(
                        config=self.config, data=rec["report"])
                    if isinstance(rep.longrepr, list):   # JSON turned the skip tuple into a list
                        rep.longrepr = tuple(rep.longrepr)
                    rep._vm_release = rec.get("release")
                    rep._vm_boot = rec.get("boot")
                    out.records[stage].setdefault(rep.nodeid, []).append(rep)
                elif rec.get("kind") == "warning":
                    out.warnings.append((stage, rec))
                elif rec.get("kind") == "collect":
                    rep = self.config.hook.pytest_report_from_serializable(
                        config=self.config, data=rec["report"])
                    out.collect_errors.append(rep)
        kerr = res.share / KEXEC_ERROR
        if kerr.exists():
            out.kexec_error = kerr.read_text(errors="replace").strip()
        if not out.ran:
            why = res.error or "pytest did not start in the guest"
            stage1 = res.stages[0] if res.stages else None
            if stage1 is not None and stage1.ended_by == "exit":
                why = f"pytest exited with status {stage1.exit} in the guest before running tests"
            out.unavailable = f"{why} (serial log: {res.serial_log})"
        return out

    # report construction
    def _synthetic(self, item: pytest.Item, when: Literal["setup", "call", "teardown"],
                   outcome: Literal["passed", "failed", "skipped"], longrepr: Any,
                   sections: Iterable[tuple[str, str]] = ()) -> pytest.TestReport:
        from _pytest.reports import TestReport
        now = time.time()
        if outcome == "skipped" and isinstance(longrepr, str):
            path, lineno, _ = item.location
            longrepr = (str(item.path), (lineno or 0) + 1, longrepr)
        return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome,
                          longrepr, when, list(sections), 0.0, now, now, [])

    def _not_run_reports(self, item: pytest.Item, reason: str) -> list[Report]:
        if os.environ.get("CI") == "true":
            msg = f"VM tier did not run (CI=true makes this a failure): {reason}"
            return [self._synthetic(item, "setup", "passed", None),
                    self._synthetic(item, "call", "failed", msg),
                    self._synthetic(item, "teardown", "passed", None)]
        return [self._synthetic(item, "setup", "skipped", f"VM tier did not run: {reason}"),
                self._synthetic(item, "teardown", "passed", None)]

    def _missing_reason(self, out: _VmOutcome, stage: int) -> str:
        res = out.result
        if stage == 2 and out.kexec_error:
            return f"the kexec failed: {out.kexec_error}"
        if res is not None and len(res.stages) >= stage:
            st = res.stages[stage - 1]
            if st.ended_by != "exit" or st.exit not in (0, 1):
                detail = st.describe()
                if res.timed_out:
                    detail += f"; VM timed out after {res.timeout:.0f}s"
                return f"no result from the guest ({detail}; serial log: {res.serial_log})"
        if res is not None and res.timed_out:
            return f"no result from the guest: VM timed out after {res.timeout:.0f}s"
        return "no result from the guest (not collected there? see the collection errors)"

    def _complete(self, item: pytest.Item, reps: list[Report], stage: int, vm: _VmOutcome) -> list[Report]:
        """Pad a partial set of phase reports (the guest died mid-test)."""
        whens = [r.when for r in reps]
        out = list(reps)
        if not reps:
            return [self._synthetic(item, "setup", "failed", self._missing_reason(vm, stage)),
                    self._synthetic(item, "teardown", "passed", None)]
        if "teardown" not in whens:
            if reps[-1].passed and reps[-1].when == "setup":
                out.append(self._synthetic(item, "call", "failed", self._missing_reason(vm, stage)))
            elif reps[-1].passed:
                out.append(self._synthetic(item, "teardown", "failed",
                                           self._missing_reason(vm, stage)))
                return out
            out.append(self._synthetic(item, "teardown", "passed", None))
        return out

    def _annotate(self, reps: list[Report], text: str) -> None:
        for r in reps:
            r.sections.append(("vm", text))
            rel = getattr(r, "_vm_release", None)
            r.user_properties = list(r.user_properties) + [("vm_kernel", rel or "?")]

    def _reports_for(self, item: pytest.Item, original: pytest.Item, target: KernelTarget) -> list[Report]:
        reps = self._guest_reports(item, original, target)
        for r in reps:   # a clone reports the guest's outcome under its own id
            r.nodeid, r.location = item.nodeid, item.location
        self.lines.setdefault(target.name, []).extend(_summary_sections(reps))
        return reps

    def _guest_reports(self, item: pytest.Item, original: pytest.Item, target: KernelTarget) -> list[Report]:
        out = self.outcomes[target.name]
        lines = self.lines.setdefault(target.name, [])
        tag = target.name
        if out.unavailable:
            reps = self._not_run_reports(item, out.unavailable)
            lines.append(f"[vm {tag} -] {item.nodeid} {_outcome_word(reps)} (VM tier did not run)")
            return reps
        nodeid = original.nodeid
        r1 = out.records[1].get(nodeid, [])
        rel1 = out.guest_release.get(1) or "?"
        if not _is_kexec(item):
            reps = self._complete(item, r1, 1, out)
            self._annotate(reps, f"ran in the VM on kernel {target.name}, Linux {rel1} "
                                 f"(boot {out.guest_boot.get(1)})")
            word = _outcome_word(reps)
            lines.append(f"[vm {tag} {rel1}] {item.nodeid} {word}")
            return reps
        # two-stage kexec test
        reps1 = self._complete(item, r1, 1, out)
        word1 = _outcome_word(reps1)
        if word1 != "PASSED":
            self._annotate(reps1, f"stage 1 ran in the VM on kernel {target.name}, Linux {rel1}; "
                                  "it did not pass, so stage 2 (after the kexec) was skipped")
            lines.append(f"[vm {tag} {rel1}] {item.nodeid} {word1} (stage 1 {word1}; "
                         "stage 2 skipped)")
            return reps1
        r2 = out.records[2].get(nodeid, [])
        rel2 = out.guest_release.get(2) or "?"
        if not r2:
            reason = self._missing_reason(out, 2)
            call1 = next((r for r in reps1 if r.when == "call"), None)
            fail = self._synthetic(item, "call", "failed",
                                   f"stage 1 passed on Linux {rel1}, but stage 2 (after the kexec) "
                                   f"did not run: {reason}",
                                   sections=call1.sections if call1 else ())
            reps = [reps1[0], fail, reps1[-1]]
            self._annotate(reps, f"stage 1 PASSED on kernel {target.name}, Linux {rel1}; "
                                 "stage 2 did not run")
            lines.append(f"[vm {tag} {rel1}] {item.nodeid} FAILED (stage 1 PASSED; stage 2 did not "
                         f"run: {reason})")
            return reps
        reps2 = self._complete(item, r2, 2, out)
        word2 = _outcome_word(reps2)
        for r in reps2:
            r1same = next((x for x in reps1 if x.when == r.when), None)
            if r1same is not None:
                r.sections[:0] = [(f"stage 1: {name}", text) for name, text in r1same.sections]
                r.duration = (r.duration or 0) + (r1same.duration or 0)
        self._annotate(reps2, f"stage 1 PASSED on kernel {target.name}, Linux {rel1} (boot "
                              f"{out.guest_boot.get(1)}); stage 2 {word2} on Linux {rel2} (boot "
                              f"{out.guest_boot.get(2)}, after kexec)")
        lines.append(f"[vm {tag} {rel1} -> kexec -> {rel2}] {item.nodeid} {word2} "
                     f"(stage 1 PASSED, stage 2 {word2})")
        return reps2

    # summary
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        if self.deselected:
            tr.write_sep("!", f"VM tier NOT run: --no-vm deselected {self.deselected} vm test(s)",
                         yellow=True, bold=True)
            return
        if not self.vm_items or not self.outcomes:
            return
        tr.write_sep("=", "VM tier", bold=True)
        tr.write_line("kernels: " + "; ".join(t.describe() for t in self.targets))
        for target in self.targets:
            out = self.outcomes.get(target.name)
            if out is None:
                continue
            for line in self.lines.get(target.name, []):
                tr.write_line(line)
            self._summarize(tr, target, out)

    def _summarize(self, tr: pytest.TerminalReporter, target: KernelTarget, out: _VmOutcome) -> None:
        for stage, w in out.warnings[:20]:
            tr.write_line(f"[vm {target.name}] guest warning (stage {stage}) {w.get('nodeid') or ''}: "
                          f"{w.get('category')}: {w.get('message')} ({w.get('where')})",
                          yellow=True)
        if len(out.warnings) > 20:
            tr.write_line(f"[vm {target.name}] ... and {len(out.warnings) - 20} more guest warnings",
                          yellow=True)
        for rep in out.collect_errors:
            tr.write_line(f"[vm {target.name}] guest collection error in {rep.nodeid}:", red=True)
            tr.write_line(str(rep.longreprtext)[-2000:])
        res = out.result
        if out.unavailable:
            tr.write_sep("!", f"VM tier did NOT run on kernel {target.name}: {out.unavailable}",
                         red=True, bold=True)
            verdict = "FAILED (CI=true)" if os.environ.get("CI") == "true" else "SKIPPED"
            tr.write_line(f"{len(self.vm_items)} vm test(s) {verdict}.", red=True, bold=True)
            if res is not None and res.serial_log:
                tr.write_line(f"serial log: {res.serial_log}; tail:")
                tr.write_line(res.serial_tail(25))
            return
        assert res is not None      # it ran: only a run that did not start leaves none
        n_run = sum(1 for it in self.vm_items if it.nodeid in out.records[1])
        rel = out.guest_release.get(1) or "?"
        t = res.timings
        timing = ", ".join(f"{name} {t[key]:.1f}s" for name, key in (
            ("boot", "first_boot"), ("stage 1", "stage1"), ("kexec+boot", "kexec_2"),
            ("stage 2", "stage2"), ("VM total", "total")) if key in t)
        kx = max(0, res.boot_count - 1)
        tr.write_line(f"VM tier on kernel {target.describe()}: {n_run} of {len(self.vm_items)} vm "
                      f"test(s) ran in the guest on Linux {rel} ({res.boot_count} boot(s), {kx} "
                      f"kexec(s); {timing})", bold=True, green=res.ok and n_run == len(self.vm_items))
        # pytest exits 1 when tests failed: that is not a VM problem.
        bad = [s for s in res.stages
               if not (s.ended_by == "kexec" or (s.ended_by == "exit" and s.exit in (0, 1)))]
        if res.error or bad:
            tr.write_line("VM problems: " + "; ".join(
                ([res.error] if res.error else []) + [s.describe() for s in bad]), red=True)
            tr.write_line(f"serial log tail ({res.serial_log}):")
            tr.write_line(res.serial_tail(20))
        tr.write_line(f"VM run directory: {res.run_dir} (serial log: {res.serial_log})")
