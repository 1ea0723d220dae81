"""Sandbox tests: real device processes, no VM and no /dev/kvm; they need user namespaces
and libseccomp, and skip with the reason where the kernel refuses namespaces."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.harness import SandboxedDevice

# The kernel asked directly (util-linux's unshare), not through splitvmm's own wrapper: a
# regression there must fail the sandbox tests, not skip them (tests/conftest.py).
PROBE = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "true"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox: spawns sandboxed device processes (no KVM)")


@functools.cache
def namespaces_unusable_reason() -> str | None:
    try:
        probe = subprocess.run(PROBE, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "no unshare(1) (util-linux) to ask the kernel for namespaces"
    if probe.returncode != 0:
        return f"this kernel refuses user/mount/PID namespaces: {probe.stderr.strip()[-200:]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "sandbox" in item.keywords and namespaces_unusable_reason():
            item.add_marker(pytest.mark.skip(reason=namespaces_unusable_reason() or ""))


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    """The private runtime directory a monitor would make (mode 0700)."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def spawn(rundir: Path) -> Iterator[Callable[..., SandboxedDevice]]:
    """spawn(**kwargs) -> SandboxedDevice, closed (killed) at the end of the test."""
    made: list[SandboxedDevice] = []

    def factory(**kwargs: Any) -> SandboxedDevice:
        dev = SandboxedDevice(rundir, **kwargs)
        made.append(dev)
        return dev

    yield factory
    for dev in made:
        dev.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A sacrificial process standing in for the monitor in kill/ptrace attempts."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()
