"""Typed errors: every errno of seed-spec 4 maps to a class and a hint."""
import errno as E
import pickle

import pytest

from pyiommufd import errors


@pytest.mark.parametrize("interface, err, interface_cls, errno_cls", [
    ("luo", E.EBUSY, errors.LiveUpdateError, errors.Busy),
    ("luo", E.ENOENT, errors.LiveUpdateError, errors.NotFound),
    ("iommufd", E.EADDRINUSE, errors.IommufdError, errors.AddressInUse),
    ("vfio", E.EPERM, errors.VfioError, errors.PermissionDenied),
    ("iommufd", E.EINVAL, errors.IommufdError, errors.InvalidArgument),
    ("iommufd", E.E2BIG, errors.IommufdError, errors.TooBig),
    ("iommufd", E.ENOTTY, errors.IommufdError, errors.NoSuchIoctl),
    ("iommufd", E.EMSGSIZE, errors.IommufdError, errors.MessageSize),
    ("luo", E.EOPNOTSUPP, errors.LiveUpdateError, errors.NotSupported),
    ("luo", E.EEXIST, errors.LiveUpdateError, errors.AlreadyExists),
    ("memfd", E.EPERM, errors.MemfdError, errors.PermissionDenied),
    ("kexec", E.EINVAL, errors.KexecError, errors.InvalidArgument),
    ("sysfs", E.EBUSY, errors.SysfsError, errors.Busy),
])
def test_error_is_interface_errno_and_oserror(interface, err, interface_cls, errno_cls):
    exc = errors.make_error("OP", interface, err)
    assert isinstance(exc, interface_cls)
    assert isinstance(exc, errno_cls)
    assert isinstance(exc, OSError) and exc.errno == err
    assert exc.op == "OP"
    assert errors.errname(err) in str(exc)


# (op, interface, errno, words the hint must contain) -- seed-spec 4 catalogue
SEED_SPEC_ERRNOS = [
    ("IOMMU_HWPT_LU_MARK_PRESERVE", "iommufd", E.EADDRINUSE, "token"),
    ("IOMMU_HWPT_LU_SET_PRESERVE", "iommufd", E.EADDRINUSE, "token"),
    ("open(/dev/liveupdate)", "luo", E.EBUSY, "exclusive"),
    ("LIVEUPDATE_SESSION_FINISH", "luo", E.EBUSY, "not ready to finish"),
    ("IOMMU_IOAS_UNMAP", "iommufd", E.EBUSY, "immutable"),
    ("IOMMU_IOAS_MAP_FILE", "iommufd", E.EBUSY, "immutable"),
    ("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.ENOENT, "no live-update handler for this file type"),
    ("VFIO_DEVICE_BIND_IOMMUFD", "vfio", E.EPERM, "retrieve the cdev"),
    ("IOMMU_HWPT_LU_MARK_PRESERVE", "iommufd", E.EINVAL, "NOIOMMU_GET_PA"),
    ("IOMMU_HWPT_LU_SET_PRESERVE", "iommufd", E.E2BIG, "ABI revision"),
    ("IOMMU_HWPT_LU_MARK_PRESERVE", "iommufd", E.ENOTTY, "CONFIG_IOMMU_LIVEUPDATE"),
    ("IOMMU_IOAS_IOVA_RANGES", "iommufd", E.E2BIG, "ABI mismatch"),
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", "luo", E.EOPNOTSUPP, "Phase 1"),
    ("LIVEUPDATE_SESSION_PRESERVE_FD", "luo", E.EBUSY, "preserved already"),
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "luo", E.ENOENT, "no incoming session"),
    ("IOMMU_IOAS_MAP", "iommufd", E.EFAULT, "DMA_BUF"),
    ("IOMMU_IOAS_MAP", "iommufd", E.ENOMEM, "RLIMIT_MEMLOCK"),
    ("ftruncate", "memfd", E.EPERM, "frozen"),
]


@pytest.mark.parametrize("op, interface, err, words", SEED_SPEC_ERRNOS)
def test_every_seed_spec_errno_has_a_domain_hint(op, interface, err, words):
    exc = errors.make_error(op, interface, err)
    assert exc.hint and words in exc.hint, exc.hint


def test_busy_liveupdate_hint_names_holders():
    exc = errors.make_error("open(/dev/liveupdate)", "luo", E.EBUSY, context={"holders": [42, 7]})
    assert "pid 42, 7" in exc.hint


def test_finish_hint_lists_unretrieved_tokens():
    exc = errors.make_error("LIVEUPDATE_SESSION_FINISH", "luo", E.EBUSY, context={"unretrieved": ["0x1"]})
    assert "unretrieved tokens: ['0x1']" in exc.hint


def test_errors_survive_pickling_with_their_class():
    exc = errors.make_error("LIVEUPDATE_SESSION_FINISH", "luo", E.EBUSY, detail="session 'x'")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back).__name__ == "LiveUpdateBusy"
    assert isinstance(back, errors.Busy) and back.op == exc.op and str(back) == str(exc)


def test_documented_combined_classes_import_with_their_bases():
    from pyiommufd.errors import IommufdInvalidArgument, LiveUpdateBusy, SysfsBusy

    assert issubclass(LiveUpdateBusy, errors.LiveUpdateError) and issubclass(LiveUpdateBusy, errors.Busy)
    assert issubclass(LiveUpdateBusy, OSError) and issubclass(LiveUpdateBusy, errors.KernelError)
    assert issubclass(IommufdInvalidArgument, errors.IommufdError)
    assert issubclass(IommufdInvalidArgument, errors.InvalidArgument)
    assert issubclass(SysfsBusy, errors.SysfsError) and issubclass(SysfsBusy, errors.Busy)
    assert type(errors.make_error("LIVEUPDATE_SESSION_FINISH", "luo", E.EBUSY)) is LiveUpdateBusy


@pytest.mark.parametrize("interface", sorted(set(errors.INTERFACES) - {"kernel"}))
def test_every_interface_and_errno_pair_has_a_declared_class(interface):
    base = errors.INTERFACES[interface]
    for err, mixin in errors.ERRNO_CLASSES.items():
        cls = errors.make_error("OP", interface, err).__class__
        name = base.__name__.removesuffix("Error") + mixin.__name__
        assert cls is getattr(errors, name), (interface, err)
        assert cls.__bases__ == (base, mixin) and cls.__module__ == "pyiommufd.errors"
        assert cls.__doc__ == mixin.__doc__


def test_unknown_errno_keeps_interface_class():
    exc = errors.make_error("X", "vfio", E.ETIMEDOUT)
    assert type(exc) is errors.VfioError and exc.errno == E.ETIMEDOUT


def test_plan_error_lists_problems():
    exc = errors.PlanError(["a", "b"])
    assert exc.problems == ["a", "b"] and str(exc) == "a; b"
    assert isinstance(exc, errors.UsageError) and isinstance(exc, ValueError)
