"""Nothing a device sends is ever unpickled (DESIGN.md, STYLE.md 3): no module on the
monitor's side of the channel imports a pickle-like deserialiser or calls recv_pyobj.

(cloudpickle travels the other way only: the monitor to a device, in tests' hooks, which
the device process alone unpickles -- splitvmm/devprocs/runtime.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "splitvmm"
MONITOR_SIDE = ("monitor", "protocol", "cli", "snapshot", "sandbox", "native", "config.py")
BANNED_MODULES = {"pickle", "cloudpickle", "marshal", "shelve", "dill", "_pickle", "copyreg"}
BANNED_CALLS = {"recv_pyobj", "send_pyobj", "recv_serialized"}


def monitor_side_files() -> list[Path]:
    files: list[Path] = []
    for part in MONITOR_SIDE:
        path = PACKAGE / part
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def banned_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_CALLS:
            found.append(node.attr)
    return found


@pytest.mark.parametrize("path", monitor_side_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_monitor_side_module_never_unpickles(path):
    assert banned_uses(ast.parse(path.read_text())) == []


def test_banned_uses_finds_each_kind():
    source = "import pickle\nfrom cloudpickle import loads\nimport marshal as m\nsock.recv_pyobj()"

    assert banned_uses(ast.parse(source)) == ["pickle", "cloudpickle", "marshal", "recv_pyobj"]
