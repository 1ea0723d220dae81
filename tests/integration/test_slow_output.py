"""A serial output nobody reads for a while: back-pressure on the guest, never a dead VM.

The `counter` guest prints ~13 KiB, polling LSR.THRE before each byte. Its serial output goes
to a `unix:` listener (or a FIFO) that accepts and then does not read for longer than the
monitor's read deadline: the device's buffer fills, THRE stays clear, the guest waits. Once we
read, every byte arrives in order and the guest ends normally (status 1, never 4).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitvmm.monitor.channel import READ_TIMEOUT_MS
from tests.integration.conftest import vm_toml
from tests.integration.vmproc import VmProcess

pytestmark = pytest.mark.kvm

LIMIT = 1500  # count lines: ~13 KiB, more than a stalled socket or pipe plus the device hold
EXPECTED = (
    f"counter: period=1 limit={LIMIT} check=0\n"
    + "".join(f"count={v}\n" for v in range(1, LIMIT + 1))
    + "counter: done\n"
).encode()
# Long enough for a device that blocked in write() to miss the monitor's deadline.
STALL_S = READ_TIMEOUT_MS / 1000 + 1
WAIT_S = 60  # for output to start, and between two reads once we read


class UnixReader:
    """output = "unix:PATH": we listen; the monitor connects when it builds the VM."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "serial.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(WAIT_S)
        self.conn: socket.socket | None = None

    def output(self) -> str:
        return f"unix:{self.path}"

    def connected(self) -> int:
        self.conn, _ = self.listener.accept()
        return self.conn.fileno()

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()


class FifoReader:
    """output = a FIFO's path, its pipe shrunk to one page so that it fills soon."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "serial.fifo"
        os.mkfifo(self.path, 0o600)
        # Opened first, non-blocking: the monitor's open for writing then finds a reader.
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)

    def output(self) -> str:
        return str(self.path)

    def connected(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


READERS: dict[str, Callable[[Path], UnixReader | FifoReader]] = {
    "unix": UnixReader,
    "fifo": FifoReader,
}


@pytest.fixture(params=sorted(READERS))
def reader(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UnixReader | FifoReader]:
    r = READERS[request.param](tmp_path)
    yield r
    r.close()


def queued(fd: int) -> int:
    """Bytes waiting to be read on a socket or pipe (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little")


def read_to_eof(fd: int) -> bytes:
    data = bytearray()
    while select.select([fd], [], [], WAIT_S)[0]:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # a FIFO: readable, then emptied by nobody else
            continue
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"no output for {WAIT_S} s after {len(data)} bytes")


def start_counter(
    guests: dict[str, Path], tmp_path: Path, reader: UnixReader | FifoReader
) -> tuple[VmProcess, int]:
    """The counter guest printing to `reader`, once its first output is there: the VM, and
    the fd we read it from."""
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=1 limit={LIMIT}"'
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(boot, serial_out=reader.output()))
    vm = VmProcess(tmp_path, ["up", str(config)], tmp_path / "unused.log")
    fd = reader.connected()
    assert select.select([fd], [], [], WAIT_S)[0], "the guest printed nothing"
    return vm, fd


def test_serial_output_unread_past_the_deadline_stalls_guest_then_arrives_whole(
    guests: dict[str, Path], tmp_path: Path, reader: UnixReader | FifoReader
) -> None:
    vm, fd = start_counter(guests, tmp_path, reader)

    with pytest.raises(subprocess.TimeoutExpired):  # we do not read: the VM must live on
        vm.proc.wait(timeout=STALL_S)
    held_back = len(EXPECTED) - queued(fd)
    data = read_to_eof(fd)
    status, stderr = vm.finish()

    assert held_back > 0  # the guest was made to wait: its output had not all gone out
    assert (status, data) == (1, EXPECTED), stderr[-2000:]


def test_serial_output_reader_gone_leaves_the_vm_running_output_dropped(
    guests: dict[str, Path], tmp_path: Path
) -> None:
    """The unix: peer reads a little and leaves: output goes nowhere from then on, as for a
    pipe whose reader left. The device died instead (SIGSYS: its socket's finalizer asked
    getsockname for its warning), and the VM stopped with status 4."""
    reader = UnixReader(tmp_path)
    try:
        vm, _ = start_counter(guests, tmp_path, reader)
        assert reader.conn is not None
        reader.conn.close()
        status, stderr = vm.finish()
    finally:
        reader.close()
    assert status == 1, stderr[-2000:]  # the guest ran to its end
    assert "discarding output" in stderr
