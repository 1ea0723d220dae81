"""The device process main loop: adopt fds, connect the channel, serve accesses.

Runs the device model single-threaded: one frame at a time, in the order the
monitor sent them, so a posted write is always applied before a later read.
"""

from __future__ import annotations

import logging
import os
import signal

import zmq

from splitvmm.devprocs.base import REGISTRY, Device, DeviceContext
from splitvmm.devprocs.spec import DeviceSpec
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol import wire

log = logging.getLogger("splitvmm.dev")


def _writer(fd: int):
    def out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except OSError as e:  # the terminal or socket went away: drop output, keep serving
                log.warning("output fd closed (%s); discarding output", e.strerror)
                return
            view = view[n:]

    return out


def build_device(spec: DeviceSpec) -> Device:
    model = REGISTRY[spec.model]
    ctx = DeviceContext(irq=EventFd(spec.fds["irq"]))
    if "out" in spec.fds:
        ctx.out = _writer(spec.fds["out"])
    return model(ctx)


def serve(device: Device, sock: zmq.Socket) -> None:
    window = type(device).WINDOW
    while True:
        buf = sock.recv(copy=True)
        access = wire.decode_access(buf, window)
        if access.op == wire.Op.READ:
            sock.send(wire.encode_read_done(access.seq, device.read(access.offset, access.size)))
        elif access.op == wire.Op.WRITE:
            device.write(access.offset, access.data)
        elif access.op == wire.Op.SYNC:
            sock.send(wire.encode_sync_done(access.seq))
        else:
            device.host_input(access.data)


def run(spec: DeviceSpec) -> None:
    # The monitor's death must take us with it (no orphan holding guest RAM).
    from splitvmm.devprocs.prctl import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    logging.basicConfig(
        level=logging.WARNING, format=f"splitvmm: dev {spec.name}: %(levelname)s %(message)s"
    )
    device = build_device(spec)
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.channel)
    sock.send(wire.encode_ready())
    serve(device, sock)
