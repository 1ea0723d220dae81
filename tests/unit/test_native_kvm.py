"""native/kvm.py's ioctls without /dev/kvm: what an ioctl interrupted by a signal does
(tests/integration/test_native_kvm.py runs the real ones)."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from splitvmm.errors import KvmError
from splitvmm.native import kvm


def failing(errnos: list[int], result: int = 7) -> tuple[Callable[[], int], list[int]]:
    """An ioctl that fails with each of `errnos` in turn, then returns `result`; and the
    list its calls go to."""
    calls: list[int] = []

    def call() -> int:
        calls.append(len(calls))
        if len(calls) <= len(errnos):
            kvm.ffi.errno = errnos[len(calls) - 1]
            return -1
        return result

    return call, calls


def test_kvm_ioctl_interrupted_by_a_signal_is_made_again():
    """A stop signal's handler runs, and the build goes on to look at its flag: a SIGTERM
    during KVM_CREATE_VM ended `up` with status 1 and "Interrupted system call"."""
    call, calls = failing([errno.EINTR, errno.EINTR])

    assert (kvm._retried(call, "KVM_CREATE_VM"), len(calls)) == (7, 3)


def test_kvm_ioctl_failing_otherwise_raises_naming_it_at_once():
    call, calls = failing([errno.EBADF])

    with pytest.raises(KvmError, match="KVM_CREATE_VM failed") as err:
        kvm._retried(call, "KVM_CREATE_VM")
    assert (err.value.errno, len(calls)) == (errno.EBADF, 1)
