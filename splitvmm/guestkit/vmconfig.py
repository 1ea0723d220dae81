"""The splitvmm VM config (TOML) that boots the kit."""

from __future__ import annotations

from pathlib import Path

SERIAL_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200"
# reboot=k: a reset goes through the i8042 (port 0x64), which the monitor sees; panic=-1:
# a panic resets at once instead of hanging the VM.
EXIT_CMDLINE = "reboot=k panic=-1"
# Only needed where KVM is PVM (shared/KVM-HERE.md): the guest sees host CPUID bits that the
# instruction emulator cannot run. Harmless, if slower, on hardware KVM.
PVM_CMDLINE = (
    "clearcpuid=cx16,xsave,popcnt,rdrand,rdseed,fsgsbase,smap,pcid,invpcid,avx,avx2,rdpid"
    " noxsave nofsgsbase nopcid noinvpcid"
)
KERNEL_CMDLINE = f"{SERIAL_CMDLINE} {EXIT_CMDLINE} {PVM_CMDLINE}"


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


DISK_SERIAL = "splitvmm-demo"  # what the guest reads as /sys/block/vda/serial
# The config's first line: how a build tells its own debian.toml from a user's.
CONFIG_HEADER = "# The splitvmm demo guest, written by `splitvmm guest build`."


def render_vm_config(kernel: Path, initrd: Path, disk: Path, cmdline: str = KERNEL_CMDLINE) -> str:
    """The config text; a relative `kernel`, `initrd` or `disk` is taken from the config's own
    directory by `splitvmm up` (config.py), whatever the working directory."""
    return f"""{CONFIG_HEADER}
# Boot it with `splitvmm up` and the path of this file.
# Add splitvmm.shell to the command line for a busybox shell on the serial console.
[vm]
name = "debian"
memory = "512M"
vcpus = 1

[boot]
kernel = {toml_string(str(kernel))}
initrd = {toml_string(str(initrd))}
cmdline = {toml_string(cmdline)}

[[device]]
name = "serial0"
model = "serial"
output = "stdio"

[[device]]
name = "disk0"
model = "virtio-blk"
path = {toml_string(str(disk))}
serial = "{DISK_SERIAL}"

[[device]]
name = "rng0"
model = "virtio-rng"
"""
