"""What the VM lab's disk image adds to the shared rootfs (data only; its bytes are the cache key)."""

# trixie's own kernel: it has CONFIG_MEM_SOFT_DIRTY (our machines' does not), so
# CRIU's pre-dump works inside these VMs.
KERNEL_PACKAGES = ["linux-image-amd64"]

# Loaded by the VM's tiny initrd (with their dependencies, read from modules.dep)
# before it can mount the root disk; the rest load later from the root itself.
# crc32c_generic is ext4's soft dependency (through the crypto API), which
# modules.dep does not list: without it ext4 refuses to mount.
INITRD_MODULES = ["virtio_blk", "crc32c_generic", "ext4"]

IMAGE_SIZE = "4G"   # sparse: about the rootfs's size is allocated
