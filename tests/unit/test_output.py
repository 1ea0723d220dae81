"""A device's bounded output (devprocs/output.py): buffer logic with a fake line, and the
non-blocking fd line on a real pipe and socket pair (no process, no thread)."""

import errno
import fcntl
import os
import socket

import pytest

from splitvmm.devprocs.output import FLUSH_TIMEOUT_MS, BoundedOutput, FdLine
from splitvmm.monitor.channel import READ_TIMEOUT_MS
from splitvmm.native import files
from tests.fakes import FakeLine


def test_output_put_on_a_writable_line_sends_at_once():
    line = FakeLine()
    out = BoundedOutput(line, 8)
    taken = out.put(b"hello")
    assert (taken, line.data, out.pending()) == (5, b"hello", 0)


def test_output_put_beyond_capacity_takes_only_what_fits():
    out = BoundedOutput(FakeLine(accept=0), 8)
    taken = out.put(b"0123456789")
    assert (taken, out.buffered(), out.room()) == (8, b"01234567", 0)


def test_output_flush_after_reader_catches_up_sends_in_order():
    line = FakeLine(accept=2)
    out = BoundedOutput(line, 8)
    out.put(b"abcd")
    out.put(b"ef")
    line.accept = 100
    sent = out.flush()
    assert (sent, line.data, out.pending()) == (4, b"abcdef", 0)


def test_output_held_keeps_bytes_until_released():
    line = FakeLine()
    out = BoundedOutput(line, 8)
    out.held = True
    out.put(b"snap")
    held = (bytes(line.data), out.wants_flush())
    out.held = False
    out.flush()
    assert (held, line.data) == ((b"", False), b"snap")


def test_output_without_line_discards_and_keeps_room():
    out = BoundedOutput(None, 8)
    taken = out.put(b"0123456789")
    assert (taken, out.room(), out.pending()) == (8, 8, 0)


def test_output_line_gone_discards_and_keeps_serving():
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    out = BoundedOutput(FdLine(w), 8)
    taken = out.put(b"late")  # EPIPE: the reader went away
    os.close(w)
    assert (taken, out.line, out.room()) == (4, None, 8)


def test_output_flush_deadline_is_below_the_monitor_read_deadline():
    assert FLUSH_TIMEOUT_MS < READ_TIMEOUT_MS  # SYNC drains the output, then must still answer


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    yield r, w
    os.close(r)
    os.close(w)


def test_fd_line_pipe_gets_its_own_nonblocking_description(pipe):
    r, w = pipe
    shared = os.dup(w)  # the monitor's copy of the same description
    FdLine(w)
    flags = (fcntl.fcntl(w, fcntl.F_GETFL), fcntl.fcntl(shared, fcntl.F_GETFL))
    os.close(shared)
    assert (bool(flags[0] & os.O_NONBLOCK), bool(flags[1] & os.O_NONBLOCK)) == (True, False)


def fill(line: FdLine) -> int:
    """Bytes the line takes before it would block."""
    total, chunk = 0, memoryview(b"z" * 4096)
    while n := line.send(chunk):
        total += n
    return total


def test_fd_line_full_pipe_returns_zero_instead_of_blocking(pipe):
    r, w = pipe
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    line = FdLine(w)
    assert (fill(line), line.send(memoryview(b"more"))) == (4096, 0)


def test_fd_line_socket_full_returns_zero_and_leaves_it_blocking():
    a, b = socket.socketpair()
    with a, b:
        line = FdLine(os.dup(a.fileno()))  # the line's socket object closes its own fd
        filled = fill(line)
        flags = fcntl.fcntl(a.fileno(), fcntl.F_GETFL)
        assert (filled > 0, line.send(memoryview(b"more")), flags & os.O_NONBLOCK) == (True, 0, 0)


