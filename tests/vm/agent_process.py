"""The holder agent as a separate process in the guest, for the VM tests that
need a real second process: start it, find its threads, kill it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pyiommufd.agent import AgentClient


def start_agent(socket_path: str, *, log_file: str | None = None, **env: str) -> AgentClient:
    """``python -m pyiommufd.agent --background`` on ``socket_path`` with ``env`` added."""
    logging = ["--log-file", log_file] if log_file else []
    subprocess.run([sys.executable, "-m", "pyiommufd.agent", "--background", "--socket", socket_path,
                    *logging],
                   env=dict(os.environ, **env), check=True, timeout=120, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, close_fds=True)
    client = AgentClient(socket_path)
    deadline = time.monotonic() + 60
    while not client.is_running():
        assert time.monotonic() < deadline, "the agent never answered"
        time.sleep(0.2)
    return client


def threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def syscall(pid: int, tid: int) -> str:
    """The number of the syscall thread ``tid`` is blocked in ("running" when none)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        return f.read().split()[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):          # dead; its fds are closed before it becomes a zombie
            return
        assert time.monotonic() < deadline, f"agent {pid} survived SIGKILL"
        time.sleep(0.1)


def describe(pid: int, log_file: str | None = None) -> str:
    """Where each of the agent's threads waits, and the tail of its log: for a failure report."""
    lines = []
    for tid in sorted(threads(pid)):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                syscall = f.read().split()[0]
        except OSError as exc:
            wchan, syscall = "?", str(exc)
        lines.append(f"thread {tid}: wchan {wchan}, syscall {syscall}")
    if log_file and os.path.exists(log_file):
        with open(log_file) as f:
            lines += f.read().splitlines()[-40:]
    return "\n".join(lines)
