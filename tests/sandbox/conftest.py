"""Sandbox tests: real device processes, no VM and no /dev/kvm; they need user namespaces
and libseccomp, and skip with the reason where the kernel refuses namespaces."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.harness import SandboxedDevice
from tests.virtio import standins

PROBE = (
    "from splitvmm.native import confine; "
    "confine.unshare(confine.CLONE_NEWUSER | confine.CLONE_NEWNS | confine.CLONE_NEWPID)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox: spawns sandboxed device processes (no KVM)")


@functools.cache
def namespaces_unusable_reason() -> str | None:
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this kernel refuses user/mount/PID namespaces: {probe.stderr.strip()[-200:]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "sandbox" in item.keywords and namespaces_unusable_reason():
            item.add_marker(pytest.mark.skip(reason=namespaces_unusable_reason() or ""))
        elif _virtio(item) and standins.missing():
            # A device process imports the real modules: the tests' stand-ins cannot help it.
            reason = f"a virtio device process needs {', '.join(standins.missing())} (not merged)"
            item.add_marker(pytest.mark.skip(reason=reason))


def _virtio(item: pytest.Item) -> bool:
    params = getattr(item, "callspec", None)
    return "sandbox" in item.keywords and str(
        getattr(params, "params", {}).get("model", "")
    ).startswith("virtio")


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
