"""What the benchmarks share: a VM config for a test guest, and a run through `splitvmm up`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def write_config(path: Path, name: str, boot: str, memory: str, serial: Path) -> Path:
    """A one-serial-device VM config whose guest output goes to `serial`; snapshots may be
    written next to it."""
    path.write_text(
        f'[vm]\nname = "{name}"\nmemory = "{memory}"\nsnapshot_dirs = ["."]\n[boot]\n{boot}\n'
        f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{serial}"\n'
    )
    return path


def run_to_end(argv: list[str], serial: Path, status: int, timeout: float, who: str) -> str:
    """Run a VMM to its end; the guest's serial output, or SystemExit naming `who` if it
    ended with another status."""
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    text = serial.read_text() if serial.exists() else ""
    if proc.returncode != status:
        raise SystemExit(f"{who}: status {proc.returncode}, want {status}:\n{proc.stderr}{text}")
    return text


def run_guest(config: Path, serial: Path, status: int, timeout: float = 600) -> str:
    """`splitvmm up CONFIG` to its end (see run_to_end)."""
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    return run_to_end(argv, serial, status, timeout, "splitvmm")


def qemu_firmware_argv(qemu: str, image: Path, serial: Path) -> list[str]:
    """QEMU running a firmware test guest as its BIOS, COM1 to `serial`, with the debug-exit
    port the guests end through."""
    argv = [qemu, "-accel", "kvm", "-bios", str(image), "-m", "64", "-display", "none"]
    argv += ["-nodefaults", "-serial", f"file:{serial}", "-no-reboot"]
    return argv + ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]
