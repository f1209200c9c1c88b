"""The README's library example runs as written (on the fake kernel with the
series), and its tables agree with the code."""
import re
from pathlib import Path

import pytest

from pyiommufd import abi, pci
from pyiommufd import exitcodes
from pyiommufd.fdobject import FileKind

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_vmm_integration_example_runs(series_kernel):
    assert pci.PciDevice("0000:00:03.0").driver != "vfio-pci"  # the example binds it itself
    [example] = python_blocks(README.read_text())
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    session = scope["session"]
    assert sorted(session.preserved) == [1, 2, 3]
    assert scope["hwpt"].preserve_token == 0x789012
    # the session survives the kexec with its three files
    series_kernel.kexec()
    from pyiommufd.luo import LiveUpdate

    with LiveUpdate.open() as lu, lu.retrieve_session("vm0") as incoming:
        ram = incoming.retrieve(1)
        assert ram.kind is FileKind.MEMFD and series_kernel.fstat_size(ram.fd) == scope["GUEST_RAM"]


def test_exit_code_table_matches_the_code():
    text = README.read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.M))
    assert sorted(int(code) for code in rows) == sorted(code for code, _ in exitcodes.TABLE)


@pytest.mark.parametrize("revision", [abi.LU_V1, abi.LU_V2])
def test_abi_table_matches_the_revisions(revision):
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| `{revision.name}` |"))
    assert revision.ioctl_name in row and f"{revision.size} bytes" in row
    assert f"u{revision.token_bits}" in row and f"{revision.nr:#x}" in row


def test_public_names_are_importable_from_the_package():
    import pyiommufd

    for name in pyiommufd.__all__:
        assert getattr(pyiommufd, name) is not None, name
    assert pyiommufd.PciDevice is pci.PciDevice