def test_fd_line_terminal_gets_its_own_nonblocking_description():
    master, slave = os.openpty()
    shared = os.dup(slave)
    FdLine(slave)
    flags = (fcntl.fcntl(slave, fcntl.F_GETFL), fcntl.fcntl(shared, fcntl.F_GETFL))
    for fd in (master, slave, shared):
        os.close(fd)
    assert (bool(flags[0] & os.O_NONBLOCK), bool(flags[1] & os.O_NONBLOCK)) == (True, False)


def test_output_to_regular_file_is_immediate_unless_held(tmp_path):
    with open(tmp_path / "log", "wb") as f:
        out = BoundedOutput(FdLine(f.fileno()))
        immediate = out.immediate()
        out.held = True
        assert (immediate, out.immediate()) == (True, False)


def test_output_to_pipe_is_not_immediate(pipe):
    assert BoundedOutput(FdLine(pipe[1])).immediate() is False


def test_output_to_regular_file_or_none_is_counted_held_or_not(tmp_path):
    with open(tmp_path / "log", "wb") as f:
        out = BoundedOutput(FdLine(f.fileno()))
        out.held = True  # held for a snapshot: still a line whose growth the monitor reads
        assert (out.counted(), BoundedOutput().counted()) == (True, True)


def test_output_to_pipe_is_not_counted(pipe):
    assert BoundedOutput(FdLine(pipe[1])).counted() is False


@pytest.mark.parametrize("how", [os.O_RDONLY, os.O_PATH], ids=["read-only", "O_PATH"])
def test_fd_line_never_reopens_a_fifo_it_could_not_write_for_writing(tmp_path, how):
    """The reopen goes through /proc/self/fd, which checks the file, not how the fd was
    opened: a read-only or O_PATH fd (the monitor may open any path with O_PATH, which its
    Landlock does not check) must not come back writable in a device, before its sandbox."""
    fifo = tmp_path / "victim"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    given = os.open(fifo, how | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            line = FdLine(given)
        except OSError:
            line = None  # refused at once (O_PATH: not even its flags can be set)
        if line is not None:
            with pytest.raises(OSError):
                line.send(memoryview(b"from the device"))
        assert fcntl.fcntl(given, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        try:
            got = os.read(reader, 100)  # b"": no writer is left; nothing reached the FIFO
        except BlockingIOError:
            got = b""  # a writer is open still, and wrote nothing
        assert got == b""
    finally:
        os.close(given)
        os.close(reader)


def test_reopen_write_only_refuses_an_ioctl_only_terminal_fd():
    """Access mode 3 (O_WRONLY|O_RDWR) opens a terminal for ioctls only, and Landlock lets it
    through: reopened, it came back writable."""
    master, terminal = os.openpty()
    ioctl_only = os.open(os.ttyname(terminal), os.O_ACCMODE | os.O_NOCTTY | os.O_CLOEXEC)
    os.set_blocking(master, False)
    try:
        refused = files.reopen_write_only(ioctl_only)
        with pytest.raises(OSError):
            os.write(ioctl_only, b"from the device")
        assert (refused is not None and refused.errno) == errno.EBADF
        with pytest.raises(BlockingIOError):
            os.read(master, 100)  # nothing reached the terminal
    finally:
        for fd in (ioctl_only, master, terminal):
            os.close(fd)


def test_reopen_write_only_refuses_what_is_not_open_for_writing(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    read_write = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    path_only = os.open(fifo, os.O_PATH | os.O_CLOEXEC)
    try:
        refused = files.reopen_write_only(path_only)
        taken = files.reopen_write_only(read_write)
        modes = {fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in (read_write, reader)}
        assert (refused is not None and refused.errno, taken) == (errno.EBADF, None)
        assert modes == {os.O_WRONLY, os.O_RDONLY}  # the read-write one is write-only now
        assert files.reopen_write_only(reader) is not None  # read-only: refused too
    finally:
        for fd in (reader, read_write, path_only):
            os.close(fd)
