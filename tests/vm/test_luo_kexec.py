"""Real kexec live updates of memfds through the public API (``pyiommufd.luo``,
``pyiommufd.memfd``) on the real 7.3 kernel (seed-spec 4.1, 4.3).

Every test states both stages through ``lu_stage``: stage 1 builds and
preserves, saves what it expects with ``lu_stage.save`` and keeps the session
objects alive with ``lu_stage.keep``; stage 2 (after the one kexec all kexec
tests of the run share) retrieves and checks. All tests use the run's one
``/dev/liveupdate`` (``lu_stage.liveupdate``): the device is exclusive.

Kernel facts these tests pin (7.3, ``kernel/liveupdate/``, ``mm/memfd_luo.c``):

* memfd contents, size, seals and file position survive; the name does not;
* only the session fd keeps files preserved: our memfd fds may be closed;
* a repeated retrieve returns the same ``struct file``; an unknown token is
  ENOENT every time; a retrieve whose handler failed is sticky, a retrieve
  that failed before the handler ran (no free fd) is not;
* memfd has no ``can_finish``: FINISH succeeds with files never retrieved and
  drops them; a finished session is removed when its fd is closed;
* closing an outgoing session unpreserves (it does not come back) and unfreezes;
* a preserved memfd's size is frozen (EPERM), a retrieved one is ordinary;
* PRESERVE_FD only on outgoing, RETRIEVE_FD/FINISH only on incoming sessions
  (EINVAL); GET_NAME on both.
"""
from __future__ import annotations

import ctypes
import errno as E
import hashlib
import os
import random
import subprocess
import sys

import pytest

from pyiommufd import errors, ioctl, luo
from pyiommufd.memfd import LIVE_UPDATE_SEALS, MemFD, Seal

pytestmark = pytest.mark.pyiommufd_kexec

KiB, MiB = 1 << 10, 1 << 20


# -- helpers ------------------------------------------------------------------------------

