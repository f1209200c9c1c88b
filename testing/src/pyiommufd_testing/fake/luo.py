"""The Live Update Orchestrator of Linux 7.3: ``/dev/liveupdate`` and session
fds (Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c; K:kernel/liveupdate/luo_core.c, luo_session.c, luo_file.c).

Modelled rules, each with its source:

* ``/dev/liveupdate`` exists only when live update is enabled (``liveupdate=on``
  with KHO; K:luo_core.c:78-96, 436-441) and has one opener at a time:
  a second open is EBUSY (K:luo_core.c:336-337). The first open of a boot
  deserializes the incoming sessions; a preserved file whose handler this
  kernel lacks makes every open fail with EIO (K:luo_core.c:339-343,
  K:luo_file.c:726-741; Linux 7.3 kernel/liveupdate/luo_session.c and luo_file.c).
* ioctl dispatch (K:luo_core.c:387-417, K:luo_session.c:414-437): an nr outside
  the table is EINVAL (on session fds *and* on /dev/liveupdate); a request
  whose full value differs from the table's is ENOTTY; a session ioctl of the
  wrong direction (PRESERVE_FD on an incoming session, RETRIEVE_FD/FINISH on
  an outgoing one) is EINVAL; ``size`` below ``offsetofend(last field)`` is
  EINVAL; non-zero bytes past the kernel's struct are E2BIG.
* CREATE_SESSION: name of 1..63 bytes else EINVAL (K:luo_session.c:468-473);
  an outgoing session of that name exists: EEXIST (K:luo_session.c:195-197).
* RETRIEVE_SESSION: no incoming session of that name (e.g. no live update
  yet) ENOENT; retrieved already EINVAL (K:luo_session.c:511-523).
* PRESERVE_FD (K:luo_file.c:230-313): token used in this session EEXIST, then
  a bad fd EBADF, then no handler ENOENT, then the same file (memfd: inode)
  preserved in any session EBUSY, then the handler's own errors.
* RETRIEVE_FD (K:luo_file.c:552-610): unknown token ENOENT; a failed retrieve
  is sticky; a successful one can be repeated and returns a new fd to the
  same file.
* FINISH (K:luo_file.c:612-630, 680-717): ``reserved`` must be 0 (EINVAL); EBUSY if
  any handler's ``can_finish`` says no, and then nothing changes (atomic).
  Note: memfd has no ``can_finish``, so an unretrieved memfd does not block
  FINISH on 7.3 (it is discarded); the series' iommufd and vfio handlers
  do block it (the series' cover letter: what Phase 1 restores after the kexec).
* Closing an outgoing session fd unpreserves its files in reverse order and
  drops the session (K:luo_session.c:251-258, K:luo_file.c:333-364).
  Closing an incoming session fd tries FINISH; on failure the session and
  its files stay with LUO until the next live update (K:luo_session.c:240-249).
* ``reboot(KEXEC)`` freezes every file of every outgoing session in order; a
  failure unfreezes what was frozen and fails the syscall
  (K:luo_file.c:455-499, K:luo_session.c:637-685).
"""
from __future__ import annotations

import errno as E
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .files import OpenFile
from .uaccess import CData, IoctlArg, UserMemory, fail, offsetofend

if TYPE_CHECKING:   # pragma: no cover
    from .boot import Boot

LUO_TYPE = 0xBA
CMD_BASE = 0x00
CMD_SESSION_BASE = 0x40
NAME_LEN = 64


def _io(nr: int) -> int:
    return (LUO_TYPE << 8) | nr


