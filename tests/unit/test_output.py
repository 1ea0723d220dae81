"""A device's bounded output (devprocs/output.py): buffer logic with a fake line, and the
non-blocking fd line on a real pipe and socket pair (no process, no thread)."""

import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket

import pytest

from splitvmm.devprocs.base import DeviceContext
from splitvmm.devprocs.faults import FaultInjector
from splitvmm.devprocs.output import FLUSH_TIMEOUT_MS, BoundedOutput
from splitvmm.devprocs.runtime import Checkpoints, _serve_frame
from splitvmm.devprocs.serial import Uart8250
from splitvmm.fdline import FdLine
from splitvmm.monitor.channel import READ_TIMEOUT_MS
from splitvmm.native import files
from splitvmm.protocol import wire
from tests.fakes import FakeIrq, FakeLine


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


# A regular file's line on a file system that fills up, then has room again: the bytes that
# did not fit are lost (and counted), the line is not; the operator is told once.
class FillingDisk:
    """A regular file's line (FdLine.whole_writes) whose file system is full while `full`."""

    whole_writes, counted = True, True

    def __init__(self) -> None:
        self.full = False
        self.data = bytearray()

    def send(self, data: memoryview) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.data += data
        return len(data)

    def fileno(self) -> int:
        return -1


def test_output_file_system_full_for_a_while_loses_only_what_came_meanwhile(caplog):
    line = FillingDisk()
    out = BoundedOutput(line, 64)  # type: ignore[arg-type]
    out.put(b"before\n")
    line.full = True
    with caplog.at_level(logging.WARNING, "splitvmm.dev.output"):
        for _ in range(5):
            out.put(b"lost\n")
    line.full = False  # the operator made room
    out.put(b"after\n")

    assert bytes(line.data) == b"before\nafter\n"
    assert out.emitted == len(b"before\n" + 5 * b"lost\n" + b"after\n")  # the model's count
    assert len([r for r in caplog.records if "No space" in r.getMessage()]) == 1


def test_output_real_file_over_its_size_limit_then_under_it_takes_output_again(tmp_path):
    """The same through FdLine on a real file: a short write (the file system's last bytes, or
    RLIMIT_FSIZE here) fails the line's write, ENOSPC; with room again, output goes on. In a
    child: RLIMIT_FSIZE is the process's."""
    path = tmp_path / "serial.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            out = BoundedOutput(FdLine(fd), 64)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4, hard))  # SIGXFSZ: ignored by Python
            out.put(b"hello\n")  # 4 bytes fit: a short write
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            out.put(b"world\n")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(fd)
    assert path.read_bytes() == b"hellworld\n"


# SYNC with the output line stalled. A SYNC comes in the middle of a run after every write to
# a virtio function's configuration space, MSI-X table or common configuration (protocol/
# models.py sync_writes) and after each late write a restart sends (monitor/slot.py): it is
# answered at once. Only the teardown's last SYNC (wire.DRAIN) waits, up to FLUSH_TIMEOUT_MS,
# for a slow line to take what the device holds. Each used to wait, and three within 10 s
# took a healthy device over the monitor's latency budget.
class SentFrames:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.sent.append(frame)


def stalled_uart() -> tuple[socket.socket, FdLine, Uart8250]:
    """A UART whose `unix:` peer stopped reading: the socket and the device's buffer full."""
    peer, ours = socket.socketpair()
    line = FdLine(ours.detach())
    uart = Uart8250(DeviceContext(irq=FakeIrq(), out=BoundedOutput(line)))
    while uart.ctx.out.room():
        uart.write(0, b"x")  # THR
    return peer, line, uart


def close_line(line: FdLine) -> None:
    """Close the line's fd now, and leave no socket object to close its number again later."""
    if line._sock is not None:
        line._sock.detach()
    os.close(line.fd)


def test_runtime_sync_mid_run_answers_without_waiting_for_a_stalled_line(monkeypatch) -> None:
    peer, line, uart = stalled_uart()
    sock, checkpoints, injector = SentFrames(), Checkpoints(uart), FaultInjector()

    def drain(self: BoundedOutput) -> bool:
        raise AssertionError("a mid-run SYNC waited for the line")

    monkeypatch.setattr(BoundedOutput, "drain", drain)
    try:
        for seq in (1, 2, 3):  # three synced config writes of the guest's
            _serve_frame(uart, sock, wire.encode_sync(seq), checkpoints, injector)  # type: ignore[arg-type]
        replies = [f for f in sock.sent if wire.FRAME.unpack(f)[0] == wire.Op.SYNC_DONE]
        assert len(replies) == 3
        assert uart.ctx.out.pending()  # still held: the line takes it when it can
    finally:
        peer.close()
        close_line(line)


def test_runtime_last_sync_still_gives_a_slow_line_its_bytes() -> None:
    """The teardown's SYNC (DRAIN): the line gets what the device held once the peer reads."""
    peer, line, uart = stalled_uart()
    sock, checkpoints, injector = SentFrames(), Checkpoints(uart), FaultInjector()
    peer.setblocking(False)
    try:
        with contextlib.suppress(BlockingIOError):
            while peer.recv(1 << 20):  # the peer reads what the socket holds
                pass
        _serve_frame(uart, sock, wire.encode_sync(1, drain=True), checkpoints, injector)  # type: ignore[arg-type]
        assert uart.ctx.out.pending() == 0
    finally:
        peer.close()
        close_line(line)
