"""prctl(2) calls a device process makes on itself, through libc (ctypes: no ioctl here)."""

import ctypes
import ctypes.util
import os

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def set_parent_death_signal(sig: int) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # The parent may have died before prctl took effect: then we were reparented.
    if os.getppid() == 1:
        os._exit(1)
