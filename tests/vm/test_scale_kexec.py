"""Scale and soak of live update on the real kernel, across the run's kexec.

* 5000 one-page memfds over 20 sessions survive the kexec with their sha256;
* 50 preserve → close cycles leak no fd and no kernel memory, and none of the
  cycled sessions comes through the kexec.
"""
from __future__ import annotations

import mmap
import os

import pytest

from pyiommufd.memfd import MemFD

from retrieved import retrieved_memfds

pytestmark = pytest.mark.pyiommufd_kexec

PAGE = mmap.PAGESIZE
SESSIONS, PER_SESSION = 20, 250
CYCLES = 50
CYCLE_SESSION = "soak-cycle"


def scale_name(i: int) -> str:
    return f"scale-{i:02d}"


def test_5000_memfds_in_20_sessions(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        digests: dict[str, dict[str, str]] = {}
        sessions = []
        for i in range(SESSIONS):
            session = lu.create_session(scale_name(i))
            memfds = []
            for token in range(PER_SESSION):
                memfd = MemFD.create(f"scale-{i}-{token}", PAGE)
                memfd.write(os.urandom(PAGE))
                memfds.append(memfd)
            session.preserve_many([(m, t) for t, m in enumerate(memfds)])
            digests[scale_name(i)] = {str(t): m.sha256() for t, m in enumerate(memfds)}
            for m in memfds:         # the session keeps them preserved
                m.close()
            sessions.append(session)
        lu_stage.save("sha256", digests)
        lu_stage.keep(*sessions)
        print(f"stage 1: {SESSIONS * PER_SESSION} one-page memfds preserved in {SESSIONS} sessions")
        return

    digests = lu_stage.load("sha256")
    checked = 0
    for name, tokens in digests.items():
        session = lu.retrieve_session(name)
        for token, memfd in retrieved_memfds(session, (int(t) for t in tokens)).items():
            with memfd:
                assert memfd.sha256() == tokens[str(token)], f"{name} token {token} changed"
                checked += 1
        session.finish()
        session.close()
    assert checked == SESSIONS * PER_SESSION
    print(f"stage 2: {checked} memfds in {len(digests)} sessions retrieved, sha256 intact")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


#: what a leaked session with its preserved memfd would hold: the memfd's pages (Shmem)
#: and the session's and file's kernel objects (unreclaimable slab, printed only)
LEAK_FIELDS = ("Shmem", "SUnreclaim")
#: 16 pages a cycle, so that a leaked memfd (64 KiB x 50 = 3.2 MiB of Shmem) stands far
#: above the few hundred KiB the interpreter and page cache move in between
SOAK_SIZE = 16 * PAGE


def meminfo_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in LEAK_FIELDS:
                fields[key] = int(value.split()[0])
    return fields


def preserved_memfd(lu, name: str):
    session = lu.create_session(name)
    with MemFD.create(name, SOAK_SIZE) as memfd:
        memfd.write(os.urandom(SOAK_SIZE))
        session.preserve(memfd, 1)
    return session                 # the session alone keeps the memfd now


def test_preserve_close_cycles_leak_nothing(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 2:
        gone = [i for i in range(CYCLES) if lu.try_retrieve_session(f"{CYCLE_SESSION}-{i}") is None]
        assert gone == list(range(CYCLES)), "a closed session came through the kexec"
        print(f"stage 2: none of the {CYCLES} cycled sessions exists")
        return

    for i in range(5):                    # warm-up: slab caches and interpreter allocations
        preserved_memfd(lu, f"soak-warm-{i}").close()
    fds, before = open_fds(), meminfo_kib()
    for i in range(CYCLES):
        preserved_memfd(lu, f"{CYCLE_SESSION}-{i}").close()
    after = meminfo_kib()
    assert open_fds() == fds

    # The yardstick, measured rather than guessed: what CYCLES such sessions hold while
    # they stay open, i.e. what a leak of every cycle would add.
    held = [preserved_memfd(lu, f"soak-held-{i}") for i in range(CYCLES)]
    holding = meminfo_kib()
    for session in held:
        session.close()
    for key in LEAK_FIELDS:
        grew, cost = after[key] - before[key], holding[key] - after[key]
        print(f"{key}: {CYCLES} preserve/close cycles {before[key]} -> {after[key]} KiB "
              f"({grew:+d}); {CYCLES} sessions held open {cost:+d} KiB")
    shmem_cost = holding["Shmem"] - after["Shmem"]
    # measured on the standin kernel: the 50 held memfds show as +3192 KiB of 3200
    assert shmem_cost >= 0.9 * CYCLES * SOAK_SIZE / 1024, "the held memfds do not show: the measure sees nothing"
    # a quarter of a leak of every cycle's memfd; measured here: +0 KiB after the 50 cycles
    assert after["Shmem"] - before["Shmem"] < shmem_cost / 4
    # SUnreclaim is printed, not asserted: 50 held sessions moved it by 0 KiB (their objects
    # fit in slab pages already there), so at this scale slab cannot show a leak either way