# -- file handlers --------------------------------------------------------------
class FileHandler:
    """``struct liveupdate_file_handler``: one per preservable file type."""

    compatible = "none"

    def can_preserve(self, file: OpenFile) -> bool:
        return False

    def get_id(self, file: OpenFile) -> Any:
        return ("file", id(file))

    def preserve(self, lf: "LuoFile", session: "Session") -> None:
        """Validate and record; set ``lf.private``. Raise OSError to refuse."""

    def unpreserve(self, lf: "LuoFile", session: "Session") -> None:
        pass

    def freeze(self, lf: "LuoFile") -> None:
        pass

    def unfreeze(self, lf: "LuoFile") -> None:
        pass

    def handover(self, lf: "LuoFile") -> Any:
        """The serialized state that crosses the kexec (KHO memory)."""
        return None

    def retrieve(self, lf: "LuoFile", boot: "Boot") -> tuple[OpenFile, int]:
        """Re-create the file in the new kernel: (installed file, its fd)."""
        fail(E.EOPNOTSUPP)

    def can_finish(self, lf: "LuoFile") -> bool:
        return True

    def finish(self, lf: "LuoFile") -> None:
        pass


@dataclass
class LuoFile:
    handler: FileHandler
    token: int
    file: OpenFile | None = None
    data: Any = None            # serialized_data (incoming side)
    private: Any = None
    retrieve_status: int = 0    # 0 not tried, 1 retrieved, -errno failed


@dataclass
class Session:
    name: bytes
    incoming: bool
    files: list[LuoFile] = field(default_factory=list)
    retrieved: bool = False

    def token_used(self, token: int) -> bool:
        return any(lf.token == token for lf in self.files)

    def find_outgoing(self, file: OpenFile) -> LuoFile | None:
        """``liveupdate_get_token_outgoing``: the entry whose struct file is
        ``file`` (S1:1505-1524)."""
        for lf in self.files:
            if lf.file is file:
                return lf
        return None


@dataclass
class HandoverSession:
    """A session as serialized into KHO by the previous kernel."""
    name: bytes
    files: list[tuple[str, int, Any]]       # (compatible, token, data)


