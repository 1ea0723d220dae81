"""The monitor's end of a device's channel: the listening UNIX socket made before the device
started, then the one connection accepted on it, spoken to in ZMTP (protocol/zmtp.py: why
neither end uses libzmq, what each takes from the other).

Towards the device it writes ZMTP frames; several posted frames go out in one write
(monitor/channel.py post_many): one wake-up of the device.
"""

from __future__ import annotations

import os
import socket

from splitvmm.protocol.zmtp import CHUNK, HANDSHAKE, ZmtpReader

PUMP_CHUNKS = 4  # reads one frame_ready() makes at most: a whole 64 KiB frame and its header


class ZmtpLink:
    """The monitor's end of one device's channel: the listening UNIX socket made before the
    device started, then the one connection accepted on it (the listener is closed then: a
    second connection is refused; only the device and the monitor can reach its path). The
    connection's end is final: the device's socket never reconnects (devprocs/runtime.py).

    Non-blocking throughout: nothing here waits. `fd` is what to poll (for reading: the
    listener until the device has connected; for writing: the connection, while a message
    is still going out). Only read(2), write(2) and accept4(2): a vCPU thread's seccomp
    filter allows the first two (policies/<arch>/vcpu.policy), and accepts happen before
    READY, on the thread that starts the device."""

    def __init__(self, listener: int, max_frame: int) -> None:
        """`listener`: a listening UNIX stream socket; ours (closed by close())."""
        self.reader = ZmtpReader(max_frame)
        try:
            self._listener: socket.socket | None = socket.socket(fileno=listener)
        except BaseException:
            os.close(listener)
            raise
        self._conn: socket.socket | None = None
        self.fd = listener
        self.closed = False  # the device's connection ended (or we ended it)
        # Nothing more to read: its end read, or its socket closed by us. A write that finds
        # its end (EPIPE) closes the link, but what it sent before is still read.
        self._eof = False
        self._frame: bytes | None = None  # a whole frame read, not yet taken
        self._out: bytes | memoryview = b""  # what the kernel has not taken yet of a message
        try:
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise

    def take(self) -> bytes:
        """The frame frame_ready() said waits."""
        frame, self._frame = self._frame, None
        assert frame is not None, "take() without a frame_ready()"
        return frame

    def frame_ready(self, chunks: int = PUMP_CHUNKS) -> bool:
        """Whether a whole frame waits (take() has it), parsed from what was read, else read
        from the connection, never waiting, until one is whole: at most `chunks` reads (0: no
        system call at all). The one place that parses: ProtocolError if the device broke
        ZMTP."""
        if self._frame is None:
            self._frame = self.reader.next()
        for _ in range(chunks):
            if self._frame is not None:
                return True
            if self._eof or (self._conn is None and not self._accept()):
                return False
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return False
            except OSError:  # ECONNRESET: it ended with our bytes unread
                data = b""
            if not data:
                self._ended()
                return False
            self.reader.feed(data)
            self._frame = self.reader.next()
        return self._frame is not None

    def _accept(self) -> bool:
        """The device's connection, if it has come: taken, the listener closed, our greeting
        and READY sent (they fit in any empty socket buffer: no partial write)."""
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return False
        self._listener.close()
        self._listener = None
        conn.setblocking(False)
        self._conn, self.fd = conn, conn.fileno()
        self._out = self._write(HANDSHAKE)
        return True  # read on, even if the greeting found its end: what it sent before

    def send(self, data: bytes) -> bool:
        """Start sending `data`, ZMTP bytes (encode()): True once it is ours to send (what the
        kernel did not take at once goes out before anything else: flush()). False, nothing
        taken, until the device's greeting and READY are in (a libzmq peer takes a frame that
        comes before it has sent its own READY for a handshake command, and hangs up), while
        a message before it is still going out, or once the connection has ended."""
        if not self.reader.ready or self.closed or not self.flush():
            return False
        self._out = self._write(data)
        return not self.closed

    def flush(self) -> bool:
        """Whether every message taken by send() has gone to the kernel (it writes what is
        left of the last, as far as there is room)."""
        if self._out:
            self._out = self._write(self._out)
        return not self._out and not self.closed

    def _write(self, data: bytes | memoryview) -> bytes | memoryview:
        """What of `data` did not fit (the connection's end: nothing, and closed)."""
        try:
            done = os.write(self.fd, data)
        except BlockingIOError:
            return data
        except OSError:  # EPIPE, ECONNRESET: its end (Python ignores SIGPIPE); the bytes
            self.closed, self._out = True, b""  # it sent before it are still read
            return b""
        return memoryview(data)[done:] if done < len(data) else b""

    def _ended(self) -> None:
        self.closed = self._eof = True
        self._out = b""

    def close_peer(self) -> None:
        """End the device's connection (after a protocol error): it can send us nothing more,
        and what it sent is dropped, by the kernel. `fd` is closed; nothing polls it again
        (a closed link is looked at first)."""
        self._ended()
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                sock.close()
        self._listener = self._conn = None
        self._ended()
