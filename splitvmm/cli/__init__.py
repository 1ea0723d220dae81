"""The `splitvmm` program: main() is its entry point (pyproject.toml, __main__.py).

The root command and its subcommands are click commands in root.py. main() loads them only
after it has started the launcher of a VM that `up` or `restore` will run (early.py): the
launcher starts the zygote, whose imports (~100 ms) then overlap click's and the monitor's.
`from splitvmm.cli import cli` still gives the root command (tests drive it in-process).
"""

from __future__ import annotations

import io
import sys
from typing import Any, NoReturn

ROOT_NAMES = ("cli", "SUBCOMMANDS", "LazyGroup")  # what root.py exports here


def main() -> NoReturn:
    from splitvmm.cli import early

    _stdio_open()
    _unencodable_escaped()
    early.start_launcher(sys.argv[1:])
    from splitvmm.cli.root import main as run

    run()


def _stdio_open() -> None:
    """/dev/null for any of fds 0-2 closed at start (`splitvmm up ... <&-`, `>&-`): else the
    first fd opened takes the number (the launcher's pidfd took 0), and the console reads it
    as the operator's keyboard, or a device's output goes to it. Python started with that
    fd closed has None for its stream: a stream on /dev/null replaces it, so that printing,
    logging and the final flush work (exit_now flushed None: exit status 1)."""
    import os

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def _unencodable_escaped() -> None:
    """What the terminal's encoding cannot show is printed as a backslash escape, not a
    UnicodeEncodeError: a snapshot's producer or a device's name may hold any character
    (`snapshot inspect` keeps printable ones), and stdout may be ASCII (PYTHONIOENCODING, a
    C locale where Python's UTF-8 coercion is off)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def __getattr__(name: str) -> Any:  # PEP 562: root.py loads on first use
    if name in ROOT_NAMES:
        from splitvmm.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
