"""splitvmm.record: msgspec imported without typing_extensions, which stays importable."""

import subprocess
import sys


def _probe(code: str) -> str:
    """Run `code` in a fresh interpreter (the hiding happens at msgspec's first import)."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_msgspec_comes_without_typing_extensions_and_falls_back_to_typing():
    out = _probe(
        "import sys, typing, splitvmm.record, msgspec._utils as u; "
        "print('typing_extensions' in sys.modules, u._get_type_hints is typing.get_type_hints)"
    )

    assert out == "False True"


def test_typing_extensions_is_hidden_for_that_import_only():
    out = _probe(
        "import splitvmm.record, typing_extensions; print(hasattr(typing_extensions, 'Self'))"
    )

    assert out == "True"


def test_where_typing_extensions_came_first_msgspec_uses_it():
    out = _probe(
        "import typing_extensions, splitvmm.record, msgspec._utils as u; "
        "print(u._get_type_hints is typing_extensions.get_type_hints)"
    )

    assert out == "True"


def test_records_work_as_msgspec_structs():
    from splitvmm.record import Struct, asdict, field, replace

    class Point(Struct, frozen=True, kw_only=True):
        x: int
        tags: list[str] = field(default_factory=list)

    p = replace(Point(x=1), x=2)

    assert asdict(p) == {"x": 2, "tags": []}