# -- the LUO core ----------------------------------------------------------------
class Luo:
    def __init__(self, boot: "Boot", enabled: bool, handlers: list[FileHandler],
                 incoming: list[HandoverSession]) -> None:
        self.boot = boot
        self.enabled = enabled
        self.handlers = handlers
        self.in_use = False
        self.outgoing: list[Session] = []
        self.incoming: list[Session] = []
        self.preserved: dict[Any, OpenFile] = {}        # luo_preserved_files
        self._handover = incoming
        self._deserialized = False
        self._saved_err = 0

    # -- /dev/liveupdate ----------------------------------------------------------
    def open_device(self) -> "LuoDeviceFile":
        if self.in_use:
            fail(E.EBUSY)
        self.in_use = True
        err = self.deserialize()
        if err:
            self.in_use = False
            fail(E.EIO)
        return LuoDeviceFile(self)

    def deserialize(self) -> int:
        """``luo_session_deserialize``: once per boot, errors are remembered."""
        if self._deserialized:
            return self._saved_err
        self._deserialized = True
        by_compat = {h.compatible: h for h in self.handlers}
        for ser in self._handover:
            session = Session(ser.name, incoming=True)
            self.incoming.append(session)
            for compatible, token, data in ser.files:
                handler = by_compat.get(compatible)
                if handler is None:
                    self._saved_err = -E.ENOENT
                    return self._saved_err
                session.files.append(LuoFile(handler, token, data=data))
        return 0

    def create_session(self, name: bytes) -> "SessionFile":
        if any(s.name == name for s in self.outgoing):
            fail(E.EEXIST)
        session = Session(name, incoming=False)
        self.outgoing.append(session)
        return SessionFile(self, session)

    def retrieve_session(self, name: bytes) -> "SessionFile":
        session = next((s for s in self.incoming if s.name == name), None)
        if session is None:
            fail(E.ENOENT)
        if session.retrieved:
            fail(E.EINVAL)
        session.retrieved = True
        return SessionFile(self, session)

    # -- files ---------------------------------------------------------------------
    def preserve(self, session: Session, token: int, fd: int) -> None:
        if session.token_used(token):
            fail(E.EEXIST)
        file = self.boot.table.get(fd)              # EBADF
        handler = next((h for h in self.handlers if h.can_preserve(file)), None)
        if handler is None:
            fail(E.ENOENT)
        key = handler.get_id(file)
        if key in self.preserved:
            fail(E.EBUSY)
        self.preserved[key] = file
        lf = LuoFile(handler, token, file=file)
        try:
            handler.preserve(lf, session)
        except BaseException:
            del self.preserved[key]
            raise
        file.get()
        session.files.append(lf)

    def unpreserve_all(self, session: Session) -> None:
        while session.files:
            lf = session.files[-1]
            lf.handler.unpreserve(lf, session)
            assert lf.file is not None
            self.preserved.pop(lf.handler.get_id(lf.file), None)
            session.files.pop()
            lf.file.put()

    def retrieve(self, session: Session, token: int) -> int:
        """Returns a new fd (close-on-exec) to the retrieved file."""
        table = self.boot.table
        lf = next((f for f in session.files if f.token == token), None)
        if lf is None:
            fail(E.ENOENT)
        if lf.retrieve_status < 0:
            fail(-lf.retrieve_status)
        if lf.retrieve_status > 0:
            assert lf.file is not None
            return table.add_fd(os.dup(lf.file.kfd), lf.file)
        try:
            file, fd = lf.handler.retrieve(lf, self.boot)
        except OSError as exc:
            lf.retrieve_status = -(exc.errno or E.EIO)
            raise
        lf.file = file.get()                        # LUO keeps it until finish
        self.preserved[lf.handler.get_id(file)] = file
        lf.retrieve_status = 1
        return fd

    def finish(self, session: Session) -> None:
        if not session.files:
            return
        for lf in session.files:
            if not lf.handler.can_finish(lf):
                fail(E.EBUSY)
        while session.files:
            lf = session.files.pop()
            lf.handler.finish(lf)
            if lf.file is not None:
                self.preserved.pop(lf.handler.get_id(lf.file), None)
                lf.file.put()

    def release_session(self, session: Session) -> None:
        if session.incoming:
            try:
                self.finish(session)
            except OSError:
                # "Unable to finish session [...] on release": LUO keeps it
                return
            if session in self.incoming:
                self.incoming.remove(session)
        else:
            self.unpreserve_all(session)
            if session in self.outgoing:
                self.outgoing.remove(session)

    # -- reboot ----------------------------------------------------------------------
    def freeze_all(self) -> None:
        """``luo_session_serialize``: freeze every outgoing file; roll back
        and re-raise on the first failure."""
        done: list[LuoFile] = []
        try:
            for session in self.outgoing:
                for lf in session.files:
                    lf.handler.freeze(lf)
                    done.append(lf)
        except BaseException:
            for lf in done:
                lf.handler.unfreeze(lf)
            raise

    def handover(self) -> list[HandoverSession]:
        """What the next kernel finds in KHO: the outgoing sessions. Incoming
        sessions that were never finished are discarded (H:liveupdate.h:205-207)."""
        if not self.enabled:
            return []
        return [HandoverSession(s.name, [(lf.handler.compatible, lf.token, lf.handler.handover(lf))
                                         for lf in s.files])
                for s in self.outgoing]


# -- ioctl plumbing ----------------------------------------------------------------
@dataclass(frozen=True)
class LuoOp:
    nr: int
    struct: str
    last: str
    fn: str
    direction: str = "all"      # "incoming", "outgoing", "all" (sessions only)

    @property
    def request(self) -> int:
        return _io(self.nr)


DEVICE_OPS = [
    LuoOp(0x00, "struct liveupdate_ioctl_create_session", "name", "create_session"),
    LuoOp(0x01, "struct liveupdate_ioctl_retrieve_session", "name", "retrieve_session"),
]
SESSION_OPS = [
    LuoOp(0x42, "struct liveupdate_session_finish", "reserved", "finish", "incoming"),
    LuoOp(0x40, "struct liveupdate_session_preserve_fd", "token", "preserve_fd", "outgoing"),
    LuoOp(0x41, "struct liveupdate_session_retrieve_fd", "token", "retrieve_fd", "incoming"),
    LuoOp(0x43, "struct liveupdate_session_get_name", "name", "get_name", "all"),
]


