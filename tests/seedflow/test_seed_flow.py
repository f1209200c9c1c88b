"""The seed flow, both stages around a real kexec, in the cover letter's order,
by ``pyiommufd selftest`` and by patch 14's C selftest built from the same
kernel tree. They must agree at every step: the same stages, the same first
step that does not pass, the same errno, and the same answer to a non-VFIO
driver bind after the kexec."""
from __future__ import annotations

import errno as E
import re
from pathlib import Path


from pyiommufd_testing.host_vm import kernel_image, parametrize_by_kernel
from pyiommufd_testing.pytest_plugin import KernelTarget
from pyiommufd.vm import seedflow

from seedflow_results import record

TIMEOUT = 900.0
README = Path(__file__).resolve().parents[2] / "README.md"
_MACHINE_SPECIFIC = [
    (re.compile(r"IOMMU_HWPT_LU_\w+ token (0x[0-9a-f]+) \(lu-v\d\)"), r"MARK token \1"),
    (re.compile(r"\b(fd|dev_id|ioas|hwpt|pt_id) \d+"), r"\1 N"),
    (re.compile(r"\biova 0x[0-9a-f]+"), "iova X"),
    (re.compile(r"/dev/vfio/devices/vfio\d+"), "/dev/vfio/devices/vfioN"),
]


def _normalized(line: str) -> str:
    for pattern, repl in _MACHINE_SPECIFIC:
        line = pattern.sub(repl, line)
    return line


def readme_bare_metal_results() -> list[list[str]]:
    """The KTAP result lines of the README's bare-metal procedure, per stage."""
    text = README.read_text()
    section = text[text.index("### Bare metal"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    return [[_normalized(ln) for ln in block.splitlines() if re.match(r"(not )?ok \d+ ", ln)]
            for block in blocks[:2]]


pytest_generate_tests = parametrize_by_kernel


def _run(target: KernelTarget, program: str):
    image = kernel_image(target, "the seed flow")
    if program == "c" and image.c_selftest is None:
        return image, None
    result, res = seedflow.run(program, kernel=str(image.bzimage), c_selftest=(
        str(image.c_selftest) if image.c_selftest else None), timeout=TIMEOUT, progress=print,
        env=target.env)
    print(result.log)
    print(f"VM: {res.summary()}")
    return image, result


def test_both_programs_agree_at_every_step(target):
    image, ours = _run(target, "pyiommufd")
    label = f"{target.name} ({image.label or image.release})"
    assert ours is not None and ours.stages, ours and ours.log[-3000:]
    record(label, "pyiommufd", ours.describe())
    # stage 1 kexecs from the selftest's own process: its report must still arrive
    assert ours.stage(1) is not None, f"stage 1 left no report: {ours.describe()}\n{ours.log[-3000:]}"
    # Every kernel gets a verdict of pass, or "lacks X": never a failed rule.
    for stage in ours.stages:
        assert stage.passed or stage.detail.startswith("kernel lacks"), stage
    if ours.stage(1).passed:
        # the whole flow ran: after the kexec only vfio-pci may take the device
        assert ours.non_vfio_bind_result == "EBUSY", ours.describe()
        assert ours.stage(2) is not None and ours.stage(2).passed, ours.describe()
        # and the README's bare-metal procedure shows what this tier really prints
        printed = [_normalized(ln) for ln in ours.log.splitlines() if re.match(r"(not )?ok \d+ ", ln)]
        stage1, stage2 = readme_bare_metal_results()
        assert printed == stage1 + stage2, "README's bare-metal output differs from the VM's"

    image, theirs = _run(target, "c")
    if theirs is None:
        record(label, "c", "c: not run: this kernel's tree has no iommufd_liveupdate.c (patch 14)")
        assert not target.patches, "a patched tree with the series has patch 14's selftest"
        return
    record(label, "c", theirs.describe())
    assert theirs.steps() == ours.steps(), f"\n  {ours.describe()}\n  {theirs.describe()}"
    assert theirs.non_vfio_bind_result == ours.non_vfio_bind_result
    if not ours.stage(1).passed:
        assert ours.stage(1).errno == E.ENOENT        # a missing handler, in both
