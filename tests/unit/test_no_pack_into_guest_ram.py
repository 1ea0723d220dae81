"""No device writes guest memory with struct.pack_into (guestram.RamWindow says why: CPython
zeroes the field before it stores the value, so a driver polling a used idx sees 0 between
the two stores). Device code packs bytes and assigns a slice (RamWindow.write,
GuestRam.write). The one allowed use packs the PCI configuration image, a local bytearray
no guest reads while it is built."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DEVPROCS = Path(__file__).resolve().parents[2] / "splitvmm" / "devprocs"
ALLOWED = {"virtio/config_space.py"}  # builds a local configuration image


def pack_into_calls(tree: ast.AST) -> list[int]:
    """Line numbers of calls to any `pack_into` (struct's function or a Struct's method)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        == "pack_into"
    ]


def device_files() -> list[Path]:
    return [
        p for p in sorted(DEVPROCS.rglob("*.py")) if str(p.relative_to(DEVPROCS)) not in ALLOWED
    ]


@pytest.mark.parametrize("path", device_files(), ids=lambda p: str(p.relative_to(DEVPROCS)))
def test_device_module_never_pack_into_guest_ram(path):
    assert pack_into_calls(ast.parse(path.read_text())) == []


def test_pack_into_calls_finds_method_and_function():
    source = "U16.pack_into(view, 2, 1)\nstruct.pack_into('<H', view, 0, 1)\nview[0:2] = b'ab'"

    assert pack_into_calls(ast.parse(source)) == [1, 2]
