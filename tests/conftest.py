"""Shared fixtures: the `kvm` marker skips with a reason where /dev/kvm cannot make a VM."""

from __future__ import annotations

import functools
import os

import pytest

from tests.virtio import standins

standins.install()  # guestram/queue stand-ins while those modules are on another branch


@functools.cache
def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        from splitvmm.native.kvm import Kvm

        with Kvm() as kvm:
            kvm.create_vm().close()
    except Exception as e:  # any failure to make a VM is the skip reason, stated
        return f"/dev/kvm cannot create a VM: {e}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in item.keywords or "boot" in item.keywords:
            reason = kvm_unusable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
