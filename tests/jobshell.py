"""A terminal driven by a test: a pty whose slave a job-control "shell" of the test's holds,
and a pipe on which that shell reports what became of its job (tests/unit/test_console.py,
tests/integration/test_up_lifecycle.py)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import textwrap
import time
from collections.abc import Iterator

# A shell's start, in the script a test runs as one: session leader of the terminal on its
# fd 0, job-control signals ignored (as a shell's own), its cooked modes kept in `cooked`; it
# reports on the fd its first argument names (`report`).
SHELL_START = textwrap.dedent(
    """
    import fcntl, os, signal, sys, termios, time
    report = int(sys.argv[1])
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    JOB_SIGNALS = (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP)
    for s in JOB_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    cooked = termios.tcgetattr(0)
    """
)


def pump_pty(
    master: int, report_r: int, out: bytearray, report: bytearray, until: bytes, timeout: float
) -> None:
    """Read what the terminal shows into `out` and the shell's reports into `report`, until
    `until` is in either, `timeout` passes, or the terminal or the report pipe ends."""
    deadline = time.monotonic() + timeout
    while until not in report and until not in out and time.monotonic() < deadline:
        ready = select.select([master, report_r], [], [], 0.05)[0]
        if master in ready:
            try:
                out.extend(os.read(master, 65536))
            except OSError:
                break
        if report_r in ready:
            chunk = os.read(report_r, 4096)
            if not chunk:
                break
            report.extend(chunk)


@contextlib.contextmanager
def ending(shell: subprocess.Popen[bytes], *fds: int) -> Iterator[None]:
    """The shell killed and reaped, and `fds` (the terminal's, the report pipe's) closed, at
    the end of the block, however it ends."""
    try:
        yield
    finally:
        shell.kill()
        shell.wait()
        for fd in fds:
            os.close(fd)
