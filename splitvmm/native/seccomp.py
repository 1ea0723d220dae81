"""pyseccomp, imported with its two libraries found by the dynamic linker instead of ldconfig.

pyseccomp finds libc and libseccomp with ctypes.util.find_library, which on Linux runs
`ldconfig -p` and scans what it prints: two fork+execs and ~3.5 ms at every import, in the
monitor and in the zygote, both on the way to a VM's first device (bench/startup.py). What
that scan returns on a glibc system is the library's soname, which ctypes then dlopens. So
while pyseccomp is imported, find_library first tries the soname itself with dlopen (the
same search the dynamic linker makes for that name), and asks ldconfig only for a library
that does not load by its soname (another libc, another libseccomp ABI).

Every module takes pyseccomp from here (ruff's banned-api rule in pyproject.toml).
"""

import ctypes
import ctypes.util

# What ldconfig's cache names them on glibc: libseccomp's ABI has been .so.2 since 2012.
SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}

_ldconfig_find_library = ctypes.util.find_library


def _find_library(name: str) -> str | None:
    soname = SONAMES.get(name)
    if soname is not None:
        try:
            ctypes.CDLL(soname)
        except OSError:
            pass
        else:
            return soname
    return _ldconfig_find_library(name)


ctypes.util.find_library = _find_library
try:
    import pyseccomp  # noqa: TID251 (the import point)
finally:
    ctypes.util.find_library = _ldconfig_find_library

__all__ = ["pyseccomp"]
