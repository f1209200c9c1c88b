"""RLIMIT_NOFILE for commands that hold many fds (the agent, ``preserve``).

The default soft limit (1024) is far below what one LUO session can hold
(thousands of memfds), while the hard limit is usually much higher. A
process may raise its soft limit up to the hard limit without privileges.
"""
from __future__ import annotations

import resource


def nofile() -> tuple[int, int]:
    """``(soft, hard)`` RLIMIT_NOFILE of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile(needed: int | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit when ``needed`` fds
    (None: as many as allowed) exceed it. Returns the soft limit now."""
    soft, hard = nofile()
    if needed is not None and needed <= soft:
        return soft
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def emfile_hint(_context: object = None) -> str:
    soft, hard = nofile()
    return (f"too many open files: the soft RLIMIT_NOFILE is {soft} (hard {hard}); `pyiommufd agent` "
            "and `pyiommufd preserve` raise the soft limit to the hard one, beyond that raise the hard "
            "limit (ulimit -Hn, systemd LimitNOFILE=, /etc/security/limits.conf)")
