"""The live-update lifecycle commands: ``plan``, ``preserve``, ``kexec``,
``restore``, ``finish``, ``status`` and ``agent``.

Everything that must outlive a command (``/dev/liveupdate``, session fds, the
files preserved in them) is held by the holder agent (:mod:`pyiommufd.agent`);
these commands talk to it over its socket (``--socket``, else
``$PYIOMMUFD_AGENT_SOCKET``, else ``/run/pyiommufd/agent.sock``).

Exit codes (``pyiommufd exit-codes``): 0 success; 1 a verification failed or
``kexec`` refused to run without ``--force``; 2 bad input or an invalid plan;
3 the kernel refused; 4 the kernel lacks a capability; 5 busy (e.g. FINISH
with unretrieved files, an agent refusing to drop preserved state); 6 not
permitted; 7 the agent is not reachable.

Heavy modules (cffi and the object model) are imported inside the commands,
so ``--help`` stays light.
"""
from __future__ import annotations

import errno as E
import functools
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, ParamSpec, TextIO, TypeVar

import click

from .. import exitcodes
from .abi_option import check_env_nr, env_lu_abi, lu_abi_option, option_lu_abi
from .output import CommandError, echo_json, echo_table, error_object, json_option, report_error, warn

if TYPE_CHECKING:
    from ..agent.client import AgentClient
    from ..backend import Backend
    from ..manifest import Manifest
    from ..planner import Plan

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def exec_with_fds(argv: list[str], fds: list[int], names: list[str]) -> Any:
    """exec ``argv`` with ``fds`` at 3, 4, ... and ``LISTEN_FDS``,
    ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set, as systemd passes fds
    (sd_listen_fds(3)). ``LISTEN_PID`` is this pid: execve keeps it."""
    import fcntl

    top = LISTEN_FDS_START + len(fds)
    # first out of the way of 3..top-1, so no fd is overwritten before it moved
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    for i, fd in enumerate(temps):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
               LISTEN_FDNAMES=":".join(names))
    return os.execvpe(argv[0], argv, env)


#: what ``restore --exec`` calls with (argv, fds, names); tests replace it
exec_command: Callable[[list[str], list[int], list[str]], Any] = exec_with_fds


# -- shared helpers --------------------------------------------------------------------
def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return os.environ.get("PYIOMMUFD_DEBUG", "") not in ("", "0")


