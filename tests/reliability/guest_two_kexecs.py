"""Run in the guest by test_two_kexecs.py, once per boot (``STAGE`` is 1, 2 or 3):
memfds handed to a background holder agent survive two kexecs in a row, with a
fresh agent started after each (the old one died with its kernel).

1. agent A: session ``two-kexec-1`` with memfd ``a``; exit, the VM agent kexecs;
2. agent B: retrieve ``a``, check it, finish; preserve it again, with a new memfd
   ``b``, in ``two-kexec-2``; exit, kexec;
3. agent C: retrieve ``a`` and ``b`` from ``two-kexec-2``, check both, finish.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from pathlib import Path

from pyiommufd.agent.client import AgentClient, ensure_running
from pyiommufd.memfd import MemFD

SOCKET = "/run/pyiommufd-two-kexecs/agent.sock"
RECORD = Path(os.environ.get("PYIOMMUFD_VM_RESULTS", "/run/pyiommufd-results")) / "two-kexecs.json"
PAGE = mmap.PAGESIZE
FIRST, SECOND = "two-kexec-1", "two-kexec-2"
TOKEN_A, TOKEN_B = 0xA, 0xB


def new_memfd(name: str) -> MemFD:
    memfd = MemFD.create(name, PAGE)
    memfd.write(os.urandom(PAGE))
    return memfd


def digest_of_fd(fd: int) -> str:
    return hashlib.sha256(os.pread(fd, PAGE, 0)).hexdigest()


def main(stage: int) -> int:
    os.makedirs(os.path.dirname(SOCKET), mode=0o700, exist_ok=True)
    assert not AgentClient(SOCKET).is_running(), "an agent answers before this boot started one"
    client = ensure_running(SOCKET)
    pid = client.ping()["pid"]
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    record = json.loads(RECORD.read_text()) if stage > 1 else {"boots": []}
    assert boot not in record["boots"], "no kexec since the last stage"
    record["boots"].append(boot)
    if stage == 1:
        client.create_session(FIRST)
        with new_memfd("a") as a:
            client.preserve(FIRST, TOKEN_A, a)
            record["a"] = a.sha256()
    elif stage == 2:
        client.retrieve_session(FIRST, manifest=False)
        a = client.retrieve(FIRST, TOKEN_A)
        assert digest_of_fd(a) == record["a"], "memfd a changed across the first kexec"
        client.finish(FIRST)
        client.create_session(SECOND)
        client.preserve(SECOND, TOKEN_A, a)
        os.close(a)
        with new_memfd("b") as b:
            client.preserve(SECOND, TOKEN_B, b)
            record["b"] = b.sha256()
    else:
        client.retrieve_session(SECOND, manifest=False)
        for token, key in ((TOKEN_A, "a"), (TOKEN_B, "b")):
            fd = client.retrieve(SECOND, token)
            assert digest_of_fd(fd) == record[key], f"memfd {key} changed"
            os.close(fd)
        client.finish(SECOND)
        client.stop()
    RECORD.write_text(json.dumps(record))
    print(f"two kexecs: stage {stage} ok with agent {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
