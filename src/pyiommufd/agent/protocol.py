"""The holder agent's wire protocol, shared by server and client.

One request and one reply per connection, over a UNIX stream socket:

* a frame is a 4-byte big-endian length followed by that many bytes of UTF-8
  JSON (at most :data:`MAX_MESSAGE` bytes);
* file descriptors ride along with the frame as ``SCM_RIGHTS`` ancillary data
  (at most :data:`MAX_FDS`); JSON refers to them by index (``"fd": 0``);
* a request is ``{"v": 1, "op": NAME, "args": {...}}``; each argument has
  one JSON type (a boolean is ``true``/``false``, a token an integer, ...),
  checked and never coerced: a wrong one is refused as a
  :class:`~pyiommufd.errors.UsageError` naming it, and changes nothing;
* a reply is ``{"v": 1, "ok": true, "result": {...}}`` or
  ``{"v": 1, "ok": false, "error": {...}}``; an error is encoded by
  :func:`encode_error` and re-raised by the client as the same class with
  :func:`decode_error` (a :class:`~pyiommufd.errors.KernelError` keeps its
  errno, op, hint and detail, so ``except LiveUpdateBusy`` works across the
  socket).

Received fds are made close-on-exec (``MSG_CMSG_CLOEXEC``), so neither the
agent nor its clients leak them into children by accident.
"""
from __future__ import annotations

import array
import errno as E
import json
import os
import socket
import struct
from typing import Any, Iterable

from .. import errors
from .. import exitcodes
from ..fdobject import FileKind

VERSION = 1
MAX_MESSAGE = 16 << 20
MAX_FDS = 253  # SCM_MAX_FD
HEADER = struct.Struct("!I")

DEFAULT_SOCKET = "/run/pyiommufd/agent.sock"
ENV_SOCKET = "PYIOMMUFD_AGENT_SOCKET"

#: every request the agent answers
#: how long a starting agent may take to listen: a Python start and the agent's
#: imports, which take over 15 s under TCG on a busy host
START_TIMEOUT = 60.0
OPS = ("ping", "status", "create_session", "preserve", "preserve_many", "adopt", "retrieve_session",
       "retrieve", "retrieve_many", "lend", "finish", "release", "stop")


def parse_kind(value: Any) -> FileKind | None:
    """The :class:`~pyiommufd.fdobject.FileKind` a message names by its
    stable value (None when it names none)."""
    if value is None:
        return None
    try:
        return FileKind(value)
    except ValueError:
        raise errors.UsageError(f"unknown file kind {value!r} (known: {', '.join(k.value for k in FileKind)})"
                                ) from None


def default_socket_path(socket_path: str | os.PathLike[str] | None = None) -> str:
    """``socket_path``, else ``$PYIOMMUFD_AGENT_SOCKET``, else :data:`DEFAULT_SOCKET`."""
    if socket_path:
        return os.fspath(socket_path)
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


# -- errors -------------------------------------------------------------------
class AgentError(errors.PyiommufdError):
    """Something went wrong talking to the holder agent."""

    exit_code = exitcodes.AGENT_UNREACHABLE


class AgentUnavailable(AgentError):
    """Nothing answers on the agent socket."""

    exit_code = exitcodes.AGENT_UNREACHABLE


class AgentProtocolError(AgentError):
    """The peer sent something that is not a valid message."""

    exit_code = exitcodes.AGENT_UNREACHABLE


class AgentPermissionDenied(AgentError):
    """The agent refused this peer (SO_PEERCRED check)."""

    exit_code = exitcodes.NOT_PERMITTED


class AgentRefused(AgentError):
    """The agent refused a request that would drop preserved state (use force)."""

    exit_code = exitcodes.BUSY


class AgentInternalError(AgentError):
    """The agent hit an unexpected exception while serving a request."""

    exit_code = exitcodes.KERNEL_ERROR


class ConnectionClosed(AgentProtocolError):
    """The peer closed the connection before a whole frame arrived."""


_AGENT_ERRORS = {cls.__name__: cls for cls in (AgentError, AgentUnavailable, AgentProtocolError,
                                               AgentPermissionDenied, AgentRefused,
                                               AgentInternalError)}