_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def handle_errors(fn: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """Turn pyiommufd errors into one ``pyiommufd: error:`` line and the
    documented exit code (also under ``CliRunner``, not only ``cli.main``)."""

    @functools.wraps(fn)
    def wrapper(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        from .. import errors

        try:
            return fn(*args, **kwargs)
        except (SystemExit, click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (errors.PyiommufdError, OSError) as exc:
            import traceback

            from .output import report_error

            if _debug():
                traceback.print_exc()
            sys.exit(report_error(str(exc), exitcodes.exit_code_for(exc), errno=getattr(exc, "errno", None),
                                  as_json=bool(kwargs.get("as_json"))))

    return wrapper


def _usage(message: str) -> Exception:
    from ..errors import UsageError

    return UsageError(message)


socket_option = click.option("--socket", "socket_path", metavar="PATH", default=None,
                             help="Agent socket (default: $PYIOMMUFD_AGENT_SOCKET or /run/pyiommufd/agent.sock).")


def _need_session(session: str | None) -> str:
    if not session:
        raise _usage("--session NAME is required")
    from ..luo import check_session_name

    check_session_name(session)
    return session


def _client(socket_path: str | None) -> AgentClient:
    from ..agent import AgentClient

    return AgentClient(socket_path)


def _hex(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) else "-"


# -- plan -------------------------------------------------------------------------------
def _plan_options(fn: Callable[..., None]) -> Callable[..., None]:
    opts = [
        click.option("--session", metavar="NAME", help="LUO session name."),
        click.option("--memfd", "memfds", multiple=True, metavar="NAME:SIZE[:token=T][:fill=F][:seals=S]",
                     help="A memfd (fill: zero, random, random:SEED, @FILE, hex:PATTERN; seals default "
                          "seal,grow,shrink). Repeatable."),
        click.option("--device", "devices", multiple=True, metavar="BDF|CDEV",
                     help="A VFIO device (PCI address or /dev/vfio/devices/vfioN), attached to its own "
                          "marked HWPT on one IOAS mapping every memfd. Repeatable."),
        click.option("--hwpt-token", "hwpt_tokens", multiple=True, metavar="T",
                     help="LU token of each device's HWPT (one per --device; default: assigned)."),
        click.option("--device-token", "device_tokens", multiple=True, metavar="T",
                     help="LUO token of each device's cdev (one per --device; default: assigned)."),
        click.option("--iommufd-token", metavar="T", help="LUO token of the iommufd (default: assigned)."),
        click.option("--iommufd", "with_iommufd", is_flag=True,
                     help="Preserve an iommufd mapping the memfds even without --device."),
        click.option("--iova", "base_iova", metavar="ADDR",
                     help="Map the memfds at fixed IOVAs from ADDR up (default: the kernel picks)."),
        lu_abi_option(),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _build_plan(plan_file: str | None, session: str | None, memfds: tuple[str, ...], devices: tuple[str, ...],
                hwpt_tokens: tuple[str, ...], device_tokens: tuple[str, ...], iommufd_token: str | None,
                with_iommufd: bool, base_iova: str | None, lu_abi: str | None, *,
                file_usage: str = "--plan FILE") -> Plan:
    """``file_usage``: how the command takes a plan file, for its messages."""
    plan = _plan_from_input(plan_file, session, memfds, devices, hwpt_tokens, device_tokens, iommufd_token,
                            with_iommufd, base_iova, lu_abi, file_usage)
    check_env_nr()
    if plan.lu_abi is None:  # neither --lu-abi nor the file chose: the CLI passes the variable down
        plan.lu_abi = env_lu_abi()
    return plan


def _plan_from_input(plan_file: str | None, session: str | None, memfds: tuple[str, ...],
                     devices: tuple[str, ...], hwpt_tokens: tuple[str, ...], device_tokens: tuple[str, ...],
                     iommufd_token: str | None, with_iommufd: bool, base_iova: str | None,
                     lu_abi: str | None, file_usage: str) -> Plan:
    from .. import planner

    lu_abi = option_lu_abi(lu_abi)
    if plan_file is not None:
        extra = [name for name, value in (("--memfd", memfds), ("--device", devices),
                                          ("--hwpt-token", hwpt_tokens), ("--device-token", device_tokens),
                                          ("--iommufd-token", iommufd_token), ("--iommufd", with_iommufd),
                                          ("--iova", base_iova)) if value]
        if extra:
            raise _usage(f"give either a plan file or {', '.join(extra)}, not both")
        plan = planner.load_plan(plan_file)
        if session is not None and session != plan.session:
            # which one was meant? Taking either silently preserves into the wrong session
            raise _usage(f"--session {session!r} differs from the plan's session {plan.session!r} "
                         f"({plan_file}): give one of them")
        if lu_abi:
            plan.lu_abi = lu_abi
        return plan
    return planner.plan_from_options(session, memfds=memfds, devices=devices, hwpt_tokens=hwpt_tokens,
                                     device_tokens=device_tokens, iommufd_token=iommufd_token,
                                     iommufd=with_iommufd, lu_abi=lu_abi, base_iova=base_iova,
                                     plan_file=file_usage)


@click.command("plan")
@click.argument("plan_file", required=False, metavar="[FILE]")
@click.option("--dry-run", is_flag=True, help="Accepted for clarity: `plan` never touches the kernel.")
@_plan_options
@json_option
@handle_errors
def plan(plan_file: str | None, dry_run: bool, session: str | None, memfds: tuple[str, ...],
         devices: tuple[str, ...], hwpt_tokens: tuple[str, ...], device_tokens: tuple[str, ...],
         iommufd_token: str | None, with_iommufd: bool, base_iova: str | None, lu_abi: str | None,
         as_json: bool) -> None:
    """Validate a preservation plan and print the order of operations.

    FILE is a TOML or JSON plan (see `pyiommufd.planner`), or describe the plan
    with --session/--memfd/--device/... Never touches the kernel. Prints the
    numbered operations, what stage 2 will retrieve and every problem.
    Exit 0 when the plan is valid, 2 when it is not."""
    from .. import planner

    p = _build_plan(plan_file, session, memfds, devices, hwpt_tokens, device_tokens, iommufd_token,
                    with_iommufd, base_iova, lu_abi, file_usage="a plan FILE")
    rep = planner.report(p)
    errs = [planner.Problem(**x) for x in rep["problems"] if x["severity"] == "error"]
    message = None
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        message = f"the plan is invalid: {errs[0].describe()}{more}"
    if as_json:
        if message:
            rep["error"] = error_object(exitcodes.BAD_INPUT, message)
        echo_json(rep)
    else:
        click.echo(f"plan for session {p.session!r} (LU ABI: {rep['lu_abi']})")
        if rep["operations"]:
            click.echo("operations:")
            for op in rep["operations"]:
                click.echo("  " + str(planner.Operation(**op)))
            click.echo("stage 2 will retrieve:")
            for r in rep["stage2"]:
                click.echo(f"  token {_hex(r['token']):<10} {r['kind']:<9} {r['name']:<16} {r['expect']}")
        if rep["problems"]:
            click.echo("problems:")
            for x in rep["problems"]:
                click.echo(f"  {planner.Problem(**x)}")
        elif rep["valid"]:
            click.echo("no problems")
    if message:
        sys.exit(report_error(message, exitcodes.BAD_INPUT))


# -- preserve -----------------------------------------------------------------------------
@click.command("preserve")
@click.option("--plan", "plan_file", metavar="FILE", help="A TOML or JSON plan (instead of the options).")
@_plan_options
@socket_option
@json_option
@handle_errors
def preserve(plan_file: str | None, session: str | None, memfds: tuple[str, ...], devices: tuple[str, ...],
             hwpt_tokens: tuple[str, ...], device_tokens: tuple[str, ...], iommufd_token: str | None,
             with_iommufd: bool, base_iova: str | None, lu_abi: str | None, socket_path: str | None,
             as_json: bool) -> None:
    """Create objects and preserve them into a session held by the agent.

    Validates the plan first (exit 2 with the problems), creates and seals the
    memfds, maps them, binds/attaches the devices, marks the HWPTs, writes the
    manifest (token 0), then preserves manifest -> memfds -> iommufds -> cdevs
    through the agent, which is started if none runs. If a step fails, the
    half-built session is released (unpreserved) and the error reported."""
    from .. import planner
    from ..agent import ensure_running
    from ..backend import get_backend
    from ..errors import PlanError

    p = _build_plan(plan_file, session, memfds, devices, hwpt_tokens, device_tokens, iommufd_token,
                    with_iommufd, base_iova, lu_abi)
    problems = planner.validate(p)
    errs = planner.errors_in(problems)
    if errs:
        raise PlanError([x.describe() for x in errs])
    for x in problems:
        warn(x.describe())
    ops = planner.order(p)
    errs = planner.errors_in(planner.check_order(p, ops))
    if errs:  # pragma: no cover - order() satisfies check_order by construction
        raise PlanError([x.describe() for x in errs])
    be = get_backend()
    _preflight_devices(p, be)
    from ..rlimits import raise_nofile

    # each memfd, iommufd and device is open here until the agent holds it
    raise_nofile(len(p.memfds) + len(p.iommufds) + len(p.devices) + 64)
    started = not _client(socket_path).is_running()
    client = ensure_running(socket_path, backend=be)
    try:
        done = planner.execute(p, client, backend=be, ops=ops, notify=warn)
    except BaseException:
        if started:
            _stop_if_idle(client)
        raise
    info = client.ping()
    if as_json:
        out = done.as_dict()
        out["agent"] = {"pid": info.get("pid"), "socket": client.socket_path}
        echo_json(out)
        return
    click.echo(f"preserved into session {p.session!r}, held by the agent (pid {info.get('pid')}, "
               f"{client.socket_path}):")
    echo_table([(_hex(x["token"]), x["kind"], x["name"], x.get("detail")) for x in done.preserved],
               ("token", "kind", "name", "details"))
    click.echo(f"next: `pyiommufd kexec --kernel <bzImage>`; after the kexec: "
               f"`pyiommufd restore --session {p.session}`")


def _preflight_devices(p: Plan, be: Backend) -> None:
    """Bad device names are bad input (exit 2), found before anything is created."""
    from .. import pci

    for d in p.devices:
        if d.cdev is not None:
            if not be.files.exists(d.cdev):
                raise _usage(f"device {d.name!r}: {d.cdev}: no such device node")
        elif d.bdf is not None:
            dev = pci.PciDevice(d.bdf, be)
            if not dev.exists:
                raise _usage(f"device {d.name!r}: no PCI device {dev.bdf}")


# -- restore ------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def placeholders(args: list[str]) -> list[str]:
    """The ``{...}`` keys used in ``args`` (``{{``/``}}`` are literal braces)."""
    keys = []
    for arg in args:
        for m in _PLACEHOLDER.finditer(arg.replace("{{", "").replace("}}", "")):
            keys.append(m.group(1))
    return keys


def check_placeholders(args: list[str]) -> None:
    """Placeholders that can never be valid, found before anything starts:
    an empty ``{}``, a stray brace, a key with blanks."""
    for arg in args:
        rest = _PLACEHOLDER.sub("", arg.replace("{{", "").replace("}}", ""))
        if "{" in rest or "}" in rest:
            raise _usage(f"--exec: unbalanced brace in {arg!r} (write {{{{ and }}}} for literal braces)")
    for key in placeholders(args):
        if not key or any(c.isspace() for c in key):
            raise _usage(f"--exec: placeholder {{{key}}} is not a token, a manifest entry name or {{manifest}}")


def _stop_if_idle(client: AgentClient) -> None:
    """Stop an agent this command started when it holds no session: a failed
    command leaves nothing behind. An agent holding a retrieved session is
    kept (closing that session would finish or drop it)."""
    from ..agent import AgentError

    try:
        if not client.status().get("sessions"):
            client.stop(False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and client.is_running():
                time.sleep(0.05)
    except AgentError:
        pass


def resolve_placeholder(key: str, manifest: Manifest) -> int:
    """The token a placeholder names: a decimal or 0x token, an entry name, or
    ``manifest`` (token 0)."""
    from ..manifest import MANIFEST_TOKEN

    if key == "manifest":
        return MANIFEST_TOKEN
    if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", key):
        token = int(key, 0)
        if token == MANIFEST_TOKEN or manifest.entry(token) is not None:
            return token
        raise _usage(f"--exec: placeholder {{{key}}}: token {token:#x} is not in session {manifest.session!r} "
                     f"(tokens: {', '.join(hex(t) for t in manifest.tokens)})")
    entry = manifest.by_name(key)
    if entry is None:
        names = ", ".join(["manifest"] + [e.name for e in manifest.entries])
        raise _usage(f"--exec: unknown placeholder {{{key}}} (use a token or one of: {names})")
    return entry.token


def expand(args: list[str], fds: dict[int, int], manifest: Manifest) -> list[str]:
    out = []
    for arg in args:
        parts = re.split(r"(\{\{|\}\}|\{[^{}]*\})", arg)
        text = []
        for part in parts:
            if part == "{{":
                text.append("{")
            elif part == "}}":
                text.append("}")
            elif part.startswith("{") and part.endswith("}") and len(part) >= 2:
                text.append(str(fds[resolve_placeholder(part[1:-1], manifest)]))
            else:
                text.append(part)
        out.append("".join(text))
    return out


def _entry_name(manifest: Manifest, token: int) -> str:
    entry = manifest.entry(token)
    assert entry is not None, token     # only the manifest's own tokens are passed
    return entry.name


def _fdname(text: str) -> str:
    from ..agent.sdnotify import encode_part

    return encode_part(text)


@click.command("restore")
@click.option("--session", metavar="NAME", help="The incoming session to restore.")
@click.option("--verify", is_flag=True, help="Check memfd sizes, seals and sha256 against the manifest.")
@click.option("--bind-vfio", is_flag=True,
              help="Bind preserved devices to vfio-pci (driver_override) before retrieving their cdevs.")
@click.option("--exec", "do_exec", is_flag=True,
              help="After restoring, exec COMMAND with {token}/{name} replaced by fd numbers.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@socket_option
@json_option
@handle_errors
def restore(session: str | None, verify: bool, bind_vfio: bool, do_exec: bool, command: tuple[str, ...],
            socket_path: str | None, as_json: bool) -> None:
    """After kexec: retrieve a session per its manifest, verify, optionally exec a VMM.

    The agent (started if none runs) retrieves the session, reads the
    manifest at token 0 and retrieves every token: memfds, then cdevs, then
    iommufds (whose retrieve fails with EOPNOTSUPP in Phase 1 of the series;
    reported as expected). The agent keeps the files until `finish`.

    A preserved device must be bound to vfio-pci before its cdev is
    retrieved, and a failed retrieve is sticky (the series' patch 14/14, tools/testing/selftests/iommu/iommufd_liveupdate.c; Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c): so a
    cdev whose device is on another driver (or none) is not retrieved but
    reported (exit 1), unless --bind-vfio binds it first.

    \b
    --exec -- CMD ARGS...: every retrieved file is passed to CMD at fds 3, 4,
    ... with LISTEN_FDS, LISTEN_FDNAMES (manifest, then the entry names) and
    LISTEN_PID, as systemd passes fds (sd_listen_fds(3)); placeholders
    {TOKEN} (decimal or 0x hex), {NAME} (a manifest entry name) and
    {manifest} become those fd numbers. --exec implies --verify, and every
    file must be of the kind its entry says, or nothing is executed, e.g.
      pyiommufd restore --session vm0 --exec -- \\
        qemu-system-x86_64 -m 256M -machine q35,memory-backend=ram \\
          -object memory-backend-file,id=ram,size=256M,mem-path=/proc/self/fd/{guest-ram},share=on ...
    (share=on: a private mapping would leave the guest's writes outside the
    preserved memfd; `pyiommufd qemu` does all of this for a whole VM.)
    Unknown placeholders exit 2 before anything is executed; malformed ones
    before the agent is even started."""
    from ..agent import ensure_running
    from ..backend import get_backend

    name = _need_session(session)
    argv = list(command)
    if do_exec and not argv:
        raise _usage("--exec needs a command after `--`, e.g. --exec -- qemu-system-x86_64 ...")
    if argv and not do_exec:
        raise _usage(f"unexpected argument {argv[0]!r} (to run a command, use --exec -- CMD ...)")
    check_placeholders(argv)
    verify = verify or do_exec     # never exec with fds that were not checked
    be = get_backend()
    started = not _client(socket_path).is_running()
    client = ensure_running(socket_path, backend=be)
    try:
        _restore(client, be, name, verify, bind_vfio, do_exec, argv, as_json)
    except BaseException:
        if started:
            _stop_if_idle(client)
        raise


def _restore(client: AgentClient, be: Backend, session: str, verify: bool, bind_vfio: bool, do_exec: bool,
             command: list[str], as_json: bool) -> None:
    from ..errors import VerificationFailed
    from ..manifest import MANIFEST_TOKEN
    from ..restore import TokenStatus, restore_session

    done = restore_session(client, be, session, verify=verify, bind_vfio=bind_vfio)
    try:
        manifest = done.manifest
        wanted = {resolve_placeholder(k, manifest) for k in placeholders(command)} if do_exec else set()
        result = done.as_dict()
        failure = done.failure()
        if failure is not None and do_exec and done.mismatches and not done.unbound and done.first_error is None:
            failure = VerificationFailed(f"{failure}; not executing anything")
        if failure is not None:
            result["error"] = error_object(exitcodes.exit_code_for(failure), str(failure),
                                           getattr(failure, "errno", None))
        # with --exec, stdout belongs to the command: the report goes to stderr
        out = sys.stderr if do_exec else None
        if as_json:
            import json

            _echo(json.dumps(result, indent=2, default=str), out)
            if out is None:
                echo_json_printed()
        else:
            _echo(f"restored session {session!r} (manifest by {manifest.creator or '?'}, kernel "
                  f"{manifest.kernel_release or '?'}, LU ABI {manifest.lu_abi or '-'}):", out)
            from .output import table

            _echo(table([(_hex(t.token), t.kind, t.name, t.status.value, t.fd, t.details) for t in done.tokens],
                        ("token", "kind", "name", "status", "fd", "details")), out)
        if failure is not None:
            raise failure
        if not do_exec:
            return
        fds = done.fds
        missing = sorted(t for t in wanted if t not in fds)
        if missing:
            bad = done.by_token(missing[0])
            code = exitcodes.UNSUPPORTED if bad.status is TokenStatus.EXPECTED_FAILURE else exitcodes.KERNEL_ERROR
            raise CommandError(f"--exec: token {missing[0]:#x} ({bad.name}) was not retrieved: "
                               f"{bad.error or bad.note}", code)
        # the command gets every retrieved file, manifest first, at 3, 4, ...
        passed = [t for t in [MANIFEST_TOKEN] + [e.token for e in manifest.entries] if t in fds]
        names = ["manifest" if t == MANIFEST_TOKEN else _fdname(_entry_name(manifest, t)) for t in passed]
        argv = expand(command, {t: LISTEN_FDS_START + i for i, t in enumerate(passed)}, manifest)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            exec_command(argv, [fds[t] for t in passed], names)
        except OSError as exc:
            raise CommandError(f"cannot exec {argv[0]}: {exc.strerror}",
                               exitcodes.BAD_INPUT if exc.errno in (E.ENOENT, E.EACCES) else exitcodes.KERNEL_ERROR
                               ) from None
    finally:
        done.close(be)   # our copies; the agent keeps its own until finish


def echo_json_printed() -> None:
    """Count a JSON document printed without echo_json (so no second one follows)."""
    from . import output

    output._json_documents += 1


def _echo(text: str, stream: TextIO | None = None) -> None:
    click.echo(text, err=stream is sys.stderr)


# -- finish / status ---------------------------------------------------------------------
@click.command("finish")
@click.option("--session", metavar="NAME", help="The retrieved session to finish.")
@socket_option
@json_option
@handle_errors
def finish(session: str | None, socket_path: str | None, as_json: bool) -> None:
    """Finish a retrieved session (LIVEUPDATE_SESSION_FINISH, via the agent).

    Needs every preserved file retrieved and each handler ready; EBUSY (exit 5)
    names the unretrieved tokens. On a series kernel a session holding an
    iommufd can never finish in Phase 1 (the series' cover letter: what Phase 1 restores after the kexec). On success the agent
    closes the session and drops its references."""
    name = _need_session(session)
    result = _client(socket_path).finish(name)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"finished session {name!r}")


@click.command("status")
@socket_option
@json_option
@handle_errors
def status(socket_path: str | None, as_json: bool) -> None:
    """Show the agent's sessions, tokens and what each token is."""
    st = _client(socket_path).status()
    if as_json:
        echo_json(st)
        return
    _echo_status(st)


def _errname(err: Any) -> str:
    from ..errors import errname

    return errname(err) if isinstance(err, int) else str(err)


def _summary(kind_value: str, meta: dict[str, Any]) -> str:
    """One short line for a token's metadata (``kind_value``: as the agent sent it)."""
    from ..fdobject import FileKind

    kind = next((k for k in FileKind if k.value == kind_value), FileKind.OTHER)
    parts = []
    if kind is FileKind.MEMFD:
        if meta.get("size") is not None:
            parts.append(f"{meta['size']:#x} bytes")
        if meta.get("seals"):
            parts.append("seals " + "|".join(s.upper() for s in meta["seals"]))
        if meta.get("sha256"):
            parts.append(f"sha256 {meta['sha256'][:12]}…")
    elif kind is FileKind.IOMMUFD:
        ioas = meta.get("ioas")
        if isinstance(ioas, list):
            maps = sum(len(a.get("mappings", [])) for a in ioas if isinstance(a, dict))
            parts.append(f"{len(ioas)} IOAS, {maps} mapping(s)")
        hwpts = meta.get("hwpts") or []
        marks = [h if isinstance(h, str) else f"{h.get('name')}={h.get('lu_token', 0):#x}" for h in hwpts]
        if marks:
            parts.append("HWPTs " + ", ".join(marks))
        if meta.get("lu_abi"):
            parts.append(str(meta["lu_abi"]))
    elif kind is FileKind.VFIO_CDEV:
        parts += [str(meta[k]) for k in ("bdf", "cdev") if meta.get(k)]
        if meta.get("hwpt"):
            parts.append(f"on {meta['hwpt']}")
    else:
        for k, v in meta.items():
            text = f"{k}={v}"
            parts.append(text if len(text) <= 40 else text[:39] + "…")
    return ", ".join(parts)


def _echo_status(st: dict[str, Any]) -> None:
    agent_info = st.get("agent", {})
    lu = agent_info.get("liveupdate", {})
    held = f"holds {lu.get('path')}" if lu.get("held") else f"does not hold {lu.get('path')}" + (
        f" ({lu['error']})" if lu.get("error") else "")
    click.echo(f"agent pid {agent_info.get('pid')} on {agent_info.get('socket')} ({agent_info.get('backend')}), "
               f"{held}")
    from ..agent.client import crash_exposure

    safe, sentence = crash_exposure(st)
    click.echo(sentence if safe else f"warning: {sentence}")
    sessions = st.get("sessions", [])
    if not sessions:
        click.echo("no sessions")
        return
    from .output import table

    for s in sessions:
        extra = ""
        if s["direction"] == "incoming":
            extra = ", manifest" if s.get("manifest") else f", no manifest ({s.get('manifest_error', '?')})"
        click.echo(f"session {s['name']!r} ({s['direction']}{', adopted' if s.get('adopted') else ''}{extra}):")
        rows = []
        for t in s["tokens"]:
            detail = _summary(t["kind"], t.get("meta") or {})
            err = t.get("error")
            if err:
                detail = (detail + "; " if detail else "") + f"{err.get('op', '')}: {_errname(err.get('errno'))}"
            rows.append((t["token_hex"], t["kind"], t.get("name"), t["state"], detail or None))
        if rows:
            click.echo("  " + table(rows, ("token", "kind", "name", "state", "details")).replace("\n", "\n  "))
        else:
            click.echo("  (no files)")


# -- agent ---------------------------------------------------------------------------------
def _start_agent(socket_path: str | None, background: bool, log_file: str | None,
                 as_json: bool = False) -> None:
    from ..agent import protocol as P
    from ..agent import daemon, server
    from ..backend import get_backend

    path = P.default_socket_path(socket_path)
    be = get_backend()
    if background:
        if not be.shared_with_other_processes:
            raise _usage("--background needs the Linux backend (a test backend lives in this process)")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = daemon.start_background(path, log_file=log_file)
        log = log_file or daemon.default_log_path(path)
        if as_json:
            echo_json({"pid": pid, "socket": path, "log": log, "background": True})
        else:
            click.echo(f"agent started in the background: pid {pid}, socket {path}, log {log}")
        return
    daemon.configure_logging(stream=sys.stderr)
    from ..agent import sdnotify

    srv = server.AgentServer(path, backend=be, inherited=sdnotify.listen_fds()).start()
    srv.install_signal_handlers()
    if as_json:
        echo_json({"pid": os.getpid(), "socket": path, "log": None, "background": False})
        sys.stdout.flush()
    click.echo(f"agent pid {os.getpid()} listening on {path}; stop with `pyiommufd agent stop` "
               "(stopping unpreserves everything it holds)", err=True)
    srv.serve_forever()


@click.group("agent", invoke_without_command=True)
@click.option("--background", is_flag=True, help="Daemonize (double fork, setsid, log file).")
@click.option("--log-file", metavar="PATH", help="Log file of a background agent (default: next to the socket).")
@socket_option
@json_option
@click.pass_context
@handle_errors
def agent(ctx: click.Context, background: bool, log_file: str | None, socket_path: str | None,
          as_json: bool) -> None:
    """The holder agent that keeps /dev/liveupdate and session fds until kexec
    (and, after it, until finish).

    Without a subcommand: start it (in the foreground, or with --background).
    The socket is mode 0600 in a 0700 directory and only uid 0 and the
    agent's own euid may use it."""
    ctx.ensure_object(dict)
    ctx.obj["agent_socket"] = socket_path
    if ctx.invoked_subcommand is None:
        _start_agent(socket_path, background, log_file, as_json)


def _agent_socket(socket_path: str | None) -> str | None:
    if socket_path:
        return socket_path
    ctx: click.Context | None = click.get_current_context()
    while ctx is not None:
        found = ctx.obj.get("agent_socket") if isinstance(ctx.obj, dict) else None
        if isinstance(found, str) and found:
            return found
        ctx = ctx.parent
    return None


@agent.command("start")
@click.option("--background", is_flag=True, help="Daemonize (double fork, setsid, log file).")
@click.option("--log-file", metavar="PATH", help="Log file of a background agent.")
@socket_option
@json_option
@handle_errors
def agent_start(background: bool, log_file: str | None, socket_path: str | None, as_json: bool) -> None:
    """Start the agent (foreground unless --background)."""
    _start_agent(_agent_socket(socket_path), background, log_file, as_json)


@agent.command("stop")
@click.option("--force", is_flag=True, help="Stop even though it holds preserved or unfinished sessions.")
@socket_option
@json_option
@handle_errors
def agent_stop(force: bool, socket_path: str | None, as_json: bool) -> None:
    """Stop the agent. Refused (exit 5) while it holds an outgoing session
    with preserved files or an unfinished incoming session, unless --force:
    stopping closes the session fds, which unpreserves everything."""
    client = _client(_agent_socket(socket_path))
    result = client.stop(force)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.is_running():
        time.sleep(0.05)
    if as_json:
        echo_json(result)
        return
    for w in result.get("warnings", []):
        warn(w + " (done: --force)")
    click.echo(f"agent pid {result.get('pid')} stopped")


@agent.command("status")
@socket_option
@json_option
@handle_errors
def agent_status(socket_path: str | None, as_json: bool) -> None:
    """Is the agent running? (exit 7 if not)"""
    st = _client(_agent_socket(socket_path)).status()
    if as_json:
        echo_json(st)
        return
    _echo_status(st)


# -- kexec ----------------------------------------------------------------------------------
def _preserved_summary(socket_path: str | None) -> tuple[str | None, list[str]]:
    """(why not, outgoing sessions with files) from the agent."""
    from ..agent import AgentUnavailable

    try:
        st = _client(socket_path).status()
    except AgentUnavailable as exc:
        return f"no agent is holding anything ({exc})", []
    held = [f"{s['name']} ({len(s['tokens'])} files)" for s in st.get("sessions", [])
            if s["direction"] == "outgoing" and s["tokens"]]
    if not held:
        return "the agent holds no outgoing session with preserved files", []
    return None, held


@click.command("kexec")
@click.option("--kernel", metavar="PATH", help="The kernel image (bzImage) to boot.")
@click.option("--initrd", metavar="PATH", help="The initramfs.")
@click.option("--cmdline", metavar="TEXT", help="The new kernel's command line.")
@click.option("--reuse-cmdline", is_flag=True,
              help="Use this kernel's /proc/cmdline (minus BOOT_IMAGE=/initrd=); the default.")
@click.option("--load-only", is_flag=True, help="kexec_file_load only; reboot later (e.g. `kexec -e`).")
@click.option("--force", is_flag=True, help="Reboot even though the agent holds nothing preserved.")
@socket_option
@json_option
@handle_errors
def kexec_cmd(kernel: str | None, initrd: str | None, cmdline: str | None, reuse_cmdline: bool, load_only: bool,
              force: bool, socket_path: str | None, as_json: bool) -> None:
    """Load a kernel with kexec_file_load and reboot into it.

    Before rebooting (not with --load-only) it asks the agent what is
    preserved and refuses (exit 1) when no agent answers or it holds no
    outgoing session with files: a live update that preserves nothing is
    just a fast reboot that drops every VM's state. --force skips the check.
    A file refusing to freeze (a VFIO device with interrupts still enabled,
    the series' patches 12-13/14, VFIO cdev preservation) makes the reboot fail with EINVAL instead of rebooting."""
    from .. import kexec
    from ..backend import get_backend

    if not kernel:
        raise _usage("--kernel PATH is required")
    if cmdline is not None and reuse_cmdline:
        raise _usage("give --cmdline or --reuse-cmdline, not both")
    be = get_backend()
    for what, path in (("--kernel", kernel), ("--initrd", initrd)):
        if path is not None:
            kexec.check_image(path, what, be)
    held: list[str] = []
    if not load_only and not force:
        why, held = _preserved_summary(socket_path)
        if why:
            raise CommandError(f"refusing to kexec: {why}; a kexec now preserves nothing "
                               "(pass --force to reboot anyway, or --load-only)", exitcodes.CHECK_FAILED)
    used = kexec.load(kernel, initrd, cmdline)
    result = {"kernel": kernel, "initrd": initrd, "cmdline": used, "loaded": True, "executed": not load_only,
              "sessions": held}
    if load_only:
        if as_json:
            echo_json(result)
        else:
            click.echo(f"loaded {kernel} (cmdline: {used}); reboot into it with "
                       f"`pyiommufd kexec --kernel {kernel} ...` or `kexec -e`")
        return
    if as_json:
        echo_json(result)
    else:
        click.echo(f"loaded {kernel}; preserved: {', '.join(held) or 'nothing (--force)'}; rebooting now")
    sys.stdout.flush()
    kexec.execute()
