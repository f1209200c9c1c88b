from pyiommufd import kexec


def test_reuse_cmdline_drops_boot_only_words():
    text = "BOOT_IMAGE=/vmlinuz root=/dev/vda console=ttyS0 initrd=/x intel_iommu=on liveupdate=on\n"
    assert kexec.reuse_cmdline(text) == "root=/dev/vda console=ttyS0 intel_iommu=on liveupdate=on"
