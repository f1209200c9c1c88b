"""The live-update series on the fake kernel (seed-spec 2.1-2.5, 3.3-3.4, 4.2-4.7)."""
import errno
import mmap
import os

import pytest

from pyiommufd import errors, ioctl
from pyiommufd._uapi import ffi
from pyiommufd.backend import LINUX_REBOOT_CMD_KEXEC, use
from pyiommufd_testing import FakeKernel, FakePciDevice, SimulatedKexec

U64_MAX = (1 << 64) - 1
TOK_IOMMUFD, TOK_CDEV, TOK_HWPT, TOK_MEMFD = 0x123456, 0x654321, 0x789012, 0x890123


def lu_raw(kernel, fd, size, hwpt_id=0, token=0, tail=b"", nr=0x95):
    """A mark ioctl with an explicit size: a 16-byte {size, hwpt_id, u64 token}
    buffer plus ``tail``."""
    body = (size.to_bytes(4, "little") + hwpt_id.to_bytes(4, "little")
            + token.to_bytes(8, "little") + tail)
    buf = ffi.buffer(ffi.new("char[]", body), len(body))
    kernel.ioctl(fd, ioctl.IO(0x3B, nr), buf)


def page():
    """Page-aligned user memory (a domain needs 4 KiB alignment)."""
    return mmap.mmap(-1, 4096)


def errno_of(fn, *args, **kw):
    with pytest.raises(OSError) as exc:
        fn(*args, **kw)
    return exc.value.errno


