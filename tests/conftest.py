"""Shared fixtures: the `kvm` marker skips with a reason where /dev/kvm cannot make a VM.

The probe asks the kernel directly (two ioctls), not through splitvmm: a regression in the
native layer must fail the tests, not turn them into a green skip. And CI sets
SPLITVMM_NO_SKIPS=1 (.ci/run): its hosts have /dev/kvm, namespaces and /dev/net/tun, so any
skip there is a failure that names its reason."""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Iterator

import pytest

NO_SKIPS = "SPLITVMM_NO_SKIPS"
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_API_VERSION = 0xAE00, 0xAE01, 12  # <linux/kvm.h>


@functools.cache
def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        try:
            version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                return f"/dev/kvm speaks KVM API {version}, not {KVM_API_VERSION}"
            os.close(fcntl.ioctl(kvm, KVM_CREATE_VM, 0))
        finally:
            os.close(kvm)
    except OSError as e:  # any failure to make a VM is the skip reason, stated
        return f"/dev/kvm cannot create a VM: {e}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords or "boot" in item.keywords:
            reason = kvm_unusable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped (pytest.skip at module level, importorskip) fails too."""
    if os.environ.get(NO_SKIPS) == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, where {NO_SKIPS}=1 wants every test run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under SPLITVMM_NO_SKIPS a skipped test is a failed one, with the skip's reason."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get(NO_SKIPS) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, where {NO_SKIPS}=1 wants every test run: {reason}"
