"""QMP, through the QEMU project's own client library (``qemu.qmp``).

:class:`Monitor` is the few synchronous calls the live update makes: connect
while QEMU starts, run a command, hand QEMU an fd (``add-fd``), wait for a
migration to end, and wait for QEMU to exit after ``quit``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from .errors import QemuDied, QmpFailed


class Monitor:
    """A QMP connection to one QEMU on a UNIX socket."""

    def __init__(self, socket_path: str, *, pid: int | None = None, timeout: float = 60.0) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        # qemu.qmp logs every failed connection attempt at ERROR while QEMU starts
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        self.socket_path = socket_path
        self.pid = pid
        deadline = time.monotonic() + timeout
        while True:
            qmp = QEMUMonitorProtocol(socket_path)
            try:
                qmp.connect()
                break
            except Exception as exc:  # noqa: BLE001 - qemu.qmp raises several kinds while QEMU starts
                qmp.close()
                if pid is not None and not _alive(pid):
                    raise QemuDied(f"QEMU (pid {pid}) exited before its monitor {socket_path} answered") from None
                if time.monotonic() > deadline:
                    raise QmpFailed(f"no QMP monitor answers on {socket_path} after {timeout:g} s: {exc}") from None
                time.sleep(0.02)
        self._qmp = qmp

    def execute(self, command: str, **args: Any) -> Any:
        """Run ``command``; QEMU's error becomes :class:`QmpFailed`."""
        from qemu.qmp import ExecuteError

        try:
            return self._qmp.cmd(command, **args)
        except ExecuteError as exc:
            raise QmpFailed(f"QMP {command}: {exc.error.error.desc}") from None
        except (OSError, EOFError) as exc:
            raise QemuDied(f"QEMU's monitor closed during {command}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a dropped connection surfaces as several kinds
            if self.pid is not None and not _alive(self.pid):
                raise QemuDied(f"QEMU (pid {self.pid}) died during {command}") from None
            raise QmpFailed(f"QMP {command}: {type(exc).__name__}: {exc}") from None

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def add_fd(self, fd: int, opaque: str) -> int:
        """Give QEMU a copy of ``fd`` in a new fd set; returns its id (open it
        in QEMU as ``/dev/fdset/<id>``)."""
        self._qmp.send_fd_scm(fd)
        return int(self.execute("add-fd", opaque=opaque)["fdset-id"])

    def wait_migration(self, timeout: float) -> dict[str, Any]:
        """``query-migrate`` until it is completed, failed or cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise QmpFailed(f"the migration did not end within {timeout:g} s "
                                f"(status {info.get('status')!r})")
            time.sleep(0.005)

    def wait_status(self, wanted: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status in wanted:
                return status
            if time.monotonic() > deadline:
                raise QmpFailed(f"QEMU stayed {status!r}, not {'/'.join(sorted(wanted))}, for {timeout:g} s")
            time.sleep(0.005)

    def quit(self) -> None:
        """``quit``; QEMU may close the connection before it answers."""
        try:
            self._qmp.cmd("quit")
        except Exception:  # noqa: BLE001 - the connection may drop as QEMU exits
            pass
        self.close()

    def close(self) -> None:
        try:
            self._qmp.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


__all__ = ["Monitor", "wait_exit"]