# -- the mark ioctl ------------------------------------------------------------------------
def test_mark_rules(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup(mark_token=None)
    other = kt.hwpt(iommufd, devid, ioas)
    with pytest.raises(errors.NotFound):
        kt.mark(iommufd, 99, 1)                     # unknown id
    with pytest.raises(errors.NotFound):
        kt.mark(iommufd, ioas, 1)                   # an IOAS is not a paging HWPT
    kt.mark(iommufd, hwpt, TOK_HWPT)
    with pytest.raises(errors.AddressInUse):
        kt.mark(iommufd, other, TOK_HWPT)           # token taken in this iommufd
    kt.mark(iommufd, hwpt, 5)                       # re-mark overwrites
    kt.mark(iommufd, other, TOK_HWPT)               # so the old token is free
    kt.mark(iommufd, hwpt, 5)                       # same HWPT, same token: fine


def test_tokens_are_per_iommufd(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    fd2 = kt.iommufd()
    ioas2 = kt.ioas(fd2)
    # a second iommufd cannot allocate an HWPT without a device; the token
    # namespace is still its own: marking nothing there cannot collide
    with pytest.raises(errors.NotFound):
        kt.mark(fd2, ioas2, TOK_HWPT)


def test_destroying_a_marked_hwpt_frees_its_token(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    spare = kt.hwpt(iommufd, devid, ioas)
    kt.mark(iommufd, spare, 77)
    kt.destroy(iommufd, spare)
    kt.mark(iommufd, hwpt, 77)


def test_v2_size_rules(series_kernel, kt):
    fd = kt.iommufd()
    assert errno_of(lu_raw, series_kernel, fd, 12) == errno.EINVAL       # min size 16
    assert errno_of(lu_raw, series_kernel, fd, 8) == errno.EINVAL
    assert errno_of(lu_raw, series_kernel, fd, 16) == errno.ENOENT       # the probe (seed-spec 8.1)
    assert errno_of(lu_raw, series_kernel, fd, 24, tail=b"\0" * 7 + b"\1") == errno.E2BIG
    assert errno_of(lu_raw, series_kernel, fd, 24, tail=b"\0" * 8) == errno.ENOENT


def test_v1_size_rules(series_kernel_v1, kt):
    fd = kt.iommufd()
    assert errno_of(lu_raw, series_kernel_v1, fd, 8) == errno.EINVAL     # min size 12
    assert errno_of(lu_raw, series_kernel_v1, fd, 12) == errno.ENOENT
    assert errno_of(lu_raw, series_kernel_v1, fd, 16) == errno.ENOENT    # zero tail
    assert errno_of(lu_raw, series_kernel_v1, fd, 16, token=1 << 32) == errno.E2BIG


def test_v1_token_is_u32(series_kernel_v1, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup(mark_token=None)
    ioctl.call(series_kernel_v1, iommufd, kt.D.LU_SET, hwpt_id=hwpt, hwpt_token=0xFFFFFFFF)


def test_noiommu_get_pa_on_a_series_kernel_is_e2big(series_kernel, kt):
    """seed-spec 2.2, third row: a real 40-byte query has a non-zero tail."""
    fd = kt.iommufd()
    with pytest.raises(errors.TooBig):
        ioctl.call(series_kernel, fd, kt.D.NOIOMMU_GET_PA, ioas_id=1, iova=4096, length=4096)


def test_lu_nr_override(kt):
    with FakeKernel(lu_abi="lu-v2", lu_nr=0x96) as k, use(k):
        fd = k.open("/dev/iommu")
        assert errno_of(lu_raw, k, fd, 16) == errno.EINVAL               # 0x95: NOIOMMU_GET_PA
        assert errno_of(lu_raw, k, fd, 16, nr=0x96) == errno.ENOENT


def test_stock_kernel_has_no_mark(fake_kernel, kt):
    assert errno_of(lu_raw, fake_kernel, kt.iommufd(), 16) == errno.EINVAL


# -- iommufd PRESERVE_FD ----------------------------------------------------------------------
def test_selftest_stage1_order(series_kernel, kt):
    """S1:4397-4424: cdev before iommufd and iommufd before memfd fail with
    ENOENT; the right order works; closing the session undoes it all."""
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    luo = kt.luo()
    s = kt.create_session(luo, "iommufd-test")
    with pytest.raises(errors.NotFound):
        kt.preserve(s, cdev, TOK_CDEV)
    with pytest.raises(errors.NotFound):
        kt.preserve(s, iommufd, TOK_IOMMUFD)
    kt.map_file(iommufd, ioas, kt.memfd())          # the failed preserve left the IOAS mutable
    kt.unmap(iommufd, ioas, 0, U64_MAX)
    kt.map_file(iommufd, ioas, memfd)
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    kt.preserve(s, cdev, TOK_CDEV)
    series_kernel.close(s)
    s = kt.create_session(luo, "iommufd-test")
    for fd, token in ((memfd, TOK_MEMFD), (iommufd, TOK_IOMMUFD), (cdev, TOK_CDEV)):
        kt.preserve(s, fd, token)


def test_preserved_ioas_is_immutable(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    other = kt.ioas(iommufd)
    with pytest.raises(errors.Busy):
        kt.map_file(iommufd, ioas, kt.memfd())
    with pytest.raises(errors.Busy):
        kt.map_va(iommufd, ioas, page())
    with pytest.raises(errors.Busy):
        kt.unmap(iommufd, ioas, 0, U64_MAX)
    with pytest.raises(errors.Busy):
        kt.unmap(iommufd, ioas, 0x1000, 0x1000)      # even one that hits nothing
    iova = kt.map_file(iommufd, other, kt.memfd())   # other IOAS are not affected
    with pytest.raises(errors.Busy):                 # copy into the preserved IOAS
        ioctl.call(series_kernel, iommufd, kt.D.IOAS_COPY, flags=6, src_ioas_id=other,
                   dst_ioas_id=ioas, length=4096, src_iova=iova)
    series_kernel.close(s)                           # unpreserve: mutable again
    kt.unmap(iommufd, ioas, 0, U64_MAX)


def test_copy_out_of_a_preserved_ioas_is_allowed(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    dst = kt.ioas(iommufd)
    src_iova = 1 << 20          # the kernel-chosen IOVA of device_setup's 1 MiB mapping
    with pytest.raises(errors.Busy):        # but not into it
        ioctl.call(series_kernel, iommufd, kt.D.IOAS_COPY, flags=6, src_ioas_id=ioas,
                   dst_ioas_id=ioas, length=4096, src_iova=src_iova)
    info = ioctl.call(series_kernel, iommufd, kt.D.IOAS_COPY, flags=6, src_ioas_id=ioas,
                      dst_ioas_id=dst, length=4096, src_iova=src_iova)
    assert info.dst_iova > 0


def test_user_va_mapping_is_einval(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    kt.map_va(iommufd, ioas, page())
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, iommufd, TOK_IOMMUFD)
    kt.unmap(iommufd, ioas, 0, U64_MAX)             # rolled back: mutable


def test_unmarked_hwpt_may_map_anything(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    other = kt.ioas(iommufd)
    kt.hwpt(iommufd, devid, other)                   # unmarked HWPT
    kt.map_va(iommufd, other, page())
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    kt.unmap(iommufd, other, 0, U64_MAX)


@pytest.mark.parametrize("seals", [0, 0x1 | 0x4, 0x1 | 0x2, 0x2 | 0x4])
def test_seals_missing_at_map_time_is_einval(series_kernel, kt, seals):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    kt.unmap(iommufd, ioas, 0, U64_MAX)
    late = kt.memfd(seals=seals)
    kt.map_file(iommufd, ioas, late)
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, late, TOK_MEMFD)
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, iommufd, TOK_IOMMUFD)


def test_seals_added_after_the_map_do_not_count(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    kt.unmap(iommufd, ioas, 0, U64_MAX)
    late = kt.memfd(seals=None)
    kt.map_file(iommufd, ioas, late)
    series_kernel.fcntl(late, 1033, 0x7)
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, late, TOK_MEMFD)
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, iommufd, TOK_IOMMUFD)


def test_memfd_in_another_session_is_enoent(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    luo = kt.luo()
    kt.preserve(kt.create_session(luo, "memfds"), memfd, TOK_MEMFD)
    with pytest.raises(errors.NotFound):
        kt.preserve(kt.create_session(luo, "devices"), iommufd, TOK_IOMMUFD)


def test_memfd_must_be_the_same_struct_file(series_kernel, kt):
    """A dup works; a re-open of the memfd is another struct file (seed-spec 4.2)."""
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    luo = kt.luo()
    s = kt.create_session(luo, "dup")
    kt.preserve(s, series_kernel.dup(memfd), TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    series_kernel.close(s)
    s = kt.create_session(luo, "reopen")
    kt.preserve(s, series_kernel.open(f"/proc/self/fd/{memfd}"), TOK_MEMFD)
    with pytest.raises(errors.NotFound):
        kt.preserve(s, iommufd, TOK_IOMMUFD)


def test_iommufd_without_marks_is_preservable(series_kernel, kt):
    iommufd = kt.iommufd()
    ioas = kt.ioas(iommufd)
    kt.map_va(iommufd, ioas, page())
    kt.preserve(kt.create_session(kt.luo(), "a"), iommufd, TOK_IOMMUFD)
    kt.unmap(iommufd, ioas, 0, U64_MAX)


# -- cdev PRESERVE_FD ---------------------------------------------------------------------------
def test_unattached_cdev_is_preserved_without_iommu_state(series_kernel, kt):
    kt.vfio_pci()
    cdev = kt.cdev()
    kt.preserve(kt.create_session(kt.luo(), "a"), cdev, TOK_CDEV)


def test_unmarked_attached_hwpt_is_einval(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup(mark_token=None)
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, cdev, TOK_CDEV)


def test_mark_after_iommufd_preserve_is_einval(series_kernel, kt):
    """Hazard H1: the domain was never preserved (S1:1027-1028)."""
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup(mark_token=None)
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, memfd, TOK_MEMFD)
    kt.preserve(s, iommufd, TOK_IOMMUFD)
    kt.mark(iommufd, hwpt, TOK_HWPT)
    with pytest.raises(errors.InvalidArgument):
        kt.preserve(s, cdev, TOK_CDEV)


def test_pasid_attachments(kt):
    for abi, expect in (("lu-v1", None), ("lu-v2", errors.NotSupported)):
        with FakeKernel(lu_abi=abi, devices=[FakePciDevice(max_pasids=1 << 8)]) as k, use(k):
            t = type(kt)(k)
            iommufd, memfd, cdev, ioas, hwpt, devid = t.device_setup(mark_token=None)
            k.close(cdev)
            cdev = t.cdev()
            devid = t.bind(cdev, iommufd)
            phwpt = t.hwpt(iommufd, devid, ioas, flags=8)
            t.attach(cdev, phwpt)
            t.attach(cdev, phwpt, pasid=3)
            t.mark(iommufd, phwpt, TOK_HWPT)
            s = t.create_session(t.luo(), "a")
            t.preserve(s, memfd, TOK_MEMFD)
            t.preserve(s, iommufd, TOK_IOMMUFD)
            if expect is None:
                t.preserve(s, cdev, TOK_CDEV)           # v1 silently drops the PASID
            else:
                with pytest.raises(expect):
                    t.preserve(s, cdev, TOK_CDEV)


def test_intel_display_device_is_einval(kt):
    igd = FakePciDevice(bdf="0000:00:02.0", vendor=0x8086, device=0x46a6, driver="i915",
                        class_code=0x030000, iommu_group=1)
    with FakeKernel(lu_abi="lu-v2", devices=[igd]) as k, use(k):
        t = type(kt)(k)
        t.vfio_pci(igd.bdf)
        with pytest.raises(errors.InvalidArgument):
            t.preserve(t.create_session(t.luo(), "a"), t.cdev(), TOK_CDEV)


# -- freeze -------------------------------------------------------------------------------------
def test_enabled_irqs_fail_the_kexec(series_kernel, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    s = kt.create_session(kt.luo(), "a")
    for fd, token in ((memfd, TOK_MEMFD), (iommufd, TOK_IOMMUFD), (cdev, TOK_CDEV)):
        kt.preserve(s, fd, token)
    efd = series_kernel.eventfd()
    arg = ioctl.new(kt.D.SET_IRQS, extra=4, index=2, flags=4 | 32, start=0, count=1)
    ioctl.buffer_of(arg)[20:24] = efd.to_bytes(4, "little")
    ioctl.invoke(series_kernel, cdev, kt.D.SET_IRQS, arg)
    with pytest.raises(OSError) as exc:
        series_kernel.kexec()
    assert exc.value.errno == errno.EINVAL
    assert series_kernel.boot_count == 1
    kt.map_file(iommufd, kt.ioas(iommufd), kt.memfd())      # still the same boot, still working
    ioctl.call(series_kernel, cdev, kt.D.SET_IRQS, index=2, flags=1 | 32, count=0)
    series_kernel.kexec()
    assert series_kernel.boot_count == 2


# -- after kexec (seed-spec 3.4, 4.7) -------------------------------------------------------------
def stage1(k, kt):
    iommufd, memfd, cdev, ioas, hwpt, devid = kt.device_setup()
    k.pwrite(memfd, b"dma buffer", 0)
    s = kt.create_session(kt.luo(), "iommufd-test")
    for fd, token in ((memfd, TOK_MEMFD), (iommufd, TOK_IOMMUFD), (cdev, TOK_CDEV)):
        kt.preserve(s, fd, token)
    kernel = k.open(f"/boot/vmlinuz-{k.kernel_release()}", os.O_RDONLY)
    k.kexec_file_load(kernel, -1, k.files.read_text("/proc/cmdline").strip(), 0x4)
    with pytest.raises(SimulatedKexec):
        k.reboot(LINUX_REBOOT_CMD_KEXEC)


def test_selftest_stage2(series_kernel, kt):
    k = series_kernel
    stage1(k, kt)
    bdf = "0000:00:03.0"
    # the preserved device's boot driver could not bind (DMA owned by the token)
    assert not k.files.exists(f"/sys/bus/pci/devices/{bdf}/driver")
    k.files.write_text(f"/sys/bus/pci/devices/{bdf}/driver_override", "pci-pf-stub")
    assert errno_of(k.files.write_text, "/sys/bus/pci/drivers/pci-pf-stub/bind", bdf) == errno.EBUSY
    assert errno_of(k.files.write_text, "/sys/bus/pci/drivers/virtio-pci/bind", bdf) == errno.ENODEV
    k.files.write_text(f"/sys/bus/pci/devices/{bdf}/driver_override", "vfio-pci")
    k.files.write_text("/sys/bus/pci/drivers/vfio-pci/bind", bdf)

    luo = kt.luo()
    s = kt.retrieve_session(luo, "iommufd-test")
    cdev = kt.retrieve(s, TOK_CDEV)
    assert k.files.readlink(f"/proc/self/fd/{cdev}") == "anon_inode:[vfio-device-liveupdate]"
    with pytest.raises(errors.InvalidArgument):         # a fresh, unbound cdev file
        ioctl.call(k, cdev, kt.D.GET_INFO)
    for _ in range(2):                                  # sticky
        with pytest.raises(errors.NotSupported):
            kt.retrieve(s, TOK_IOMMUFD)
    iommufd = kt.iommufd()
    with pytest.raises(errors.PermissionDenied):
        kt.bind(cdev, iommufd)
    with pytest.raises(errors.PermissionDenied):        # any open of the device
        kt.bind(kt.cdev(), kt.iommufd())
    with pytest.raises(errors.Busy):
        kt.finish(s)
    assert k.pread(kt.retrieve(s, TOK_MEMFD), 10, 0) == b"dma buffer"
    k.close(s)                                          # finish fails: LUO keeps the session
    with pytest.raises(errors.InvalidArgument):
        kt.retrieve_session(luo, "iommufd-test")


def test_cdev_retrieve_before_vfio_pci_is_sticky_enodev(series_kernel, kt):
    stage1(series_kernel, kt)
    s = kt.retrieve_session(kt.luo(), "iommufd-test")
    with pytest.raises(errors.NoDevice):
        kt.retrieve(s, TOK_CDEV)
    kt.vfio_pci()
    with pytest.raises(errors.NoDevice):
        kt.retrieve(s, TOK_CDEV)


def test_device_preserved_without_iommu_state_is_free_after_kexec(series_kernel, kt):
    kt.vfio_pci()
    cdev = kt.cdev()
    s = kt.create_session(kt.luo(), "a")
    kt.preserve(s, cdev, TOK_CDEV)
    series_kernel.kexec()
    assert series_kernel.files.readlink("/sys/bus/pci/devices/0000:00:03.0/driver").endswith("virtio-pci")
    kt.vfio_pci()
    s = kt.retrieve_session(kt.luo(), "a")
    cdev = kt.retrieve(s, TOK_CDEV)
    kt.bind(cdev, kt.iommufd())
    kt.finish(s)


def test_kexec_into_a_kernel_without_the_handlers_is_eio(series_kernel, kt):
    iommufd = kt.iommufd()
    kt.preserve(kt.create_session(kt.luo(), "a"), iommufd, TOK_IOMMUFD)
    series_kernel.kexec(lu_abi=None)
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            kt.luo()
        assert exc.value.errno == errno.EIO
