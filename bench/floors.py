"""This machine's floors, measured in the same run as our figures.

- a bare Python KVM_RUN loop: a real-mode guest doing `in`/`out` to a port
  nobody serves, answered inline by the loop (no bus, no device, no IPC);
- the same loop running the firmware-serial guest (bench/serial.py): every UART access
  answered inline, with or without KVM holding the THR writes in its coalesced ring (what
  write-behind costs at the least: monitor/writebehind.py);
- a raw pyzmq PAIR round trip over ipc:// between two processes, and the same with both
  ends UNIX sockets read and written directly in ZMTP (the device channel's transport:
  protocol/zmtp.py; the echo is the device's own end, devprocs/channel.py);
- a pipe round trip between two processes, one byte each way, nothing but two wake-ups:
  with both on one CPU, and on two. What a wake-up costs here depends on whether the woken
  process runs on another CPU (an idle CPU of this VM must be woken by the hypervisor) or on
  the waker's, and a ZeroMQ round trip is several such hops (each side's application thread
  and its I/O thread), so the zmq floor moves with the cross-CPU one from hour to hour.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import zmq

from splitvmm.devprocs.channel import Channel
from splitvmm.native.exits import PioIn, PioOut
from splitvmm.native.kvm import Kvm
from splitvmm.native.mem import mapping_address
from splitvmm.protocol import zmtp
from splitvmm.protocol.polling import PollWindow

# Real mode at 0x1000 (CS base 0): 1: in $0x80,%al; out %al,$0x81; jmp 1b
LOOP_CODE = bytes([0xE4, 0x80, 0xE6, 0x81, 0xEB, 0xFA])

COM1 = 0x3F8  # THR (DLL while LCR.DLAB is set)
COM1_LCR, COM1_LSR = COM1 + 3, COM1 + 5
LCR_DLAB = 0x80
LSR_IDLE = b"\x60"  # THRE and TEMT: a line that keeps up, so each byte takes one LSR read
DEBUG_EXIT_PORT = 0xF4  # tests/guests: the firmware guests' last write
LOW_MEMORY = 1 << 20  # real mode's reach; a firmware image's alias ends here (QEMU -bios)


def kvm_run_floor(exits: int) -> list[float]:
    """Seconds per exit of a Python KVM_RUN loop that answers each exit inline."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        ram = mmap.mmap(-1, 0x10000)
        ram[0x1000 : 0x1000 + len(LOOP_CODE)] = LOOP_CODE
        vm.set_user_memory_region(0, 0, len(ram), mapping_address(ram))
        vcpu = vm.create_vcpu(0, kvm.vcpu_mmap_size())
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = 0x1000, 2
        vcpu.set_regs(regs)
        samples = []
        for _ in range(exits):
            t0 = time.perf_counter()
            ex = vcpu.run()
            if type(ex) is PioIn:
                vcpu.complete_read(b"\xff")
            elif type(ex) is not PioOut:
                raise RuntimeError(f"floor guest exited with {ex!r}")
            samples.append(time.perf_counter() - t0)
        vcpu.close()
        vm.close()
        ram.close()
    return samples


def serial_guest_floor(image: bytes, hold_thr: bool) -> bytes:
    """What firmware-serial (bench/serial.py) writes to COM1, run by a bare Python KVM_RUN loop
    that answers every access inline: LSR reads THRE and TEMT, other reads 0, THR writes are
    the output. With hold_thr, KVM holds the THR writes in its coalesced ring from the first
    LSR read on (after the guest's set-up, whose DLL write goes to the same port: from then on
    every write there is taken as output, DLAB or not), and the loop takes them from the ring
    at every exit: the least a monitor with write-behind does per byte. The image (64 KiB) is mapped at the top of 4 GiB and aliased below 1 MiB, where
    the reset vector finds it (monitor/loader.py load_firmware)."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        low = mmap.mmap(-1, LOW_MEMORY)
        low[LOW_MEMORY - len(image) :] = image
        top = mmap.mmap(-1, len(image))
        top[:] = image
        vm.set_user_memory_region(0, 0, len(low), mapping_address(low))
        vm.set_user_memory_region(1, (1 << 32) - len(image), len(top), mapping_address(top))
        vcpu = vm.create_vcpu(0, kvm.vcpu_mmap_size())
        page = vm.coalesced_pio_page() if hold_thr else 0
        if hold_thr and not page:
            raise RuntimeError("KVM here holds no port writes (no KVM_CAP_COALESCED_PIO)")
        ring = None
        out, dlab = bytearray(), False
        try:
            while True:
                ex = vcpu.run()
                if ring is not None and ring.pending():
                    out += b"".join(data for _, data in ring.take())
                if type(ex) is PioIn:
                    port, size, count = ex
                    if port == COM1_LSR and page and ring is None:
                        vm.register_coalesced_pio(COM1, 1)
                        ring = vcpu.coalesced_ring(page)
                    vcpu.complete_read(LSR_IDLE if port == COM1_LSR else bytes(size * count))
                elif type(ex) is PioOut:
                    port, _, data = ex
                    if port == DEBUG_EXIT_PORT:
                        return bytes(out)
                    if port == COM1_LCR:
                        dlab = bool(data[0] & LCR_DLAB)
                    elif port == COM1 and not dlab:
                        out += data
                else:
                    raise RuntimeError(f"firmware-serial exited with {ex!r}")
        finally:
            vcpu.close()
            vm.close()
            low.close()
            top.close()


def pipe_pair_floor(round_trips: int, cpus: tuple[int, int]) -> list[float]:
    """Seconds per one-byte round trip through two pipes to a forked child and back, this
    process on cpus[0] and the child on cpus[1] (the same CPU twice: no cross-CPU wake-up).
    Each side closes the other's ends, so either one's end is the other's EOF."""
    allowed = os.sched_getaffinity(0)
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = -1
    try:
        os.sched_setaffinity(0, {cpus[0]})
        pid = os.fork()
        if pid == 0:
            _pipe_echo(to_child, from_child, from_parent, to_parent, cpus[1])
        os.close(to_child)
        os.close(from_child)
        to_child = from_child = -1
        samples = []
        os.write(from_parent, b"x")
        if os.read(to_parent, 1) != b"x":  # the child runs and is warm
            raise RuntimeError("the pipe floor's child ended before it answered")
        for _ in range(round_trips):
            t0 = time.perf_counter()
            os.write(from_parent, b"x")
            if not os.read(to_parent, 1):
                raise RuntimeError("the pipe floor's child ended")
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        for fd in (to_child, from_parent, to_parent, from_child):
            if fd >= 0:
                os.close(fd)
        if pid > 0:
            os.waitpid(pid, 0)
        os.sched_setaffinity(0, allowed)


