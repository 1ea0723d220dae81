"""Type stub for the cffi-compiled module built by _build_kvm.py (absent until the build runs).

cffi makes `ffi` and `lib` from the C headers at build time: struct fields, constants
and functions exist only as attributes of C objects, so no static type can describe
them. They are Any here, the boundary; every wrapper in native/ narrows what it reads
(`int(...)`, `bytes(...)`, `ffi.unpack`) before it returns a Python value.
"""

from typing import Any

ffi: Any
lib: Any
