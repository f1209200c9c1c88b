"""A service manager's notify socket for tests of the agent under systemd:
what the agent sends with sd_notify, and the fd store it fills."""
from __future__ import annotations

import array
import os
import socket
from typing import Any


class NotifySocket:
    """The service manager's end: a bound AF_UNIX datagram socket that keeps
    every message and, like systemd's fd store, every fd sent with FDSTORE=1
    under its FDNAME until FDSTOREREMOVE=1 names it."""

    def __init__(self, address: str, kernel: Any = None) -> None:
        self.address = address
        self.kernel = kernel
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, Any]] = []
        self.store: list[tuple[str, int]] = []

    def drain(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except BlockingIOError:
                break
            fds = array.array("i")
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
            msg: dict[str, Any] = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            msg["_fds"] = list(fds)
            new.append(msg)
            if msg.get("FDSTORE") == "1":
                for fd in fds:
                    if self.kernel is not None:
                        self.kernel.fstat_size(fd)      # the fake learns of the fd store's reference
                    self.store.append((msg.get("FDNAME", ""), fd))
            else:
                for fd in fds:
                    os.close(fd)
            if msg.get("FDSTOREREMOVE") == "1":
                self.drop(msg.get("FDNAME", ""))
        self.messages += new
        return new

    def _close(self, fd: int) -> None:
        if self.kernel is not None:
            self.kernel.close(fd)
        else:
            os.close(fd)

    def names(self) -> list[str]:
        return [name for name, _ in self.store]

    def drop(self, name: str) -> None:
        """Close and forget every stored fd named ``name``."""
        for entry in [x for x in self.store if x[0] == name]:
            self._close(entry[1])
            self.store.remove(entry)

    def close(self) -> None:
        for _, fd in self.store:
            try:
                self._close(fd)
            except OSError:
                pass
        self.store.clear()
        self.sock.close()