def _pipe_echo(
    read_fd: int, write_fd: int, parents_write: int, parents_read: int, cpu: int
) -> None:
    """The forked child: echo each byte until the parent's end closes (EOF), then exit."""
    code = 1
    try:
        os.close(parents_write)
        os.close(parents_read)
        os.sched_setaffinity(0, {cpu})
        while byte := os.read(read_fd, 1):
            os.write(write_fd, byte)
        code = 0
    finally:
        os._exit(code)


def two_cpus() -> tuple[int, int] | None:
    """Two CPUs this process may run on, or None on a one-CPU host."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) > 1 else None


def _echo(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(endpoint)
    for _ in range(n):
        sock.send(sock.recv())
    sock.close()
    ctx.term()


def _channel_echo(endpoint: str, n: int, poll_ns: int) -> None:
    channel = Channel.connect(endpoint, 1 << 16, timeout_s=10, poll_ns=poll_ns)
    for _ in range(n):
        channel.send(channel.recv())
    channel.close()


def _timed(round_trip: Callable[[], None], count: int) -> list[float]:
    """Seconds each of `count` round trips took, after one untimed (connected and warm)."""
    round_trip()
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        round_trip()
        samples.append(time.perf_counter() - t0)
    return samples


def zmq_pair_floor(round_trips: int) -> list[float]:
    """Seconds per 24-byte round trip on a ZeroMQ PAIR over ipc:// to another process."""
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/floor.sock"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.bind(endpoint)
        peer = multiprocessing.get_context("spawn").Process(
            target=_echo, args=(endpoint, round_trips + 1)
        )
        peer.start()
        frame = bytes(24)

        def round_trip() -> None:
            sock.send(frame)
            sock.recv()

        samples = _timed(round_trip, round_trips)
        peer.join()
        sock.close()
        ctx.term()
    return samples


def zmtp_socket_floor(round_trips: int, poll_ns: int = 0) -> list[float]:
    """Seconds per 24-byte round trip between a UNIX socket read and written directly, in
    ZMTP (protocol/zmtp.py), and a device's end of its channel (devprocs/channel.py) in
    another process echoing each frame: the device channel's transport, with nothing of the
    channel on top. With `poll_ns`, each end waits as the channel's do (protocol/polling.py):
    looking for the frame through a window of up to that long before it sleeps."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/floor.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        peer = multiprocessing.get_context("spawn").Process(
            target=_channel_echo, args=(f"ipc://{path}", round_trips + 1, poll_ns)
        )
        peer.start()
        conn, _ = listener.accept()
        listener.close()
        fd, reader = conn.fileno(), zmtp.ZmtpReader(1 << 16)
        os.write(fd, zmtp.HANDSHAKE)
        message = zmtp.encode(bytes(24))

        def read_more() -> None:
            data = os.read(fd, zmtp.CHUNK)
            if not data:
                raise RuntimeError("the floor's peer hung up")
            reader.feed(data)

        window = PollWindow(poll_ns)

        def whole() -> bool:  # a frame read, reading what came (never waiting)
            if reader.next() is not None:
                return True
            try:
                reader.feed(conn.recv(zmtp.CHUNK, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return False
            return reader.next() is not None

        def read_frame() -> None:
            if window.poll(whole):
                return
            while reader.next() is None:
                read_more()
            window.woke()

        while reader.next() is None and not reader.ready:  # nothing goes before its READY
            read_more()

        def round_trip() -> None:
            os.write(fd, message)
            read_frame()

        samples = _timed(round_trip, round_trips)
        peer.join()
        conn.close()
    return samples


def summary_us(samples: list[float]) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99) - 1] * 1e6