def encode_error(exc: BaseException) -> dict[str, Any]:
    """A JSON-able description of ``exc`` that :func:`decode_error` turns back
    into the same class."""
    if isinstance(exc, errors.KernelError):
        out = {"type": "kernel", "class": type(exc).__name__, "interface": exc.interface,
               "errno": exc.errno, "op": exc.op, "hint": exc.hint, "detail": exc.detail}
        if isinstance(getattr(exc, "index", None), int):
            out["index"] = exc.index  # the failed item of a bulk request
        return out
    if isinstance(exc, errors.PlanError):
        return {"type": "plan", "problems": exc.problems, "message": str(exc)}
    if isinstance(exc, errors.UsageError):
        return {"type": "usage", "message": str(exc)}
    if isinstance(exc, errors.AbiError):
        return {"type": "abi", "message": str(exc)}
    if isinstance(exc, AgentError):
        return {"type": "agent", "class": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, OSError):
        return {"type": "oserror", "errno": exc.errno, "message": str(exc)}
    return {"type": "internal", "message": f"{type(exc).__name__}: {exc}"}


def decode_error(data: Any) -> Exception:
    """The exception a reply's ``error`` member describes."""
    if not isinstance(data, dict):
        return AgentProtocolError(f"malformed error in agent reply: {data!r}")
    kind = data.get("type")
    if kind == "kernel":
        err = data.get("errno")
        if not isinstance(err, int):
            return AgentProtocolError(f"kernel error without errno in agent reply: {data!r}")
        cls = errors.error_class(str(data.get("interface") or "kernel"), err)
        exc = cls(str(data.get("op") or "?"), err, data.get("hint"), data.get("detail"))
        if isinstance(data.get("index"), int):
            exc.index = data["index"]
        return exc
    message = str(data.get("message", ""))
    if kind == "plan":
        return errors.PlanError(list(data.get("problems") or [message]))
    if kind == "usage":
        return errors.UsageError(message)
    if kind == "abi":
        return errors.AbiError(message)
    if kind == "agent":
        return _AGENT_ERRORS.get(str(data.get("class")), AgentError)(message)
    if kind == "oserror":
        err = data.get("errno")
        return OSError(err, message) if isinstance(err, int) else OSError(message)
    return AgentInternalError(f"the agent failed: {message}")


# -- framing ------------------------------------------------------------------
def send_message(sock: socket.socket, obj: Any, fds: Iterable[int] = ()) -> None:
    """Send one frame; ``fds`` go with its first byte."""
    payload = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    if len(payload) > MAX_MESSAGE:
        raise AgentProtocolError(f"message too large ({len(payload)} bytes, at most {MAX_MESSAGE})")
    fds = list(fds)
    if len(fds) > MAX_FDS:
        raise errors.UsageError(f"at most {MAX_FDS} file descriptors per message, not {len(fds)}")
    frame = HEADER.pack(len(payload)) + payload
    if fds:
        sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sent = sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, length: int, fds: list[int], *, at_start: bool) -> bytes:
    buf = bytearray()
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while len(buf) < length:
        data, ancdata, flags, _ = sock.recvmsg(length - len(buf), space, socket.MSG_CMSG_CLOEXEC)
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[:len(cdata) - (len(cdata) % got.itemsize)])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            fds.clear()
            raise AgentProtocolError(f"too many file descriptors in one message (at most {MAX_FDS})")
        if not data:
            if at_start and not buf:
                raise ConnectionClosed("the peer closed the connection")
            raise ConnectionClosed(f"the peer closed the connection after {len(buf)} of {length} bytes")
        buf += data
    return bytes(buf)


def recv_message(sock: socket.socket) -> tuple[Any, list[int]]:
    """Receive one frame; returns ``(object, fds)``. The caller owns the fds
    (also when this raises after some arrived: they are closed then)."""
    fds: list[int] = []
    try:
        (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size, fds, at_start=True))
        if length > MAX_MESSAGE:
            raise AgentProtocolError(f"frame of {length} bytes announced (at most {MAX_MESSAGE})")
        payload = _recv_exact(sock, length, fds, at_start=False)
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AgentProtocolError(f"not JSON: {exc}") from None
        except RecursionError:
            # a hostile peer's "[[[[..." must not take the agent down
            raise AgentProtocolError("not JSON this agent accepts: nested too deeply") from None
    except BaseException:
        _close_all(fds)
        raise
    return obj, fds


def request(op: str, **args: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, "args": args}


def reply_ok(result: Any = None) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, "result": {} if result is None else result}


def reply_error(exc: BaseException) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": encode_error(exc)}


# -- peer credentials ---------------------------------------------------------
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def errno_name(err: int | None) -> str:
    return E.errorcode.get(err or 0, str(err))


__all__ = [
    "VERSION", "START_TIMEOUT", "MAX_MESSAGE", "MAX_FDS", "DEFAULT_SOCKET", "ENV_SOCKET", "OPS", "default_socket_path",
    "AgentError", "AgentUnavailable", "AgentProtocolError", "AgentPermissionDenied", "AgentRefused",
    "AgentInternalError", "ConnectionClosed", "encode_error", "decode_error", "send_message",
    "recv_message", "request", "reply_ok", "reply_error", "peer_credentials",
]
