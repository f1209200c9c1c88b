"""systemd's notify and fd-passing protocols, spoken directly (no libsystemd).

The agent holds ``/dev/liveupdate`` and every session fd until the kexec. If
it dies, the kernel drops every session it held. Under systemd it therefore
keeps a copy of each fd in the service manager's fd store, and takes them
back when it is started again:

* :class:`Notifier` sends ``sd_notify`` datagrams (sd_notify(3)) to
  ``$NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with
  ``@``): ``READY=1``, ``FDSTORE=1`` + ``FDNAME=`` with the fds as
  SCM_RIGHTS, ``FDSTOREREMOVE=1`` + ``FDNAME=``. The unit needs
  ``FileDescriptorStoreMax=`` (systemd.service(5)).
* :func:`listen_fds` reads ``$LISTEN_PID``, ``$LISTEN_FDS`` and
  ``$LISTEN_FDNAMES`` (sd_listen_fds(3)): ``LISTEN_FDS`` fds from fd 3 on,
  named in order, meant for us only if ``LISTEN_PID`` is our pid.
* :func:`fdname` / :func:`parse_fdname` name what each fd is, so the
  agent's bookkeeping can be rebuilt from the names alone.

A valid FDNAME is at most 255 printable ASCII characters without ``:``
(``:`` separates the names in ``$LISTEN_FDNAMES``); systemd ignores a name
that breaks this rule. Session names may hold any byte but NUL, so name
parts are percent-encoded and the parts are joined with ``/``.
"""
from __future__ import annotations

import array
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Mapping

log = logging.getLogger("pyiommufd.agent")

LISTEN_FDS_START = 3        # SD_LISTEN_FDS_START
FDNAME_MAX = 255
#: what percent-encoding leaves alone in a name part (never ``:``, ``/`` or ``%``)
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-~+=,@")

LUO_NAME = "luo"


def valid_fdname(name: str) -> bool:
    """True when systemd accepts ``name`` as an FDNAME."""
    return (len(name) <= FDNAME_MAX and name.isascii()
            and all(" " <= c <= "~" and c != ":" for c in name))


