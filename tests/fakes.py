"""Fakes for unit tests: guest memory in a bytearray, an irq that counts, a channel in a list,
a monitor's end of a device's channel."""

from __future__ import annotations

import socket

from splitvmm.devprocs.channel import Channel
from splitvmm.protocol import zmtp


class FakeGuestMemory:
    """Flat guest RAM from gpa 0 with GuestMemory's read/write interface."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > self.size:
            raise ValueError(f"fake guest write {gpa:#x}+{len(data):#x} out of range")
        self.buf[gpa : gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or gpa + length > self.size:
            raise ValueError(f"fake guest read {gpa:#x}+{length:#x} out of range")
        return bytes(self.buf[gpa : gpa + length])


class FakeIrq:
    """Counts triggers, as an irqfd EventFd would be written."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class FakeLine:
    """An output line (devprocs/output.Line) that takes `accept` bytes, then refuses them
    until the test gives it more room (`accept += n`), like a reader that stopped reading."""

    def __init__(self, accept: int = 1 << 30) -> None:
        self.accept = accept
        self.data = bytearray()  # what the line took, in order

    def send(self, data: memoryview) -> int:
        n = min(len(data), self.accept)
        self.data += data[:n]
        self.accept -= n
        return n

    def fileno(self) -> int:
        return -1  # never polled: unit tests flush by hand, as the runtime does when writable


class FakeClock:
    """A host clock that moves only when the test says (devprocs/rtc.Clock): the wall clock
    and the monotonic clock advance together; `utc_offset` is the host's zone."""

    def __init__(self, wall_ns: int, utc_offset: int = 0) -> None:
        self.wall = wall_ns
        self.mono = 1000.0
        self.offset = utc_offset

    def advance(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns / 1e9

    def wall_ns(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def utc_offset(self, wall_s: int) -> int:
        return self.offset


class MonitorEnd:
    """The monitor's end of a device's channel for tests of the device side: a socket of a
    socketpair spoken to in raw ZMTP (protocol/zmtp.py), the other socket a device's Channel
    (devprocs/channel.py). channel_pair() makes both."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = zmtp.ZmtpReader(1 << 20)
        sock.sendall(zmtp.HANDSHAKE)

    def send(self, frame: bytes) -> None:
        self.sock.sendall(zmtp.encode(frame))

    def recv(self, timeout_s: float | None = 5.0) -> bytes:
        """The device's next frame; TimeoutError if none comes by then (0: only one that
        came already)."""
        self.sock.settimeout(timeout_s)
        while (frame := self.reader.next()) is None:
            try:
                data = self.sock.recv(zmtp.CHUNK)
            except BlockingIOError:  # timeout 0
                raise TimeoutError("no frame from the device") from None
            if not data:
                raise EOFError("the device's end closed")
            self.reader.feed(data)
        return frame

    def close(self) -> None:
        self.sock.close()


def channel_pair(max_frame: int = 1 << 20) -> tuple[MonitorEnd, Channel]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return MonitorEnd(ours), Channel(theirs, max_frame)