def _name_of(raw: CData) -> bytes:
    data = bytes(raw)
    return data.split(b"\0", 1)[0] if b"\0" in data else data


def _dispatch(ops: list[LuoOp], base: int, request: int, arg: IoctlArg,
              session: Session | None = None) -> tuple[LuoOp, CData]:
    nr = request & 0xff
    table = {op.nr - base: op for op in ops}
    index = nr - base
    if index < 0 or index >= len(table):
        fail(E.EINVAL)
    user_size = arg.get_u32(0)                  # get_user: EFAULT
    op = table[index]
    if op.request != (request & 0xffffffff):
        fail(E.ENOTTY)
    if session is not None:
        if op.direction == "incoming" and not session.retrieved:
            fail(E.EINVAL)
        if op.direction == "outgoing" and session.retrieved:
            fail(E.EINVAL)
    if user_size < offsetofend(op.struct, op.last):
        fail(E.EINVAL)
    cmd = arg.copy_struct_from_user(op.struct, user_size)
    return op, cmd


class LuoDeviceFile(OpenFile):
    """``/dev/liveupdate``."""

    kind = "liveupdate"
    path = "/dev/liveupdate"

    def __init__(self, luo: Luo) -> None:
        super().__init__()
        self.luo = luo

    def release(self) -> None:
        self.luo.in_use = False

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        arg = IoctlArg(buf, mem)
        op, cmd = _dispatch(DEVICE_OPS, CMD_BASE, request, arg)
        table = self.luo.boot.table
        if op.fn == "create_session":
            name = bytes(cmd.name)
            length = len(name.split(b"\0", 1)[0])
            if length == 0 or length > NAME_LEN - 1:
                fail(E.EINVAL)
            sfile = self.luo.create_session(name[:length])
        else:
            sfile = self.luo.retrieve_session(_name_of(cmd.name))
        newfd = table.install(sfile, table.placeholder(f"[luo_session] {sfile.session.name.decode(errors='replace')}"))
        cmd.fd = newfd
        try:
            arg.respond()
        except OSError:
            table.close(newfd)
            raise
        return 0


class SessionFile(OpenFile):
    """An anonymous ``[luo_session]`` file."""

    kind = "luo-session"

    def __init__(self, luo: Luo, session: Session) -> None:
        super().__init__()
        self.luo = luo
        self.session = session
        self.path = f"anon_inode:[luo_session] {session.name.decode(errors='replace')}"

    def release(self) -> None:
        self.luo.release_session(self.session)

    def ioctl(self, fd: int, request: int, buf: Any, mem: UserMemory) -> int:
        arg = IoctlArg(buf, mem)
        op, cmd = _dispatch(SESSION_OPS, CMD_SESSION_BASE, request, arg, self.session)
        getattr(self, "_" + op.fn)(arg, cmd)
        return 0

    def _preserve_fd(self, arg: IoctlArg, cmd: CData) -> None:
        self.luo.preserve(self.session, int(cmd.token), int(cmd.fd))
        arg.respond()

    def _retrieve_fd(self, arg: IoctlArg, cmd: CData) -> None:
        table = self.luo.boot.table
        newfd = self.luo.retrieve(self.session, int(cmd.token))
        cmd.fd = newfd
        try:
            arg.respond()
        except OSError:
            table.close(newfd)
            raise

    def _finish(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.reserved:
            fail(E.EINVAL)
        self.luo.finish(self.session)
        arg.respond()

    def _get_name(self, arg: IoctlArg, cmd: CData) -> None:
        if cmd.reserved:
            fail(E.EINVAL)
        raw = self.session.name[:NAME_LEN - 1]
        for i in range(NAME_LEN):
            cmd.name[i] = raw[i] if i < len(raw) else 0
        arg.respond()
