"""The device's end of its channel: the UNIX socket it connects to the monitor's listening
one, spoken to in ZMTP (protocol/zmtp.py: why neither end uses libzmq, what each takes from
the other) by the device's one thread.

A frame from the monitor wakes this thread, which reads it, serves it and writes its reply
itself: no I/O thread between the socket and the model (bench/exit_rtt.py).

Its calls: connect(2) once, before the sandbox's seccomp filter (which allows no other);
then recvfrom(2), sendto(2) (no destination, never MSG_OOB: policies/<arch>/
common_device.policy) and poll(2). The socket stays blocking: a call that must not wait
(an event sent unasked, a read of what came) says so with MSG_DONTWAIT.
"""

from __future__ import annotations

import select
import socket

from splitvmm.errors import ProtocolError
from splitvmm.protocol.polling import PollWindow
from splitvmm.protocol.zmtp import CHUNK, HANDSHAKE, ZmtpReader, encode


class ChannelClosed(ProtocolError):
    """The monitor's end is gone: nothing more comes, and nothing we send is read."""


class Channel:
    """One connected channel; not thread-safe (a device process has one thread)."""

    def __init__(self, sock: socket.socket, max_frame: int, poll_ns: int = 0) -> None:
        """`sock`: connected to the monitor's end, ours from now on. Our greeting and READY
        go at once (they fit in any empty socket buffer); the monitor's are read with its
        first frames. `poll_ns`: the longest that recv() looks for the next frame before it
        sleeps (protocol/polling.py), 0 for never."""
        self._sock = sock
        self.window = PollWindow(poll_ns)
        self._reader = ZmtpReader(max_frame)
        self._frame: bytes | None = None  # a whole frame read, not yet taken
        self._out = memoryview(b"")  # what the kernel has not taken yet of a message
        sock.setblocking(True)
        sock.sendall(HANDSHAKE)

    @classmethod
    def connect(cls, endpoint: str, max_frame: int, timeout_s: float, poll_ns: int = 0) -> Channel:
        """Connect to the monitor's end at `endpoint` (ipc://PATH, ZeroMQ's spelling), waiting
        at most `timeout_s` for it to take the connection."""
        path = endpoint.removeprefix("ipc://")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
            return cls(sock, max_frame, poll_ns)
        except BaseException:
            sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- in --------------------------------------------------------------------------------
    def buffered(self) -> bool:
        """Whether a whole frame waits among what was read already (no system call)."""
        if self._frame is None:
            self._frame = self._reader.next()
        return self._frame is not None

    def frame_ready(self) -> bool:
        """Whether a whole frame waits, among what was read or in the socket now (no wait)."""
        while not self.buffered():
            if not self._read(socket.MSG_DONTWAIT):
                return False
        return True

    def recv(self) -> bytes:
        """The next frame, waiting for it as long as it takes (the monitor's heartbeat ends a
        device that stops serving; its death ends ours): looking for it through the poll
        window first, then asleep in the read."""
        if not self.buffered() and not self.window.poll(self.frame_ready):
            while not self.buffered():
                self._read(0)
            self.window.woke()
        frame, self._frame = self._frame, None
        assert frame is not None
        return frame

    def _read(self, flags: int) -> bool:
        """Read what came (a chunk at most) into the reader: whether anything did."""
        try:
            data = self._sock.recv(CHUNK, flags)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            raise ChannelClosed("the monitor closed the channel")
        self._reader.feed(data)
        return True

    # -- out -------------------------------------------------------------------------------
    @property
    def sending(self) -> bool:
        """Whether a message is still going out (poll for POLLOUT, then flush())."""
        return bool(self._out)

    def send(self, frame: bytes) -> None:
        """Send `frame`, waiting while the socket buffer is full (a monitor that stops reading
        has failed us: its heartbeat ends this process)."""
        self._handshake_in(0)
        self._flush(0)
        self._out = memoryview(encode(frame))
        self._flush(0)

    def send_now(self, frame: bytes) -> bool:
        """Send `frame` if the channel takes it now (what the kernel does not take at once
        goes before anything else); False, nothing taken, if it would have to wait."""
        if not self._handshake_in(socket.MSG_DONTWAIT) or not self.flush():
            return False
        self._out = memoryview(encode(frame))
        self._flush(socket.MSG_DONTWAIT)
        return True

    def _handshake_in(self, flags: int) -> bool:
        """Whether the monitor's greeting and READY are in, reading for them (MSG_DONTWAIT:
        only what came). No frame goes before them: a libzmq end takes an earlier frame for
        a handshake command, and hangs up."""
        while not self._reader.ready:
            self.buffered()  # parses the handshake, and keeps a frame that came after it
            if not self._reader.ready and not self._read(flags):
                return False
        return True

    def flush(self) -> bool:
        """Send what is left of a message, as far as there is room: whether all of it went."""
        return self._flush(socket.MSG_DONTWAIT)

    def _flush(self, flags: int) -> bool:
        while self._out:
            try:
                done = self._sock.send(self._out, flags)
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError):
                raise ChannelClosed("the monitor closed the channel") from None
            self._out = self._out[done:]
        return True

    def wait(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` for the monitor to send or close (a refusal's last send)."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.poll(timeout_ms)

    def close(self) -> None:
        self._sock.close()
