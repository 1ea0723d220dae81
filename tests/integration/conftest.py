"""Fixtures for integration tests: built test guests, and running them through `splitvmm up`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitvmm.record import Struct

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.guests.build import build_guests

    return build_guests(tmp_path_factory.mktemp("guests"))


class Run(Struct):
    status: int
    serial: str  # what the guest wrote to the serial device
    stderr: str  # the monitor's messages


def vm_toml(
    boot: str,
    memory: str = "64M",
    vcpus: int = 1,
    serial_out: Path | str | None = None,
    vm_extra: str = "",
) -> str:
    """vm_extra: more [vm] lines (`rtc = false`)."""
    out = f'output = "{serial_out}"\n' if serial_out else ""
    return (
        f'[vm]\nname = "test"\nmemory = "{memory}"\nvcpus = {vcpus}\n{vm_extra}\n'
        # snapshots may go next to the config (the test's tmp_path), and nowhere else
        'snapshot_dirs = ["."]\n'
        f"[boot]\n{boot}\n"
        f'[[device]]\nname = "serial0"\nmodel = "serial"\n{out}'
    )


def run_up(
    tmp_path: Path,
    boot: str,
    memory: str = "64M",
    vcpus: int = 1,
    timeout: float = 120,
    extra_args: tuple[str, ...] = (),
    vm_extra: str = "",
    devices: str = "",
) -> Run:
    """Run `splitvmm up` on a fresh config; the serial output goes to a file we read back.
    devices: more [[device]] tables, after serial0."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(boot, memory, vcpus, serial, vm_extra) + devices)
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", *extra_args, "up", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
        env={"XDG_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"},
    )
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return Run(proc.returncode, text, proc.stderr.decode(errors="replace"))


SIGNING_KEY = b"integration-test-signing-key-32b"


class Saved(Struct, frozen=True):
    snap: Path  # a suspended counter guest, signed with `key`
    config: Path  # its config (64 MiB, serial0 to a file)
    key: Path  # the signing key file (0600)


@pytest.fixture(scope="module")
def saved(guests, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """A counter guest suspended with `ctl suspend --sign`, taken once per module."""
    from tests.integration.vmproc import VmProcess

    tmp = tmp_path_factory.mktemp("saved")
    serial, config, key = tmp / "serial.log", tmp / "vm.toml", tmp / "key"
    key.write_bytes(SIGNING_KEY)
    key.chmod(0o600)
    config.write_text(
        vm_toml(f'kernel = "{guests["counter"]}"\ncmdline = "period=1000000"', serial_out=serial)
    )
    vm = VmProcess(tmp, ["up", str(config)], serial)
    vm.wait_for(r"^count=\d+$")
    assert vm.ctl("suspend", str(tmp / "snap"), "--sign", str(key)).returncode == 0
    assert vm.finish()[0] == 0
    return Saved(tmp / "snap", config, key)
