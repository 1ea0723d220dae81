"""What goes into the demo initramfs: busybox and its applet links, device nodes, the virtio
modules, and an /init script that loads them, reports, and stops the VM."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from splitvmm.guestkit.initramfs import (
    CpioEntry,
    char_device,
    directory,
    regular_file,
    symlink,
)
from splitvmm.record import Struct

# The drivers for splitvmm's devices (virtio 1.x over PCI), by module name; load_order adds
# whatever they depend on.
VIRTIO_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_blk",
    "virtio_net",
    "net_failover",
    "failover",
    "virtio_console",
    "virtio_rng",  # file name virtio-rng.ko, under drivers/char/hw_random
)

# Applets linked in /bin. /init uses the first group; the rest make the rescue shell usable.
INIT_APPLETS = (
    "sh", "[", "mount", "echo", "uname", "insmod", "cat", "setsid", "cttyhack", "poweroff",
    "reboot", "head",
)  # fmt: skip
SHELL_APPLETS = (
    "ash", "ls", "umount", "mkdir", "mknod", "rm", "cp", "mv", "ln", "chmod", "dmesg", "halt",
    "lsmod", "rmmod", "modprobe", "ps", "kill", "sleep", "grep", "tail", "dd",
    "hexdump", "free", "df", "sync", "ip", "ifconfig", "mdev", "stty", "vi", "true", "false",
    "test",
)  # fmt: skip
APPLETS = INIT_APPLETS + SHELL_APPLETS

# Linux Documentation/admin-guide/devices.txt: the kernel opens /dev/console for init's
# stdin/stdout/stderr *before* init can mount devtmpfs, so the node must be in the archive or
# nothing init prints reaches the serial console.
DEV_CONSOLE = (5, 1)
DEV_NULL = (1, 3)

MARKER = "splitvmm demo guest"
SHELL_FLAG = "splitvmm.shell"


class Module(Struct, frozen=True):
    """A module to put in the initramfs: its path under /lib/modules/<ver> and its bytes."""

    path: str
    data: bytes


def render_init(kernel_version: str, module_paths: Sequence[str]) -> str:
    """The /init script. `module_paths` are relative to /lib/modules/<ver>, in load order."""
    moddir = f"/lib/modules/{kernel_version}"
    modules = "".join(f"    {moddir}/{path} \\\n" for path in module_paths)
    return f"""#!/bin/sh
# /init of the splitvmm demo guest, written by `splitvmm guest build`.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The marker comes before the drivers load, so a guest that hangs while probing a
# device can still be told apart from one that never reached userspace.
echo "{MARKER}: init running"
uname -a
# Dependencies first (the order comes from the modules' own depends= at kit build time).
loaded=0
for m in \\
{modules}    ; do
    if insmod "$m"; then loaded=$((loaded + 1)); else echo "{MARKER}: insmod $m failed"; fi
done
echo "{MARKER}: $loaded of {len(module_paths)} modules loaded"
echo "{MARKER}: block devices:"
cat /proc/partitions
# At most its first sector: a disk the guest zeroed or filled has no newline, and all of
# it would go to the serial console.
[ -b /dev/vda ] && head -c 512 /dev/vda | head -n1
case " $(cat /proc/cmdline) " in
*" {SHELL_FLAG} "*)
    echo "{MARKER}: shell (exit it to power off)"
    setsid cttyhack sh
    ;;
esac
echo "{MARKER}: powering off"
# Without ACPI (splitvmm, Firecracker) Linux turns a power-off into a halt and the VM would
# sit there forever; a reboot with reboot=k writes 0xfe to the i8042 (port 0x64), which the
# monitor sees and ends the VM on.
[ -d /sys/firmware/acpi ] && poweroff -f
reboot -f
"""


def _skeleton() -> Iterator[CpioEntry]:
    for name in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        yield directory(name)
    yield char_device("dev/console", *DEV_CONSOLE)
    yield char_device("dev/null", *DEV_NULL, perm=0o666)


def _parents(path: str) -> Iterator[str]:
    """lib/modules/v/kernel/a/b.ko -> lib/modules/v, lib/modules/v/kernel, ..., .../a."""
    parts = path.split("/")[:-1]
    for end in range(3, len(parts) + 1):  # lib/ and lib/modules/ come from the skeleton
        yield "/".join(parts[:end])


def _module_entries(kernel_version: str, modules: Iterable[Module]) -> Iterator[CpioEntry]:
    made: set[str] = set()
    for module in modules:
        path = f"lib/modules/{kernel_version}/{module.path}"
        for parent in _parents(path):
            if parent not in made:
                made.add(parent)
                yield directory(parent)
        yield regular_file(path, module.data)


def rootfs_entries(
    busybox: bytes, kernel_version: str, modules: Sequence[Module]
) -> list[CpioEntry]:
    """Every member of the initramfs, parents before children."""
    init = render_init(kernel_version, [m.path for m in modules])
    entries = list(_skeleton())
    entries.append(regular_file("bin/busybox", busybox, perm=0o755))
    entries.extend(symlink(f"bin/{applet}", "busybox") for applet in APPLETS)
    entries.extend(_module_entries(kernel_version, modules))
    entries.append(regular_file("init", init.encode(), perm=0o755))
    return entries
