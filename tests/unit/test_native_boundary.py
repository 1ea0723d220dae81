"""STYLE.md section 4: native/ is the only code that touches the cffi modules.

Outside splitvmm/native (and in bench/), no module imports splitvmm.native._kvm or
splitvmm.native._sys; they use the typed wrappers and named constants native/ exports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CFFI_MODULES = frozenset({"splitvmm.native._kvm", "splitvmm.native._sys"})
CHECKED = ("splitvmm", "bench")


def cffi_imports(source: str) -> list[str]:
    """The cffi modules that `source` imports, however it spells the import."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in CFFI_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found += [node.module] if node.module in CFFI_MODULES else []
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in CFFI_MODULES
            ]
    return found


def outside_native() -> list[Path]:
    native = ROOT / "splitvmm" / "native"
    return [
        path
        for top in CHECKED
        for path in sorted((ROOT / top).rglob("*.py"))
        if native not in path.parents
    ]


@pytest.mark.parametrize(
    "source",
    [
        "from splitvmm.native._kvm import lib",
        "import splitvmm.native._sys",
        "from splitvmm.native import _kvm",
        "def f():\n    from splitvmm.native._sys import ffi",
    ],
)
def test_cffi_imports_finds_every_spelling(source: str) -> None:
    assert len(cffi_imports(source)) == 1


def test_cffi_imports_ignores_the_typed_wrappers() -> None:
    assert (
        cffi_imports("from splitvmm.native.kvm import VcpuFd\nfrom splitvmm.native import exits")
        == []
    )


def test_no_module_outside_native_imports_a_cffi_module() -> None:
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in outside_native()
        if (found := cffi_imports(path.read_text()))
    }

    assert offenders == {}
