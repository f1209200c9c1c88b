"""The holder agent: keeps ``/dev/liveupdate`` and LUO session fds open
across commands (and across the kexec's stage boundary, until finish).

* :mod:`.protocol` — framing, SCM_RIGHTS, error encoding, the agent errors;
* :mod:`.server` — :class:`AgentServer`: the socket, its peers, the serving
  loop (``serve_in_thread()`` for tests);
* :mod:`.handlers` — one handler per request; :mod:`.registry` — the
  sessions, files and fds the agent holds;
* :mod:`.daemon` — :func:`run_foreground` / :func:`start_background` for the CLI;
* :mod:`.client` — :class:`AgentClient`, :func:`ensure_running`,
  :func:`hand_over`.
"""
from __future__ import annotations

from typing import Any

from .client import AgentClient, ensure_running, hand_over, in_process_agents
from .protocol import (DEFAULT_SOCKET, ENV_SOCKET, AgentError, AgentPermissionDenied, AgentProtocolError,
                       AgentRefused, AgentUnavailable, default_socket_path)


def __getattr__(name: str) -> Any:
    # the server pulls in luo/manifest; import it only when asked for
    if name in ("AgentServer", "default_authorize"):
        from . import server

        return getattr(server, name)
    if name in ("run_foreground", "start_background"):
        from . import daemon

        return getattr(daemon, name)
    raise AttributeError(f"module 'pyiommufd.agent' has no attribute {name!r}")


__all__ = ["AgentClient", "AgentServer", "ensure_running", "hand_over", "in_process_agents",
           "AgentError", "AgentUnavailable", "AgentProtocolError", "AgentPermissionDenied", "AgentRefused",
           "DEFAULT_SOCKET", "ENV_SOCKET", "default_socket_path", "run_foreground", "start_background",
           "default_authorize"]
