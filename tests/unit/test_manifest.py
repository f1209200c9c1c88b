"""The session manifest (token 0): round trip, sealing, and malformed input."""
from __future__ import annotations

import copy
import errno
import json
import os

import pytest

from pyiommufd import manifest as M
from pyiommufd.backend import LinuxBackend
from pyiommufd.errors import UsageError


def sample() -> M.Manifest:
    return M.Manifest(
        session="vm0", kernel_release="7.3.4", lu_abi="lu-v1", lu_nr=0x95,
        entries=[
            M.Entry(0x890123, "memfd", "guest-ram", size=1 << 20, seals=["seal", "shrink", "grow"],
                    sha256="ab" * 32),
            M.Entry(0x123456, "iommufd", "iommufd0",
                    ioas=[M.Ioas(2, "ioas0", [M.Mapping(iova=1 << 32, length=1 << 20, memfd_token=0x890123,
                                                        memfd="guest-ram", offset=0, prot=["read", "write"])])],
                    hwpts=[M.Hwpt(3, "hwpt0", 0x789012, "ioas0", "dev0")]),
            M.Entry(0x654321, "vfio-cdev", "dev0", bdf="0000:00:03.0", cdev="/dev/vfio/devices/vfio0",
                    iommufd_token=0x123456, hwpt="hwpt0"),
            M.Entry(7, "other", "notes", description="anything"),
        ])


def test_round_trip():
    m = sample()
    back = M.Manifest.from_json(m.to_json())
    assert back == m
    assert back.entry(0x123456).hwpts[0].lu_token == 0x789012
    assert back.by_name("dev0").bdf == "0000:00:03.0"
    assert back.tokens[0] == M.MANIFEST_TOKEN == 0


def test_orders():
    m = sample()
    assert [e.kind for e in m.preserve_order()] == ["memfd", "iommufd", "vfio-cdev", "other"]
    # stage 2: memfds, cdevs, then the iommufd whose retrieve fails in Phase 1
    assert [e.kind for e in m.retrieve_order()] == ["memfd", "vfio-cdev", "iommufd", "other"]


def test_hex_string_tokens_are_accepted():
    doc = sample().as_dict()
    doc["entries"][0]["token"] = "0x890123"
    doc["entries"][1]["ioas"][0]["mappings"][0]["memfd_token"] = "0x890123"
    assert M.Manifest.from_dict(doc).entries[0].token == 0x890123


def test_unknown_members_are_ignored():
    doc = sample().as_dict()
    doc["future_field"] = 1
    doc["entries"][0]["also_new"] = {"x": 1}
    assert M.Manifest.from_dict(doc).session == "vm0"


def _mutate(fn):
    doc = copy.deepcopy(sample().as_dict())
    fn(doc)
    return json.dumps(doc)


BAD = {
    "not json": "{",
    "empty": "",
    "not an object": "[]",
    "wrong format": _mutate(lambda d: d.update(format="something-else")),
    "version not int": _mutate(lambda d: d.update(version="1")),
    "no session": _mutate(lambda d: d.pop("session")),
    "long session": _mutate(lambda d: d.update(session="x" * 64)),
    "manifest token": _mutate(lambda d: d.update(manifest_token=5)),
    "token 0 in entries": _mutate(lambda d: d["entries"][0].update(token=0)),
    "duplicate token": _mutate(lambda d: d["entries"][1].update(token=0x890123)),
    "duplicate name": _mutate(lambda d: d["entries"][1].update(name="guest-ram")),
    "token too big": _mutate(lambda d: d["entries"][0].update(token=1 << 64)),
    "token negative": _mutate(lambda d: d["entries"][0].update(token=-1)),
    "token bool": _mutate(lambda d: d["entries"][0].update(token=True)),
    "unknown kind": _mutate(lambda d: d["entries"][0].update(kind="socket")),
    "size negative": _mutate(lambda d: d["entries"][0].update(size=-1)),
    "bad seal": _mutate(lambda d: d["entries"][0].update(seals=["glue"])),
    "bad sha256": _mutate(lambda d: d["entries"][0].update(sha256="xyz")),
    "entries not list": _mutate(lambda d: d.update(entries={})),
    "mapping of non-memfd": _mutate(lambda d: d["entries"][1]["ioas"][0]["mappings"][0].update(memfd_token=7)),
    "mapping past end": _mutate(lambda d: d["entries"][1]["ioas"][0]["mappings"][0].update(length=2 << 20)),
    "bad prot": _mutate(lambda d: d["entries"][1]["ioas"][0]["mappings"][0].update(prot=["exec"])),
    "hwpt unknown ioas": _mutate(lambda d: d["entries"][1]["hwpts"][0].update(ioas="nope")),
    "hwpt duplicate lu token": _mutate(lambda d: d["entries"][1]["hwpts"].append(
        dict(d["entries"][1]["hwpts"][0], id=4, name="hwpt1"))),
    "cdev without identity": _mutate(lambda d: [d["entries"][2].pop("bdf"), d["entries"][2].pop("cdev")]),
    "cdev iommufd token wrong": _mutate(lambda d: d["entries"][2].update(iommufd_token=0x890123)),
}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_malformed_manifest_is_a_usage_error(text):
    with pytest.raises(UsageError) as info:
        M.Manifest.from_json(text)
    assert "manifest" in str(info.value)


def test_future_version_is_refused_clearly():
    text = _mutate(lambda d: d.update(version=M.VERSION + 1))
    with pytest.raises(UsageError, match="newer than this pyiommufd"):
        M.Manifest.from_json(text)


