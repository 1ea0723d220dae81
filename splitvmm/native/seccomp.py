"""pyseccomp, imported with its two libraries found by the dynamic linker instead of ldconfig,
and without importing ctypes.util.

pyseccomp finds libc and libseccomp with ctypes.util.find_library, which on Linux runs
`ldconfig -p` and scans what it prints: two fork+execs and ~3.5 ms at every import, in the
monitor and in the zygote, both on the way to a VM's first device (bench/startup.py). What
that scan returns on a glibc system is the library's soname, which ctypes then dlopens. So
while pyseccomp is imported, find_library first tries the soname itself with dlopen (the
same search the dynamic linker makes for that name), and asks ldconfig only for a library
that does not load by its soname (another libc, another libseccomp ABI).

Importing ctypes.util itself costs ~4 ms more (shutil, and through it bz2 and lzma), in the
same two processes, for that one function. So where nothing imported it yet, pyseccomp's
`import ctypes.util` gets a stand-in module holding only the find_library above, for the
length of its import: the import system's sys.modules entry and the package's attribute,
both taken back right after, so a later `import ctypes.util`, by anything, gets the real
module. The real one is imported only where ldconfig is asked.

Every module takes pyseccomp from here (ruff's banned-api rule in pyproject.toml).
"""

import ctypes
import sys
import types
from collections.abc import Callable

# What ldconfig's cache names them on glibc: libseccomp's ABI has been .so.2 since 2012.
SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
_UTIL = "ctypes.util"
# ctypes.util's own find_library, where that module was imported before us: its place holds
# ours while pyseccomp imports, so the fallback must not look it up there.
_lent: Callable[[str], str | None] | None = None


def _ldconfig_find_library(name: str) -> str | None:
    """ctypes.util's own find_library (ldconfig): the one set aside, or the real module's,
    imported now over the stand-in."""
    if _lent is not None:
        return _lent(name)
    stand_in = sys.modules.get(_UTIL)
    if stand_in is not None and getattr(stand_in, "__stand_in__", False):
        del sys.modules[_UTIL]  # the import below then loads the real one, for good
    import ctypes.util

    return ctypes.util.find_library(name)


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


if _UTIL in sys.modules:  # the real module is here already: only its function is lent
    import ctypes.util

    _lent = ctypes.util.find_library
    ctypes.util.find_library = _find_library
    try:
        import pyseccomp  # noqa: TID251 (the import point)
    finally:
        ctypes.util.find_library = _lent
else:
    _stand_in = types.ModuleType(_UTIL, "find_library for pyseccomp's import (native/seccomp.py)")
    _stand_in.find_library = _find_library  # type: ignore[attr-defined]
    _stand_in.__stand_in__ = True  # type: ignore[attr-defined]
    sys.modules[_UTIL] = _stand_in
    ctypes.util = _stand_in  # what `ctypes.util.x` looks up in pyseccomp
    try:
        import pyseccomp  # noqa: TID251 (the import point)
    finally:
        if sys.modules.get(_UTIL) is _stand_in:
            del sys.modules[_UTIL]
        if getattr(ctypes, "util", None) is _stand_in:
            del ctypes.util

__all__ = ["pyseccomp"]
