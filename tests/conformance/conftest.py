"""Session fixtures for the conformance tier: the real 7.3 headers, parsed once."""
from __future__ import annotations

import pytest

import uapi_probe


@pytest.fixture(scope="session")
def uapi_include_dir():
    """usr/include of Debian's linux-libc-dev 7.3.4. Never skipped: no headers, no check."""
    from pyiommufd.vm import debian

    try:
        return debian.uapi_include_dir()
    except Exception as exc:  # noqa: BLE001 - any failure here must fail the tier loudly
        error = f"{type(exc).__name__}: {exc}"
    pytest.fail(
        "cannot obtain the real Linux 7.3 UAPI headers (linux-libc-dev "
        f"{debian.LINUX_PACKAGE_VERSION} from {debian.SUITE}) that the conformance "
        f"probe compares against: {error}", pytrace=False)


@pytest.fixture(scope="session")
def real_uapi(uapi_include_dir):
    try:
        return uapi_probe.load_real(uapi_include_dir)
    except uapi_probe.ProbeError as exc:
        error = str(exc)
    pytest.fail(error, pytrace=False)


@pytest.fixture(scope="session")
def shipped():
    """(ffi, cdef text) of the generated pyiommufd._uapi the package uses."""
    from pyiommufd._uapi import ffi
    from pyiommufd._uapi_build import cdef_text

    return ffi, cdef_text()


@pytest.fixture(scope="session")
def shipped_problems(shipped, real_uapi, tmp_path_factory):
    """Mismatches of the shipped declarations; one probe compile per session."""
    ffi, cdef = shipped
    try:
        return uapi_probe.compare(ffi, cdef, real_uapi, tmp_path_factory.mktemp("probe"))
    except uapi_probe.ProbeError as exc:
        error = str(exc)
    pytest.fail(error, pytrace=False)
