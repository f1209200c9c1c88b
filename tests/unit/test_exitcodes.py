"""exit_code_for: the one place an error becomes the command's exit code."""
import errno as E

import pytest

from pyiommufd import errors, exitcodes
from pyiommufd.agent.protocol import AgentRefused, AgentUnavailable


@pytest.mark.parametrize("exc, code", [
    (errors.UsageError("bad"), exitcodes.BAD_INPUT),
    (errors.PlanError(["x"]), exitcodes.BAD_INPUT),
    (errors.AbiError("no such revision"), exitcodes.UNSUPPORTED),
    (errors.VerificationFailed("differs"), exitcodes.CHECK_FAILED),
    (errors.make_error("LIVEUPDATE_SESSION_FINISH", "luo", E.EBUSY), exitcodes.BUSY),
    (errors.make_error("open(/dev/liveupdate)", "luo", E.ENOENT), exitcodes.UNSUPPORTED),
    (errors.make_error("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.ENOENT), exitcodes.UNSUPPORTED),
    (errors.make_error("LIVEUPDATE_SESSION_RETRIEVE_FD", "luo", E.ENOENT), exitcodes.KERNEL_ERROR),
    (errors.make_error("IOMMU_HWPT_LU_SET_PRESERVE", "iommufd", E.ENOTTY), exitcodes.UNSUPPORTED),
    (errors.make_error("kexec", "kexec", E.EPERM), exitcodes.NOT_PERMITTED),
    (PermissionError(E.EACCES, "denied"), exitcodes.NOT_PERMITTED),
    (AgentUnavailable("no agent"), exitcodes.AGENT_UNREACHABLE),
    (AgentRefused("holding state"), exitcodes.BUSY),
    (RuntimeError("a bug"), exitcodes.INTERNAL_ERROR),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_exit_code_for(exc, code):
    assert exitcodes.exit_code_for(exc) == code