def refused(err: int, fn, *args, **kwargs) -> OSError:
    """Call ``fn``; it must fail with ``err``. Returns the error."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        assert exc.errno == err, f"expected {errors.errname(err)}, got {exc}"
        return exc
    pytest.fail(f"{getattr(fn, '__name__', fn)}{args} succeeded; expected {errors.errname(err)}")


def sha256(memfd: MemFD) -> str:
    return memfd.sha256()


def same_file(fd1: int, fd2: int) -> bool:
    """Same ``struct file``: same inode, and the file position is shared."""
    a, b = os.fstat(fd1), os.fstat(fd2)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        return False
    old = os.lseek(fd1, 0, os.SEEK_CUR)
    try:
        os.lseek(fd1, 4321, os.SEEK_SET)
        return os.lseek(fd2, 0, os.SEEK_CUR) == 4321
    finally:
        os.lseek(fd1, old, os.SEEK_SET)


def make_memfd(name: str, size: int, data: bytes | None = None, *, sealing: bool = True) -> MemFD:
    memfd = MemFD.create(name, size, sealing=sealing)
    if data:
        memfd.write(data)
    return memfd


# -- 1. many memfds in several sessions ---------------------------------------------------

SESSIONS = ("luo-kexec-a", "luo-kexec-b", "luo-kexec-c")
#: seal sets; every session gets each once (in a random order); None: created without
#: MFD_ALLOW_SEALING, so the kernel sets F_SEAL_SEAL itself
SEAL_CHOICES = (Seal(0), LIVE_UPDATE_SEALS, Seal.WRITE, Seal.FUTURE_WRITE, Seal.EXEC,
                Seal.SEAL | Seal.GROW | Seal.SHRINK | Seal.WRITE, Seal.SHRINK | Seal.GROW, None)
#: sizes of memfds 0..6 of every session (4 KiB up, one not page aligned); the 8th differs
COMMON_SIZES = (4 * KiB, 12 * KiB + 123, 16 * KiB, 64 * KiB, 140 * KiB, 256 * KiB, 512 * KiB)
LAST = {"luo-kexec-a": ("big", 3 * MiB), "luo-kexec-b": ("sparse", 1 * MiB),
        "luo-kexec-c": ("empty", 0)}


def test_many_memfds_in_several_sessions(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        seed = int.from_bytes(os.urandom(4), "little")
        rng = random.Random(seed)
        print(f"layout seed {seed}")
        saved: dict[str, list[dict]] = {}
        sessions = []
        total = 0
        for sname in SESSIONS:
            session = lu.create_session(sname)
            sessions.append(session)
            seals = list(SEAL_CHOICES)
            rng.shuffle(seals)
            kind, last = LAST[sname]
            sizes = list(COMMON_SIZES) + [last]
            tokens = rng.sample(range(1, 1 << 20), len(sizes))
            if sname == SESSIONS[0]:
                tokens[0], tokens[1] = 0, (1 << 64) - 1     # the extremes of a u64 token
            entries = []
            for i, (size, seal, token) in enumerate(zip(sizes, seals, tokens)):
                name = f"{sname}-{i}"
                if i == len(sizes) - 1 and kind == "sparse":
                    memfd = make_memfd(name, size, sealing=seal is not None)
                    for off in (0, 300 * KiB + 17, size - 4 * KiB):
                        memfd.write(os.urandom(4 * KiB), off)
                else:
                    memfd = make_memfd(name, size, os.urandom(size), sealing=seal is not None)
                if seal:
                    memfd.add_seals(seal)
                entry = {"token": token, "name": name, "size": memfd.size, "sha256": sha256(memfd),
                         "seals": int(memfd.seals), "pos": rng.randrange(0, size + 1)}
                session.preserve(memfd, token)
                # the position is read at the kexec (freeze), not at preserve
                os.lseek(memfd.fd, entry["pos"], os.SEEK_SET)
                # only the session fd keeps it preserved: the kernel holds its own reference
                memfd.close()
                entries.append(entry)
                total += size
            saved[sname] = entries
            print(f"{sname}: {len(entries)} memfds preserved: "
                  + ", ".join(f"{e['token']:#x}={e['size']}B/seals {e['seals']:#x}" for e in entries))
        lu_stage.save("sessions", saved)
        lu_stage.keep(*sessions)
        print(f"stage 1: {sum(map(len, saved.values()))} memfds, {total / MiB:.1f} MiB, in "
              f"{len(SESSIONS)} sessions; our memfd fds closed, the session fds kept")
        return

    saved = lu_stage.load("sessions")
    for sname, entries in saved.items():
        session = lu.retrieve_session(sname)
        assert session.get_name() == sname
        refused(E.EINVAL, lu.retrieve_session, sname)       # an incoming session is retrieved once
        retrieved = []
        for e in entries:
            fd = session.retrieve(e["token"]).fd
            memfd = MemFD.from_fd(fd)
            retrieved.append((e, memfd))
            assert memfd.size == e["size"], e
            assert int(memfd.seals) == e["seals"], e
            assert os.lseek(fd, 0, os.SEEK_CUR) == e["pos"], e
            assert sha256(memfd) == e["sha256"], e
            again = session.retrieve(e["token"]).fd
            assert again != fd and same_file(fd, again), "a repeated retrieve gives the same file"
            os.close(again)
        print(f"{sname}: GET_NAME ok, second RETRIEVE_SESSION EINVAL; {len(entries)} memfds: size, "
              "seals, file position and sha256 as in stage 1; repeated retrieve -> same file")
        session.finish()
        # finished but open: still listed, already retrieved
        refused(E.EINVAL, lu.retrieve_session, sname)
        session.close()
        refused(E.ENOENT, lu.retrieve_session, sname)
        for e, memfd in retrieved:        # our references outlive the session
            assert memfd.size == e["size"] and sha256(memfd) == e["sha256"]
            memfd.close()
        print(f"{sname}: FINISH ok; after closing the session fd RETRIEVE_SESSION says ENOENT; "
              "the retrieved memfds stay intact")


# -- 2. failed retrieves: unknown token, sticky handler failure, non-sticky EMFILE ----------

FAIL_SESSION = "luo-kexec-retrieve-errors"
T_OK, T_STICKY, T_EMFILE, T_UNKNOWN = 0x11, 0x22, 0x33, 0xDEAD0000BEEF

PR_CAPBSET_DROP, CAP_SYS_ADMIN = 24, 21
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _drop_sys_admin() -> None:   # preexec_fn: the exec'd child runs without CAP_SYS_ADMIN
    if _prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) != 0:
        os._exit(99)


CHILD = r"""
import os, sys
from pyiommufd import errors, ioctl, luo
from pyiommufd.backend import get_backend
fd, token, unknown = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
be = get_backend()
def attempt(t):
    try:
        arg = ioctl.call(be, fd, luo.RETRIEVE_FD, token=t)
    except OSError as exc:
        return errors.errname(exc.errno)
    os.close(int(arg.fd))
    return "ok"
