"""What the benchmarks share: a VM config for a test guest, a run through `splitvmm up`, and
the vCPUs' TSC rate."""

from __future__ import annotations

import compileall
import functools
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


@functools.cache
def host_tsc_khz() -> int:
    """The vCPUs' TSC rate: KVM's default, which neither VMM changes (no TSC scaling here).
    A guest's ticks become seconds with it, not with the rate the guest measures against the
    PIT, which a vCPU preempted in that window leaves too high (bench/blk.py)."""
    from splitvmm.native.kvm import Kvm

    with Kvm() as kvm:
        return kvm.default_tsc_khz()


def compile_package() -> None:
    """Byte-code for every splitvmm module, as an installed package has it: a bench that
    times a start must not time the compiler (an edited module's .pyc is stale, and where
    PYTHONDONTWRITEBYTECODE is set nothing rewrites it: ~60-80 ms of the monitor's start).
    scripts/bootstrap.sh does the same once; this is for a tree edited since."""
    spec = importlib.util.find_spec("splitvmm")  # the one `python -m splitvmm` runs
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("splitvmm is not installed here: run scripts/bootstrap.sh")
    package = spec.submodule_search_locations[0]
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"could not compile {package}")


def write_config(
    path: Path, name: str, boot: str, memory: str, serial: Path | None, vm_extra: str = ""
) -> Path:
    """A one-serial-device VM config whose guest output goes to `serial` (None: stdout);
    snapshots may be written next to it. vm_extra: more [vm] lines."""
    output = "stdio" if serial is None else serial
    path.write_text(
        f'[vm]\nname = "{name}"\nmemory = "{memory}"\nsnapshot_dirs = ["."]\n{vm_extra}'
        f"[boot]\n{boot}\n"
        f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{output}"\n'
    )
    return path


def run_to_end(argv: list[str], serial: Path | None, status: int, timeout: float, who: str) -> str:
    """Run a VMM to its end; the guest's serial output (from the file `serial`, or from its
    stdout, a pipe, when None), or SystemExit naming `who` if it ended with another status."""
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if serial is None:
        text = proc.stdout
    else:
        text = serial.read_text() if serial.exists() else ""
    if proc.returncode != status:
        raise SystemExit(f"{who}: status {proc.returncode}, want {status}:\n{proc.stderr}{text}")
    return text


def run_guest(config: Path, serial: Path | None, status: int, timeout: float = 600) -> str:
    """`splitvmm up CONFIG` to its end (see run_to_end)."""
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    return run_to_end(argv, serial, status, timeout, "splitvmm")


def qemu_firmware_argv(qemu: str, image: Path, serial: Path | None) -> list[str]:
    """QEMU running a firmware test guest as its BIOS, COM1 to `serial` (None: stdout), with
    the debug-exit port the guests end through."""
    argv = [qemu, "-accel", "kvm", "-bios", str(image), "-m", "64", "-display", "none"]
    chardev = "stdio" if serial is None else f"file:{serial}"
    argv += ["-nodefaults", "-serial", chardev, "-no-reboot"]
    return argv + ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]


def wait_for_text(
    path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float, who: str = "VM"
) -> None:
    """Until `needle` shows in the file at `path` (a guest's serial output); SystemExit naming
    `who` if its process `proc` ends first (with its stderr, if piped) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            raise SystemExit(f"{who} ended (status {proc.returncode}) before {needle!r}: {err}")
        time.sleep(0.02)
    raise SystemExit(f"{who}: no {needle!r} within {timeout:g} s")