def encode_part(text: str) -> str:
    raw = text.encode()
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def decode_part(text: str) -> str:
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            digits = text[i + 1:i + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEFabcdef" for d in digits):
                raise ValueError(f"bad escape in {text!r}")
            out.append(int(digits, 16))
            i += 3
            continue
        if ord(c) not in _SAFE:
            raise ValueError(f"unencoded character {c!r} in {text!r}")
        out.append(ord(c))
        i += 1
    return out.decode()


@dataclass(frozen=True)
class FdName:
    """What a stored fd is: ``/dev/liveupdate`` (``what == "luo"``), a
    session fd (``"session"``) or a file of a session (``"file"``)."""

    what: str
    session: str | None = None
    incoming: bool = False
    token: int | None = None

    def __str__(self) -> str:
        return fdname(self)


def fdname(name: FdName) -> str:
    """``luo``, ``session/out/<name>``, ``file/in/<name>/<token hex>``."""
    if name.what == "luo":
        text = LUO_NAME
    else:
        direction = "in" if name.incoming else "out"
        text = f"{name.what}/{direction}/{encode_part(name.session or '')}"
        if name.what == "file":
            text += f"/{name.token:#x}"
    if not valid_fdname(text):  # a 63-byte session name encodes to at most 189 characters
        raise ValueError(f"not a valid FDNAME: {text!r}")
    return text


def parse_fdname(text: str) -> FdName | None:
    """The :class:`FdName` ``text`` encodes, or None when it is not one of ours."""
    if text == LUO_NAME:
        return FdName("luo")
    parts = text.split("/")
    try:
        if len(parts) == 3 and parts[0] == "session" and parts[1] in ("in", "out"):
            return FdName("session", decode_part(parts[2]), parts[1] == "in")
        if len(parts) == 4 and parts[0] == "file" and parts[1] in ("in", "out") and parts[3].startswith("0x"):
            token = int(parts[3], 16)
            if not 0 <= token < 1 << 64:
                return None
            return FdName("file", decode_part(parts[2]), parts[1] == "in", token)
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def session_fdname(session: str, incoming: bool) -> str:
    return fdname(FdName("session", session, incoming))


def file_fdname(session: str, incoming: bool, token: int) -> str:
    return fdname(FdName("file", session, incoming, token))


class Notifier:
    """Datagrams to the service manager's notify socket. Sending never raises:
    a service manager that went away must not take the agent with it; the
    last failure is kept in :attr:`error`."""

    def __init__(self, address: str):
        if not address or not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with @, not {address!r}")
        self.address = address
        self.error: str | None = None
        self.sent = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Notifier | None":
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if not address:
            return None
        try:
            return cls(address)
        except ValueError as exc:
            log.warning("ignoring $NOTIFY_SOCKET: %s", exc)
            return None

    def _sockaddr(self) -> str | bytes:
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, state: str, fds: Iterable[int] = ()) -> bool:
        fds = list(fds)
        data = state.encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                s.sendmsg([data], ancillary, 0, self._sockaddr())
        except OSError as exc:
            self.error = f"{state.splitlines()[0]} to {self.address}: {exc.strerror or exc}"
            log.warning("sd_notify %s", self.error)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def store(self, name: str, fd: int) -> bool:
        """Put a copy of ``fd`` into the fd store under ``name``."""
        if not valid_fdname(name):
            raise ValueError(f"not a valid FDNAME: {name!r}")
        return self.send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> bool:
        """Drop every stored fd named ``name``."""
        if not valid_fdname(name):
            raise ValueError(f"not a valid FDNAME: {name!r}")
        return self.send(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds(environ: dict[str, str] | None = None, *, start: int = LISTEN_FDS_START,
               unset: bool = True, pid: int | None = None) -> list[tuple[int, str]]:
    """The fds passed to this process the systemd way, as ``(fd, name)``,
    made close-on-exec. Empty when ``$LISTEN_PID`` is not this process (the
    variables were meant for a parent and leaked into us). With ``unset`` the
    three variables are removed, so a child never takes them for its own.
    ``start`` is SD_LISTEN_FDS_START; only tests move it."""
    env = os.environ if environ is None else environ
    try:
        want_pid = env.get("LISTEN_PID")
        count_text = env.get("LISTEN_FDS")
        names_text = env.get("LISTEN_FDNAMES")
        if not want_pid or not count_text:
            return []
        try:
            want, count = int(want_pid), int(count_text)
        except ValueError:
            log.warning("ignoring LISTEN_PID=%r LISTEN_FDS=%r: not numbers", want_pid, count_text)
            return []
        if want != (os.getpid() if pid is None else pid):
            return []
        if count <= 0:
            return []
        names = names_text.split(":") if names_text is not None else []
        if len(names) != count:
            log.warning("LISTEN_FDNAMES has %d names for %d fds; the unnamed are 'unknown'", len(names), count)
            names = (names + ["unknown"] * count)[:count]
        out = []
        for i in range(count):
            fd = start + i
            try:
                os.set_inheritable(fd, False)
            except OSError:
                log.warning("LISTEN_FDS says fd %d is ours, but it is not open", fd)
                continue
            out.append((fd, names[i]))
        return out
    finally:
        if unset:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key, None)


def listen_env(names: list[str], pid: int) -> dict[str, str]:
    """The variables that hand ``len(names)`` fds (at 3, 4, ...) to ``pid``."""
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}


__all__ = ["Notifier", "FdName", "fdname", "parse_fdname", "session_fdname", "file_fdname", "valid_fdname",
           "encode_part", "decode_part", "listen_fds", "listen_env", "LISTEN_FDS_START", "FDNAME_MAX"]