cap = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:"))
# a failed call first, so nothing needs a new file (an import) once file-max is 1
print("ready", cap, attempt(unknown), flush=True)
sys.stdin.readline()
print("result", attempt(token), attempt(token), flush=True)
"""


def _retrieve_without_files(session: luo.Session, token: int) -> tuple[str, str]:
    """RETRIEVE_FD of ``token`` from a child without CAP_SYS_ADMIN while
    fs.file-max is 1: memfd_luo_retrieve() cannot allocate its new file (ENFILE)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(session.fd), str(token), str(T_UNKNOWN)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            pass_fds=(session.fd,), preexec_fn=_drop_sys_admin)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"] and ready[2:] == ["ENOENT"], ready
        assert not int(ready[1], 16) & (1 << CAP_SYS_ADMIN), f"child still has CAP_SYS_ADMIN: {ready}"
        with open("/proc/sys/fs/file-max") as f:
            old = f.read().strip()
        try:
            with open("/proc/sys/fs/file-max", "w") as f:
                f.write("1")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = proc.stdout.readline().split()
        finally:
            with open("/proc/sys/fs/file-max", "w") as f:
                f.write(old)
        assert result[:1] == ["result"], result
        return result[1], result[2]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_failed_retrieves(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        session = lu.create_session(FAIL_SESSION)
        digests = {}
        for token in (T_OK, T_STICKY, T_EMFILE):
            with make_memfd(f"retrieve-{token:#x}", 8 * KiB, os.urandom(8 * KiB)) as memfd:
                session.preserve(memfd, token)
                digests[str(token)] = sha256(memfd)
        lu_stage.save("sha256", digests)
        lu_stage.keep(session)
        print(f"stage 1: session {FAIL_SESSION!r} with tokens {T_OK:#x}, {T_STICKY:#x}, {T_EMFILE:#x}")
        return

    digests = {int(k): v for k, v in lu_stage.load("sha256").items()}
    session = lu.retrieve_session(FAIL_SESSION)
    # an unknown token: ENOENT, and ENOENT again
    refused(E.ENOENT, session.retrieve, T_UNKNOWN)
    refused(E.ENOENT, session.retrieve, T_UNKNOWN)
    print(f"unknown token {T_UNKNOWN:#x}: ENOENT, again ENOENT")

    # no free fd: RETRIEVE_FD fails before the handler runs, which is not recorded
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)   # the lowest free fd number
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        refused(E.EMFILE, session.retrieve, T_EMFILE)
        refused(E.EMFILE, session.retrieve, T_EMFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with MemFD.from_fd(session.retrieve(T_EMFILE).fd) as memfd:
        assert sha256(memfd) == digests[T_EMFILE]
    print(f"token {T_EMFILE:#x}: EMFILE twice with no free fd, then retrieved intact: not sticky")

    # the handler fails (ENFILE): sticky, also for a privileged caller afterwards
    first, second = _retrieve_without_files(session, T_STICKY)
    assert (first, second) == ("ENFILE", "ENFILE")
    refused(E.ENFILE, session.retrieve, T_STICKY)
    refused(E.ENFILE, session.retrieve, T_STICKY)
    print(f"token {T_STICKY:#x}: memfd_luo_retrieve failed with ENFILE (child without "
          "CAP_SYS_ADMIN, fs.file-max 1); with file-max restored, as root: ENFILE, again ENFILE")

    with MemFD.from_fd(session.retrieve(T_OK).fd) as memfd:
        assert sha256(memfd) == digests[T_OK]
    session.finish()            # memfd has no can_finish: the failed token does not block it
    session.close()
    refused(E.ENOENT, lu.retrieve_session, FAIL_SESSION)
    print(f"token {T_OK:#x} intact; FINISH with a failed token succeeds; session gone")


# -- 3. finish with a memfd never retrieved ------------------------------------------------

UNRETRIEVED_SESSION = "luo-kexec-unretrieved"


def test_finish_drops_an_unretrieved_memfd(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        session = lu.create_session(UNRETRIEVED_SESSION)
        with make_memfd("kept", 32 * KiB, os.urandom(32 * KiB)) as kept, \
                make_memfd("dropped", 64 * KiB, os.urandom(64 * KiB)) as dropped:
            session.preserve(kept, 1)
            session.preserve(dropped, 2)
            lu_stage.save("kept", sha256(kept))
        lu_stage.keep(session)
        print(f"stage 1: {UNRETRIEVED_SESSION!r} with tokens 1 (kept) and 2 (never retrieved)")
        return

    session = lu.retrieve_session(UNRETRIEVED_SESSION)
    session.expected_tokens = {1, 2}
    kept = MemFD.from_fd(session.retrieve(1).fd)
    session.finish()            # 7.3: memfd has no can_finish, so token 2 does not block FINISH
    refused(E.ENOENT, session.retrieve, 2)      # FINISH dropped it
    refused(E.ENOENT, session.retrieve, 1)      # ... and LUO's own reference to token 1
    assert sha256(kept) == lu_stage.load("kept")
    session.close()
    refused(E.ENOENT, lu.retrieve_session, UNRETRIEVED_SESSION)
    # the retrieved memfd is an ordinary memfd now
    kept.resize(96 * KiB)
    kept.write(b"x" * KiB, 95 * KiB)
    kept.resize(16 * KiB)
    assert kept.size == 16 * KiB
    kept.add_seals(Seal.GROW)
    refused(E.EPERM, kept.resize, 32 * KiB)
    kept.close()
    print("FINISH with token 2 never retrieved: ok; then tokens 1 and 2 ENOENT; the retrieved "
          "memfd intact, resizable and sealable; session gone after close")


# -- 4. a closed session does not come back ---------------------------------------------------

CLOSED_SESSION = "luo-kexec-closed"
REOPENED_SESSION = "luo-kexec-reopened"


def test_closed_session_does_not_come_back(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        data = os.urandom(48 * KiB)
        memfd = make_memfd("closed", len(data), data)
        closed = lu.create_session(CLOSED_SESSION)
        closed.preserve(memfd, 7)
        refused(E.EPERM, memfd.resize, 64 * KiB)                   # frozen while preserved
        other = lu.create_session(REOPENED_SESSION)
        refused(E.EBUSY, other.preserve, memfd, 8)                 # one memfd, one session
        refused(E.EEXIST, lu.create_session, CLOSED_SESSION)       # names are unique
        closed.close()                                             # unpreserves everything in it
        memfd.resize(64 * KiB)                                     # ... and unfreezes
        memfd.resize(len(data))
        other.preserve(memfd, 8)                                   # free to preserve again
        memfd.close()
        lu.create_session(CLOSED_SESSION).close()                  # the name is free again
        lu_stage.save("sha256", hashlib.sha256(data).hexdigest())
        lu_stage.keep(other)
        print(f"stage 1: memfd frozen in {CLOSED_SESSION!r} (ftruncate EPERM), EBUSY in a second "
              f"session, duplicate name EEXIST; after close: resizable, preserved in "
              f"{REOPENED_SESSION!r}, the closed name reusable")
        return

    refused(E.ENOENT, lu.retrieve_session, CLOSED_SESSION)
    session = lu.retrieve_session(REOPENED_SESSION)
    with MemFD.from_fd(session.retrieve(8).fd) as memfd:
        assert sha256(memfd) == lu_stage.load("sha256")
    refused(E.ENOENT, session.retrieve, 7)
    session.finish()
    session.close()
    print(f"{CLOSED_SESSION!r}: ENOENT after the kexec; {REOPENED_SESSION!r} carried the memfd")


# -- 5. the size of a preserved memfd is frozen -------------------------------------------------

FROZEN_SESSION = "luo-kexec-frozen"
FROZEN_SIZE = 64 * KiB


def test_preserved_memfd_size_is_frozen(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        memfd = make_memfd("frozen", FROZEN_SIZE, os.urandom(FROZEN_SIZE))
        session = lu.create_session(FROZEN_SESSION)
        session.preserve(memfd, 1)
        refused(E.EPERM, memfd.resize, FROZEN_SIZE * 2)            # grow
        refused(E.EPERM, memfd.resize, FROZEN_SIZE // 2)           # shrink
        memfd.resize(FROZEN_SIZE)                                  # same size: allowed
        refused(E.EPERM, memfd.write, b"tail", FROZEN_SIZE)        # a write that would extend it
        refused(E.EPERM, os.posix_fallocate, memfd.fd, 0, FROZEN_SIZE * 2)
        assert memfd.size == FROZEN_SIZE
        assert memfd.seals == Seal(0)                              # frozen without any seal
        memfd.write(b"written after preserve", 1000)               # in-place writes are fine ...
        lu_stage.save("sha256", sha256(memfd))                     # ... and travel with it
        lu_stage.keep(session, memfd)
        print("stage 1: preserved memfd without seals: ftruncate grow/shrink EPERM, same size ok, "
              "extending pwrite EPERM, fallocate EPERM; in-place write ok")
        return

    session = lu.retrieve_session(FROZEN_SESSION)
    memfd = MemFD.from_fd(session.retrieve(1).fd)
    assert memfd.size == FROZEN_SIZE
    assert sha256(memfd) == lu_stage.load("sha256")
    session.finish()
    session.close()
    memfd.resize(FROZEN_SIZE * 2)
    memfd.write(b"tail", FROZEN_SIZE * 2)
    os.posix_fallocate(memfd.fd, 0, FROZEN_SIZE * 4)
    memfd.resize(FROZEN_SIZE // 2)
    assert memfd.size == FROZEN_SIZE // 2
    memfd.close()
    print("stage 2: contents include the write made after preserve; after FINISH the retrieved "
          "memfd grows, extends, fallocates and shrinks")


# -- 6. which ioctl goes with which session direction --------------------------------------------

DIRECTION_SESSION = "luo-kexec-direction"


def test_session_ioctls_by_direction(lu_stage):
    lu = lu_stage.liveupdate
    if lu_stage.stage == 1:
        session = lu.create_session(DIRECTION_SESSION)
        assert session.get_name() == DIRECTION_SESSION
        with make_memfd("direction", 4 * KiB, os.urandom(4 * KiB)) as memfd:
            session.preserve(memfd, 5)
            refused(E.EEXIST, session.preserve, memfd, 5)          # token in use
        with make_memfd("direction-2", 4 * KiB) as memfd:
            refused(E.EEXIST, session.preserve, memfd, 5)          # token in use, other file
        be = session.backend
        refused(E.EINVAL, ioctl.call, be, session.fd, luo.RETRIEVE_FD, token=5)
        refused(E.EINVAL, ioctl.call, be, session.fd, luo.FINISH)
        with pytest.raises(errors.UsageError):
            session.finish()
        lu_stage.keep(session)
        print("stage 1 (outgoing): GET_NAME ok; duplicate token EEXIST; RETRIEVE_FD and FINISH "
              "EINVAL from the kernel")
        return

    session = lu.retrieve_session(DIRECTION_SESSION)
    assert session.incoming and session.get_name() == DIRECTION_SESSION
    with make_memfd("late", 4 * KiB) as memfd:
        err = refused(E.EINVAL, ioctl.call, session.backend, session.fd, luo.PRESERVE_FD,
                      fd=memfd.fd, token=6)
        assert isinstance(err, errors.LiveUpdateError)
        with pytest.raises(errors.UsageError):
            session.preserve(memfd, 6)                             # the library says so first
    os.close(session.retrieve(5).fd)
    session.finish()
    session.close()
    print("stage 2 (incoming): GET_NAME ok; PRESERVE_FD EINVAL from the kernel (and a UsageError "
          "from Session.preserve); retrieve + FINISH ok")
