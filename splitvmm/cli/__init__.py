"""The `splitvmm` program: main() is its entry point (pyproject.toml, __main__.py).

The root command and its subcommands are click commands in root.py. main() loads them only
after it has started the launcher of a VM that `up` or `restore` will run (early.py): the
launcher starts the zygote, whose imports (~100 ms) then overlap click's and the monitor's.
`from splitvmm.cli import cli` still gives the root command (tests drive it in-process).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

ROOT_NAMES = ("cli", "SUBCOMMANDS", "LazyGroup")  # what root.py exports here


def main() -> NoReturn:
    from splitvmm.cli import early

    early.start_launcher(sys.argv[1:])
    from splitvmm.cli.root import main as run

    run()


def __getattr__(name: str) -> Any:  # PEP 562: root.py loads on first use
    if name in ROOT_NAMES:
        from splitvmm.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