def test_to_json_validates():
    m = sample()
    m.entries[0].token = 0
    with pytest.raises(UsageError, match="reserved"):
        m.to_json()


def test_not_utf8():
    with pytest.raises(UsageError, match="UTF-8"):
        M.Manifest.from_json(b"\xff\xfe")


@pytest.fixture(params=["linux", "fake"])
def be(request):
    """A real memfd through LinuxBackend, and the fake kernel's."""
    if request.param == "linux":
        return LinuxBackend()
    try:
        return request.getfixturevalue("fake_kernel")
    except pytest.FixtureLookupError:
        pytest.skip("the fake_kernel fixture is not available yet")


def test_write_to_memfd_seals_and_reads_back(be):
    from pyiommufd.memfd import Seal

    m = sample()
    mfd = M.write_to_memfd(m, be)
    try:
        assert mfd.seals == Seal.WRITE | Seal.SEAL | Seal.GROW | Seal.SHRINK
        # every seal is one 7.3 memfd LUO preserves (seed-spec 4.3)
        assert not int(mfd.seals) & ~0x3F
        with pytest.raises(OSError) as info:
            mfd.write(b"x", 0)
        assert info.value.errno == errno.EPERM
        assert M.read_from_fd(mfd, be) == m
        assert M.read_from_fd(mfd.fd, be) == m
    finally:
        mfd.close()


def test_read_from_fd_rejects_other_files(be):
    from pyiommufd.memfd import MemFD

    mfd = MemFD.create("not-a-manifest", 0, backend=be)
    try:
        with pytest.raises(UsageError, match="empty"):
            M.read_from_fd(mfd, be)
        mfd.resize(4)
        mfd.write(b"{}\n\n")
        with pytest.raises(UsageError, match="format"):
            M.read_from_fd(mfd, be)
    finally:
        mfd.close()


def test_read_from_bad_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(UsageError, match="cannot read"):
        M.read_from_fd(r, LinuxBackend())


def test_a_changed_value_fails_the_checksum_and_reformatting_does_not():
    text = sample().to_json()
    doc = json.loads(text)
    assert doc["checksum"].startswith("sha256:")
    # the same document laid out differently is the same document
    assert M.Manifest.from_json(json.dumps(doc, indent=None)) == sample()
    doc["entries"][0]["size"] = 2 << 20
    with pytest.raises(UsageError, match="fails its checksum"):
        M.Manifest.from_json(json.dumps(doc))


def test_a_manifest_without_a_checksum_is_still_read():
    # written by a pyiommufd before the checksum: a live update crosses versions
    doc = json.loads(sample().to_json())
    del doc["checksum"]
    assert M.Manifest.from_json(json.dumps(doc)) == sample()


@pytest.mark.parametrize("keep", [1, 40, 200, -2])
def test_a_truncated_manifest_says_so(keep):
    text = sample().to_json().rstrip()
    with pytest.raises(UsageError, match="truncated: the JSON stops after"):
        M.Manifest.from_json(text[:keep])


def test_a_deeply_nested_document_is_refused_not_crashed_on():
    with pytest.raises(UsageError, match="malformed manifest"):
        M.Manifest.from_json("[" * 100000 + "]" * 100000 + "}")


# A manifest as pyiommufd 0.1.0 wrote it (before FileKind), checksum and all.
RELEASE_0_1_0 = """{
 "format": "pyiommufd-manifest", "version": 1, "creator": "pyiommufd 0.1.0",
 "created": "2026-05-01T12:00:00Z", "kernel_release": "7.3.4", "session": "vm0",
 "lu_abi": "lu-v1", "lu_nr": 149, "manifest_token": 0,
 "entries": [
  {"token": 1, "kind": "memfd", "name": "guest-ram", "size": 4096, "seals": ["seal", "shrink", "grow"]},
  {"token": 2, "kind": "iommufd", "name": "iommufd0", "ioas": [], "hwpts": []},
  {"token": 3, "kind": "vfio-cdev", "name": "dev0", "bdf": "0000:00:03.0", "iommufd_token": 2},
  {"token": 4, "kind": "other", "name": "notes"}
 ]
}"""


def test_reads_the_kinds_release_0_1_0_wrote_as_file_kinds():
    from pyiommufd.fdobject import FileKind

    doc = json.loads(RELEASE_0_1_0)
    doc["checksum"] = M.checksum(doc)
    m = M.Manifest.from_json(json.dumps(doc))
    assert [e.kind for e in m.entries] == [FileKind.MEMFD, FileKind.IOMMUFD, FileKind.VFIO_CDEV, FileKind.OTHER]
    assert all(type(e.kind) is FileKind for e in m.entries)
    assert [e.name for e in m.retrieve_order()] == ["guest-ram", "dev0", "iommufd0", "notes"]
    # and writes them back as the same stable values
    written = json.loads(m.to_json())
    assert [e["kind"] for e in written["entries"]] == ["memfd", "iommufd", "vfio-cdev", "other"]


@pytest.mark.parametrize("spelling", ["vfio cdev", "a VFIO device cdev", "cdev", "MEMFD", "manifest"])
def test_refuses_kinds_that_are_not_stable_entry_values(spelling):
    doc = json.loads(RELEASE_0_1_0)
    doc["entries"][2]["kind"] = spelling
    with pytest.raises(UsageError, match="unknown kind"):
        M.Manifest.from_json(json.dumps(doc))
