"""SeccompListener: the fd type the policy auditor (cli/policy.py) reads seccomp user
notifications from, over the cffi module built by _build_sys.py."""

from __future__ import annotations

from splitvmm.native._sys import ffi, lib
from splitvmm.native.confine import check
from splitvmm.native.fd import OwnedFd
from splitvmm.record import Struct


class SyscallEvent(Struct, frozen=True):
    """One system call a filtered process made (a seccomp user notification)."""

    id: int
    tid: int
    nr: int
    args: tuple[int, ...]


class SeccompListener(OwnedFd):
    """A seccomp user-notification fd: every notified syscall waits until answered."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._notif = ffi.new("struct seccomp_notif *")
        self._resp = ffi.new("struct seccomp_notif_resp *")

    def receive(self) -> SyscallEvent:
        """Block until the next notification; OSError(ENOENT) once the process is gone."""
        ffi.memmove(self._notif, b"\0" * ffi.sizeof(self._notif[0]), ffi.sizeof(self._notif[0]))
        # SAFETY: `_notif` is owned by self and outlives the ioctl that fills it.
        check(lib.sv_ioctl_ptr(self.fd, lib.SECCOMP_IOCTL_NOTIF_RECV, self._notif), "NOTIF_RECV")
        data = self._notif.data
        return SyscallEvent(self._notif.id, self._notif.pid, data.nr, tuple(data.args))

    def allow(self, event: SyscallEvent) -> None:
        """Let the syscall run as if the filter had allowed it."""
        self._resp.id = event.id
        self._resp.val = 0
        self._resp.error = 0
        self._resp.flags = lib.SECCOMP_USER_NOTIF_FLAG_CONTINUE
        # SAFETY: `_resp` is owned by self and outlives the ioctl that reads it.
        check(lib.sv_ioctl_ptr(self.fd, lib.SECCOMP_IOCTL_NOTIF_SEND, self._resp), "NOTIF_SEND")

    def fail(self, event: SyscallEvent, errno_: int) -> None:
        """Answer the syscall with -errno_ without running it."""
        self._resp.id = event.id
        self._resp.val = 0
        self._resp.error = -errno_
        self._resp.flags = 0
        # SAFETY: as in allow().
        check(lib.sv_ioctl_ptr(self.fd, lib.SECCOMP_IOCTL_NOTIF_SEND, self._resp), "NOTIF_SEND")
