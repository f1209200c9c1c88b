"""The fake kernel's /sys, /proc and /dev, and the fake host's tree under them (/boot, what a test puts)."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest

from pyiommufd_testing import FakeKernel, FakePciDevice

BDF = "0000:00:03.0"
DEV = f"/sys/bus/pci/devices/{BDF}"


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_pci_device_attributes(fake_kernel):
    k = fake_kernel
    assert k.files.listdir("/sys/bus/pci/devices") == [BDF]
    assert k.files.read_text(DEV + "/vendor") == "0x1af4\n"
    assert k.files.read_text(DEV + "/device") == "0x1041\n"
    assert k.files.read_text(DEV + "/class") == "0x020000\n"
    assert k.files.read_text(DEV + "/driver_override") == "(null)\n"
    assert k.files.read_bytes(DEV + "/config")[:4] == bytes.fromhex("f41a4110")
    assert k.files.readlink(DEV) == f"../../../devices/pci0000:00/{BDF}"
    assert k.files.realpath(DEV) == f"/sys/devices/pci0000:00/{BDF}"
    assert k.files.realpath(DEV + "/driver") == "/sys/bus/pci/drivers/virtio-pci"
    assert k.files.readlink(DEV + "/iommu_group") == "../../../kernel/iommu_groups/3"
    assert k.files.listdir("/sys/kernel/iommu_groups/3/devices") == [BDF]
    assert k.files.realpath("/sys/kernel/iommu_groups/3/devices/" + BDF) == f"/sys/devices/pci0000:00/{BDF}"
    assert "vfio-dev" not in k.files.listdir(DEV)


def test_missing_and_misused_paths(fake_kernel):
    k = fake_kernel
    assert not k.files.exists("/sys/bus/pci/devices/0000:00:09.0")
    assert err(k.files.read_text, "/sys/bus/pci/devices/0000:00:09.0/vendor") == errno.ENOENT
    assert err(k.files.read_text, DEV) == errno.EISDIR
    assert err(k.files.write_text, DEV + "/vendor", "0x1") == errno.EACCES
    assert err(k.files.listdir, DEV + "/vendor") == errno.ENOTDIR
    assert err(k.files.readlink, DEV + "/vendor") == errno.EINVAL
    assert err(k.files.read_text, "/sys/bus/pci/drivers/vfio-pci/bind") == errno.EACCES


def test_vfio_pci_via_driver_override_and_drivers_probe(fake_kernel):
    k = fake_kernel
    k.files.write_text("/sys/bus/pci/drivers/virtio-pci/unbind", BDF)
    assert not k.files.exists(DEV + "/driver")
    assert err(k.files.write_text, "/sys/bus/pci/drivers/virtio-pci/unbind", BDF) == errno.ENODEV
    k.files.write_text(DEV + "/driver_override", "vfio-pci\n")
    assert k.files.read_text(DEV + "/driver_override") == "vfio-pci\n"
    k.files.write_text("/sys/bus/pci/drivers_probe", BDF + "\n")
    assert k.files.realpath(DEV + "/driver") == "/sys/bus/pci/drivers/vfio-pci"
    assert k.files.listdir(DEV + "/vfio-dev") == ["vfio0"]
    assert k.files.exists("/dev/vfio/devices/vfio0")
    assert k.files.realpath("/sys/class/vfio-dev/vfio0/device") == f"/sys/devices/pci0000:00/{BDF}"
    assert BDF in k.files.listdir("/sys/bus/pci/drivers/vfio-pci")
    k.files.write_text(DEV + "/driver_override", "\n")
    assert k.files.read_text(DEV + "/driver_override") == "(null)\n"


def test_bind_rules(fake_kernel):
    k = fake_kernel
    assert err(k.files.write_text, "/sys/bus/pci/drivers/vfio-pci/bind", BDF) == errno.ENODEV    # no match
    assert err(k.files.write_text, "/sys/bus/pci/drivers/virtio-pci/bind", BDF) == errno.EBUSY   # has a driver
    assert err(k.files.write_text, "/sys/bus/pci/drivers_probe", "0000:00:09.0") == errno.ENODEV
    k.files.write_text("/sys/bus/pci/drivers/virtio-pci/unbind", BDF)
    k.files.write_text("/sys/bus/pci/drivers/virtio-pci/bind", BDF)


def test_new_id_binds_matching_unbound_devices(fake_kernel):
    k = fake_kernel
    k.files.write_text("/sys/bus/pci/drivers/virtio-pci/unbind", BDF)
    k.files.write_text("/sys/bus/pci/drivers/vfio-pci/new_id", "1af4 1041")
    assert k.files.realpath(DEV + "/driver") == "/sys/bus/pci/drivers/vfio-pci"
    assert err(k.files.write_text, "/sys/bus/pci/drivers/vfio-pci/new_id", "1af4 1041") == errno.EEXIST


def test_kernel_driver_cannot_bind_while_iommufd_owns_the_group(kt):
    devices = [FakePciDevice(bdf=BDF, iommu_group=3),
               FakePciDevice(bdf="0000:00:04.0", iommu_group=3)]
    with FakeKernel(devices=devices) as k:
        from pyiommufd.backend import use
        with use(k):
            t = type(kt)(k)
            t.vfio_pci(BDF)
            k.files.write_text("/sys/bus/pci/drivers/virtio-pci/unbind", "0000:00:04.0")
            t.bind(t.cdev(), t.iommufd())
            assert err(k.files.write_text, "/sys/bus/pci/drivers/virtio-pci/bind", "0000:00:04.0") == errno.EBUSY


def test_non_root_cannot_write_sysfs():
    with FakeKernel(euid=1000) as k:
        assert err(k.files.write_text, DEV + "/driver_override", "vfio-pci") == errno.EACCES
        assert len(k.files.read_bytes(DEV + "/config")) == 64
        assert err(k.open, "/dev/iommu") == errno.EACCES


def test_proc(fake_kernel, kt):
    k = fake_kernel
    assert "intel_iommu=on" in k.files.read_text("/proc/cmdline")
    assert k.files.read_text("/proc/sys/kernel/osrelease") == "7.3.4\n"
    luo = kt.luo()
    assert k.files.readlink(f"/proc/self/fd/{luo}") == "/dev/liveupdate"
    pid = str(os.getpid())
    assert pid in k.files.listdir("/proc")
    assert str(luo) in k.files.listdir(f"/proc/{pid}/fd")
    assert k.files.readlink(f"/proc/{pid}/fd/{luo}") == "/dev/liveupdate"
    mfd = kt.memfd(name="buffer")
    assert k.files.readlink(f"/proc/self/fd/{mfd}") == "/memfd:buffer (deleted)"
    assert k.files.exists(f"/proc/self/fd/{mfd}")


def test_boot_config(kt):
    with FakeKernel() as k:
        config = k.files.read_text("/boot/config-7.3.4")
        for option in ("CONFIG_IOMMUFD=y", "CONFIG_LIVEUPDATE=y", "CONFIG_KEXEC_HANDOVER=y",
                       "CONFIG_VFIO_DEVICE_CDEV=y"):
            assert option in config.splitlines()
        assert "IOMMU_LIVEUPDATE" not in config
        assert k.files.exists("/boot/vmlinuz-7.3.4")
    with FakeKernel(lu_abi="lu-v1", release="7.3.4-lu") as k:
        assert "CONFIG_IOMMU_LIVEUPDATE=y" in k.files.read_text("/boot/config-7.3.4-lu").splitlines()
        assert k.kernel_release() == "7.3.4-lu"


def test_boot_is_real_files_of_the_fake_hosts_tree():
    """/boot is the disk's, not the kernel's: real files, which a kexec adds
    to (the new release's) and rewrites (the config of what the kernel now carries)."""
    with FakeKernel(lu_abi="lu-v2") as k:
        boot = os.path.join(k.files.root, "boot")
        assert sorted(os.listdir(boot)) == ["config-7.3.4", "initrd.img-7.3.4", "vmlinuz-7.3.4"]
        assert k.files.listdir("/boot") == sorted(os.listdir(boot))
        with open(os.path.join(boot, "config-7.3.4")) as f:
            assert "CONFIG_IOMMU_LIVEUPDATE=y" in f.read().splitlines()
        k.kexec(lu_abi=None)
        assert "IOMMU_LIVEUPDATE" not in k.files.read_text("/boot/config-7.3.4")
        k.kexec(release="7.3.5")
        assert k.files.listdir("/boot") == ["config-7.3.4", "config-7.3.5", "initrd.img-7.3.4",
                                            "initrd.img-7.3.5", "vmlinuz-7.3.4", "vmlinuz-7.3.5"]


def test_dmar_unit(fake_kernel):
    k = fake_kernel
    assert k.files.listdir("/sys/class/iommu") == ["dmar0"]
    assert int(k.files.read_text("/sys/class/iommu/dmar0/intel-iommu/cap"), 16) != 0
    assert k.files.realpath(DEV + "/iommu") == "/sys/devices/virtual/iommu/dmar0"


def test_dev_tree(fake_kernel, kt):
    k = fake_kernel
    assert k.files.listdir("/dev") == ["iommu", "liveupdate", "vfio"]
    assert k.files.listdir("/dev/vfio/devices") == []
    assert err(k.files.read_text, "/dev/iommu") == errno.EINVAL


def test_the_hosts_files_are_invisible_to_the_fake(fake_kernel, tmp_path):
    """Outside /sys, /proc and /dev the fake serves a tree of its own: a real
    file of the host is not there, for host files or open(2), until a test puts one."""
    host = tmp_path / "x"
    host.write_text("real")
    files = fake_kernel.files
    assert os.path.exists("/etc/os-release")
    for path in ("/etc/os-release", str(host)):
        assert not files.exists(path)
        assert err(files.read_text, path) == errno.ENOENT
        assert err(fake_kernel.open, path, os.O_RDONLY) == errno.ENOENT
    assert err(files.listdir, str(tmp_path)) == errno.ENOENT
    files.put("/etc/os-release", "ID=fake\n")
    assert files.read_text("/etc/os-release") == "ID=fake\n"
    assert files.listdir("/etc") == ["os-release"]
    assert files.is_dir("/etc") and not files.is_dir("/etc/os-release") and not files.is_dir("/none")
    assert files.is_dir("/sys/bus/pci/devices") and not files.is_dir("/proc/cmdline")
    assert files.realpath("/etc/../etc/os-release") == "/etc/os-release"
    assert open("/etc/os-release").read() != "ID=fake\n"          # the host's is untouched
    assert err(files.write_text, "/etc/os-release", "no") == errno.EROFS
    with pytest.raises(ValueError):
        files.put("/sys/bus/pci/drivers_probe", "0000:00:03.0")


def test_the_fakes_tree_goes_away_with_it(tmp_path):
    import gc

    k = FakeKernel()
    k.files.put("/var/lib/x", "1")
    root = k.files.root
    assert os.path.isdir(root)
    del k
    gc.collect()
    assert not os.path.exists(root)


def test_the_fakes_tree_goes_away_when_it_shuts_down():
    k = FakeKernel()
    k.files.put("/etc/x", "1")
    root = k.files.root
    k.shutdown()
    assert not os.path.exists(root)
    assert not k.files.exists("/etc/x") and not k.files.exists("/boot/vmlinuz-7.3.4")
    assert k.files.read_text("/proc/sys/kernel/osrelease") == "7.3.4\n"    # the kernel's still answer
    with pytest.raises(RuntimeError, match="shut down"):
        k.files.put("/etc/x", "1")


def test_a_forked_child_leaves_the_fakes_tree_alone(tmp_path):
    """A child that exits normally runs its copy of the tree's finalizer."""
    script = textwrap.dedent("""\
        import os, sys
        from pyiommufd_testing import FakeKernel
        k = FakeKernel()
        root = k.files.root
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        os.waitpid(pid, 0)
        print(os.path.isdir(root))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "True\n"


def test_open_of_a_path_outside_the_kernels_is_the_trees_file(fake_kernel):
    """open(2) sees the host files' tree (a kernel image for kexec_file_load
    comes from there), read-only; /proc/self/fd shows the fake host's path."""
    fake_kernel.files.put("/srv/bzImage", b"MZ")
    fd = fake_kernel.open("/srv/bzImage", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert os.read(fd, 2) == b"MZ"
        assert fake_kernel.files.readlink(f"/proc/self/fd/{fd}") == "/srv/bzImage"
    finally:
        os.close(fd)
    assert err(fake_kernel.open, "/srv/bzImage", os.O_RDWR) == errno.EROFS
    assert err(fake_kernel.open, "/srv/none", os.O_RDONLY) == errno.ENOENT
