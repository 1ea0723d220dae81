"""Records: msgspec's `Struct` and its helpers, and the one place splitvmm imports msgspec.

Every record class in splitvmm is a `Struct` (built in C, ~50 times faster to define than a
dataclass: bench/startup.py), and every module takes `Struct`, `field`, `replace` and
`asdict` from here (ruff's banned-api rule in pyproject.toml keeps it so).

Why a module of its own. msgspec's Python half (msgspec._utils) imports typing_extensions
where it is installed -- and it is, since blake3 requires it below Python 3.12 -- and
typing_extensions imports inspect, ast, dis and tokenize: ~12 ms of the ~24 that importing
msgspec costs, in every interpreter of a VM on the way to its first device (the monitor's,
the launcher's and the zygote's). msgspec uses it only to read the type hints its codecs
decode into (msgspec.json, msgpack, convert); splitvmm uses none of them (records are
encoded by protocol/codec.py). So msgspec is imported with typing_extensions hidden, and
falls back to what `typing` has of the same (get_type_hints, Required, NotRequired).

Hidden for that one import only: `sys.modules[name] = None` makes an import of the name
fail (the import system's documented way to block one), and the entry is removed right
after, so a later `import typing_extensions`, by anything, gets the real module. Where it
was imported before (a test run: hypothesis imports it), msgspec is imported as usual.
"""

import sys

_HIDDEN = "typing_extensions"

if _HIDDEN in sys.modules or "msgspec" in sys.modules:
    from msgspec import Struct, field  # noqa: TID251 (the import point)
else:
    sys.modules[_HIDDEN] = None  # type: ignore[assignment]
    try:
        from msgspec import Struct, field  # noqa: TID251
    finally:
        del sys.modules[_HIDDEN]
from msgspec.structs import asdict, replace  # noqa: E402, TID251

__all__ = ["Struct", "asdict", "field", "replace"]
