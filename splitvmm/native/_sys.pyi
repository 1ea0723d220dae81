"""Type stub for the cffi-compiled module built by _build_sys.py: Any, as _kvm.pyi says why."""

from typing import Any

ffi: Any
lib: Any
