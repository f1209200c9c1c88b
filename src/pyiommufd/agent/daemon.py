"""Running the agent as a process: in the foreground (under a service
manager, which may hand back its fd store) or daemonized."""
from __future__ import annotations

import logging
import os
import select
import time
from typing import TextIO

from ..backend import Backend
from . import protocol as P
from . import sdnotify
from .server import AgentServer

log = logging.getLogger("pyiommufd.agent")

DEFAULT_LOG = "/run/pyiommufd/agent.log"


def default_log_path(socket_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), "agent.log")


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s pyiommufd-agent[%(process)d] %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def run_foreground(socket_path: str | None = None, *, backend: Backend | None = None) -> None:
    """Start, serve until ``stop`` or SIGTERM/SIGINT, close everything.
    Under systemd, fds handed back from its fd store (``$LISTEN_FDS``) are
    taken back first."""
    server = AgentServer(socket_path, backend=backend, inherited=sdnotify.listen_fds()).start()
    server.install_signal_handlers()
    server.serve_forever()


def start_background(socket_path: str | None = None, *, log_file: str | None = None,
                     timeout: float = P.START_TIMEOUT) -> int:
    """Daemonize an agent (double fork, setsid, stdio to ``log_file``) and
    return its pid once it listens. Raises the agent's start error otherwise.

    Fork this only from a process that holds nothing worth keeping out of
    the daemon (the CLI spawns ``python -m pyiommufd.agent`` for that)."""
    path = P.default_socket_path(socket_path)
    log_file = log_file or default_log_path(path)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    chunks.append(b" (timed out waiting for it)")
                    break
                ready, _, _ = select.select([r], [], [], left)
                if not ready:
                    continue
                data = os.read(r, 4096)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(r)
        status = b"".join(chunks).decode(errors="replace").strip()
        if status.startswith("ok "):
            return int(status.split()[1])
        raise P.AgentUnavailable(f"the background agent did not start: {status or 'no status'} "
                                 f"(log: {log_file})")
    # first child
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        # the daemon
        os.chdir("/")
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o700, exist_ok=True)
        logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(null)
        os.close(logfd)
        import sys

        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        configure_logging(stream=sys.stderr)
        try:
            server = AgentServer(path).start()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, f"error {exc}\n".encode())
            os._exit(1)
        server.install_signal_handlers()
        os.write(w, f"ok {os.getpid()}\n".encode())
        os.close(w)
        try:
            server.serve_forever()
        finally:
            os._exit(0)
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(w, f"error {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        os._exit(1)


__all__ = ["run_foreground", "start_background", "configure_logging", "default_log_path", "DEFAULT_LOG"]
