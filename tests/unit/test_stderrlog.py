"""StderrLog: the monitor's log lines never wait for a stderr that does not take them."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pty
import select
import sys
import tty
from collections.abc import Iterator

import pytest

from splitvmm import stderrlog
from splitvmm.fdline import FdLine
from splitvmm.native import files
from splitvmm.stderrlog import StderrLines, StderrLog

PIPE_SIZE = 1 << 16  # fills with one write


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A small pipe whose write end blocks, as an operator's stderr does."""
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("splitvmm.test", logging.WARNING, __file__, 1, msg, None, None)


def fill(w: int, leave: int = 0) -> None:
    """Fill the pipe but for `leave` bytes, through a non-blocking description of our own."""
    own = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.write(own, b"x" * (PIPE_SIZE - leave))
    os.close(own)


def drain(r: int) -> bytes:
    own = os.open(f"/proc/self/fd/{r}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(own, 1 << 20)
    finally:
        os.close(own)


def test_stderr_log_full_pipe_drops_the_line_instead_of_blocking(pipe):
    r, w = pipe
    log = StderrLog(w)
    fill(w)

    log.emit(record("lost"))

    assert log.lines.dropped == 1
    assert os.get_blocking(w)  # our fd, and the operator's shell's, still block
    log.close()


def test_stderr_log_with_room_again_says_what_it_dropped_before_the_next_line(pipe):
    r, w = pipe
    log = StderrLog(w)
    fill(w)
    log.emit(record("lost"))
    log.emit(record("lost too"))
    drain(r)

    log.emit(record("back"))

    assert drain(r) == (b"splitvmm: 2 log lines dropped: stderr was not taking them\nback\n")
    log.close()


def test_stderr_lines_full_pipe_drops_each_line_of_a_write_and_says_how_many(pipe):
    """The launcher's lines (sandbox/launcher_server.py): what it relays of a device's stderr
    comes several lines to a write, and each is counted."""
    r, w = pipe
    lines = StderrLines(w, "launcher")
    fill(w)
    lines.write(["splitvmm: device rng0: one", "splitvmm: device rng0: two"])
    drain(r)

    lines.write(["splitvmm: launcher: back"])

    assert drain(r) == (
        b"splitvmm: 2 launcher lines dropped: stderr was not taking them\n"
        b"splitvmm: launcher: back\n"
    )
    lines.close()


def test_stderr_lines_of_the_launcher_are_never_cut_by_the_monitors(pipe):
    """The launcher relayed a batch of a device's lines in one write; a nearly full pipe took
    part of it, the monitor's next line went in after that part, and the rest of the device's
    line came after the monitor's, printed with no device's name: a line any device could
    have made look like anyone's. Each line is a write of its own, which a pipe takes whole
    or not at all."""
    r, w = pipe
    lines = StderrLines(w, "launcher")
    device = [f"splitvmm: device rng0: {c * 2000}" for c in "abc"]
    fill(w, leave=5000)  # room for two of them, and part of the third
    lines.write(device)
    shown = drain(r)
    os.write(w, b"splitvmm: the monitor's line\n")  # another process, between our writes
    lines.write(["splitvmm: launcher: next"])
    shown += drain(r)

    got = shown.decode().removeprefix("x" * (PIPE_SIZE - 5000)).splitlines()
    assert got == [
        *device[:2],
        "splitvmm: the monitor's line",
        "splitvmm: 1 launcher line dropped: stderr was not taking them",
        "splitvmm: launcher: next",
    ]
    lines.close()


def test_stderr_lines_given_a_description_of_their_own_write_through_it_and_never_wait(pipe):
    """A root launcher opens its own before it gives up what may open the operator's
    terminal (sandbox/launcher_start.py): the lines go through it, never blocking, and the
    description it shares with the operator's shell stays blocking."""
    r, w = pipe
    own = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    lines = StderrLines(w, "launcher", own=own)
    fill(w)
    lines.write(["splitvmm: launcher: dropped"])  # returns at once: the pipe is full
    drain(r)

    lines.write(["splitvmm: launcher: back"])

    assert drain(r) == (
        b"splitvmm: 1 launcher line dropped: stderr was not taking them\nsplitvmm: launcher: back\n"
    )
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    lines.close()


def test_stderr_log_short_write_sends_the_rest_before_the_next_line(pipe):
    r, w = pipe
    log = StderrLog(w)
    fill(w, leave=1024)
    long = "y" * 8192  # over PIPE_BUF: the pipe takes what fits
    log.emit(record(long))
    taken = drain(r)[PIPE_SIZE - 1024 :]

    log.emit(record("next"))

    assert 0 < len(taken) < len(long)  # Linux merges into the last page what fits there
    assert taken + drain(r) == f"{long}\nnext\n".encode()
    log.close()


def test_stderr_log_reader_gone_drops_lines_without_raising(pipe):
    r, w = pipe
    log = StderrLog(w)
    os.close(r)

    log.emit(record("nobody reads"))
    log.emit(record("nobody at all"))

    assert log.lines.dropped == 2
    log.close()


def test_stderr_log_close_says_what_it_dropped(pipe):
    r, w = pipe
    log = StderrLog(w)
    fill(w)
    log.emit(record("lost"))
    drain(r)

    log.close()

    assert drain(r) == b"splitvmm: 1 log line dropped: stderr was not taking them\n"


def test_stderr_log_install_replaces_only_the_handler_on_stderr(pipe):
    r, w = pipe
    root = logging.getLogger()
    kept = list(root.handlers)
    old = logging.StreamHandler(sys.stderr)
    old.setFormatter(logging.Formatter("splitvmm: %(message)s"))
    root.addHandler(old)
    try:
        new = stderrlog.install(w)
        handlers = list(root.handlers)
    finally:
        root.handlers[:] = kept
    assert new is not None
    new.emit(record("formatted"))
    new.close()

    assert handlers == [*kept, new]
    assert drain(r) == b"splitvmm: formatted\n"


def test_up_outcome_comes_after_the_log_lines_stderr_had_not_taken(pipe, monkeypatch):
    """The VM ended while stderr held the start of a long log line and had dropped another
    (its reader catching up only then): the outcome went out in the middle of that line, and
    the rest of it and the dropped-lines notice came after the outcome (logging.shutdown's
    close, as `up` exits)."""
    r, w = pipe
    from splitvmm.cli import up
    from splitvmm.monitor import machine
    from splitvmm.monitor.exits import Outcome
    from splitvmm.sandbox import launcher

    installed: list[StderrLog] = []
    fake = type("FakeLauncher", (), {"close": lambda self: None})()
    monkeypatch.setattr(launcher.Launcher, "start", staticmethod(lambda: fake))
    monkeypatch.setattr(
        stderrlog, "install", lambda: installed.append(StderrLog(w)) or installed[-1]
    )
    monkeypatch.setattr(sys, "stderr", os.fdopen(os.dup(w), "w"))
    long = "y" * 8192  # over PIPE_BUF: the pipe takes what fits
    said = []

    def run_vm(cfg: object, snap: object, launcher: object) -> Outcome:
        fill(w, leave=1024)
        installed[0].emit(record(long))  # taken in part
        installed[0].emit(record("dropped"))
        said.append(drain(r)[PIPE_SIZE - 1024 :])  # the reader catches up as the VM ends
        return Outcome(0, "the guest powered off")

    monkeypatch.setattr(machine, "run_vm", run_vm)
    with pytest.raises(SystemExit):
        up.run_and_exit(lambda snapshot: None, None, None)  # type: ignore[arg-type, return-value]
    installed[0].close()  # logging.shutdown's, as `up` exits
    said.append(drain(r))

    notice = "splitvmm: 1 log line dropped: stderr was not taking them\n"
    outcome = "\r\nsplitvmm: the guest powered off\n"
    assert b"".join(said) == f"{long}\n{notice}{outcome}".encode()


def test_stderr_log_install_on_a_stderr_it_cannot_reopen_leaves_it_blocking(pipe, monkeypatch):
    """A terminal of another user's (`su` in it) refuses the open through /proc/self/fd
    (EACCES). O_NONBLOCK on the description fd 2 shares with the operator's shell made that
    terminal non-blocking, for the shell after us too, and the outcome's write could fail
    (EAGAIN): its lines wait for it instead, as they did, and it stays blocking."""
    r, w = pipe
    refused = OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(files, "reopen_write_only", lambda fd, flags=0: refused)
    root = logging.getLogger()
    kept = list(root.handlers)
    old = logging.StreamHandler(sys.stderr)
    root.addHandler(old)
    try:
        new = stderrlog.install(w)
        assert new is not None
        new.setFormatter(logging.Formatter("%(message)s"))
        new.emit(record("a line"))
        new.close()
    finally:
        root.handlers[:] = kept

    assert new.lines.waits == "it has no description of its own (Permission denied)"
    said = b"stderr: it has no description of its own (Permission denied): log lines wait"
    assert (drain(r), os.get_blocking(w)) == (said + b" for it to take them\na line\n", True)


def read_pty(master: int, size: int) -> bytes:
    """`size` bytes from a pty's master, or what came within 30 s: a pty hands over each write
    on its own, so one read may return the first line only."""
    got = b""
    while len(got) < size and select.select([master], [], [], 30)[0]:
        got += os.read(master, size - len(got))
    return got


def test_stderr_log_on_a_raw_terminal_starts_each_line_at_its_left_edge():
    """The console puts the operator's terminal in raw mode for the VM's life (no OPOST: a
    newline is no carriage return): each log line began where the one before it ended."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    log = StderrLog(slave)

    log.emit(record("one"))
    log.emit(record("two"))
    log.close()

    assert read_pty(master, 10) == b"one\r\ntwo\r\n"
    os.close(master)
    os.close(slave)


def test_stderr_log_waiting_on_a_description_another_made_non_blocking_loses_no_line(
    pipe, monkeypatch
):
    """`sudo -u someone splitvmm up vm.toml 2>&1 | tee log` (a root-owned pipe): neither the
    monitor's stderr nor the serial device's stdio output (the same description) can be
    reopened. The device's FdLine makes that description non-blocking (its fallback), so the
    log's lines, which wait for room, got EAGAIN and were lost: neither written nor counted."""
    r, w = pipe
    refused = OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(files, "reopen_write_only", lambda fd, flags=0: refused)
    log = StderrLog(w)
    FdLine(os.dup(w)).close()  # the device's output line: O_NONBLOCK on the description
    fill(w)
    caught_up = []
    real_poll = select.poll

    class CatchingUp:  # the reader catches up while the log waits for room
        def __init__(self) -> None:
            self.poller = real_poll()

        def register(self, fd: int, events: int) -> None:
            self.poller.register(fd, events)

        def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
            caught_up.append(drain(r))
            return self.poller.poll(timeout)

    monkeypatch.setattr(select, "poll", CatchingUp)

    log.emit(record("a line"))

    assert (b"".join(caught_up) + drain(r))[PIPE_SIZE:] == b"a line\n"
    log.close()
