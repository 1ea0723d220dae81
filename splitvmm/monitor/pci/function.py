"""A PCI function whose device process serves it: where it sits, and what decodes when.

The device process serves the function's configuration space and its BARs' registers over
one flat window (protocol/models.py PciFunction); the monitor keeps what moves bus ranges
and what the guest may not be trusted with:

- the BAR registers (bars.py BarDecoder): placement and moves;
- the command register's memory and I/O space enables, snooped from the config writes it
  forwards (the device serves the register's readback): a BAR decodes -- its range on the
  MMIO bus and the ioeventfds on its queue notify addresses are in place -- only while
  its space is enabled. Functions start enabled with their BARs pre-assigned (crosvm and
  Firecracker do the same): a guest without firmware (a direct Linux boot, our test
  guests) finds the BARs usable at once; Linux turns decode off while it sizes a BAR and
  back on after, which this follows. Its Interrupt Disable too, and the reads of its BARs,
  for the INTx of a device left dead (intx.py);
- the ioeventfds: a guest write to a queue's notify address signals the device's eventfd
  inside KVM and costs the monitor nothing;
- the writes a vCPU must wait for (PciFunction.sync_writes): a sync follows them, during
  which the device's interrupt route requests are served (monitor/slot.py).

A guest may move a BAR onto another device's range: the new range is refused (logged,
rate-limited) and the BAR decodes nothing while the conflict lasts; the VM runs on. As a
decoder would, it decodes again once the range is free: every function on the MMIO bus
shares one SharedDecode, and whenever a BAR gives up a range, each BAR left undecoded is
tried again. So the order of BAR writes (a guest swapping two BARs with decode on, as Linux
writes a 32-bit BAR) and of a snapshot's functions being restored (each into a VM whose
BARs sit at their first bases) does not decide what decodes in the end.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

from splitvmm.errors import ConfigError, KvmError
from splitvmm.monitor.bus import Bus, BusError
from splitvmm.monitor.pci.bars import BarAllocator, BarDecoder, FunctionWithBars
from splitvmm.monitor.pci.config import COMMAND
from splitvmm.monitor.pci.intx import LeftIntx
from splitvmm.monitor.pci.root import PciRoot
from splitvmm.protocol.models import CONFIG_REGION_SIZE, BarKind, PciBar, PciFunction
from splitvmm.protocol.wire import ACCESS_SIZES
from splitvmm.ratelimit import RateLimitedLog
from splitvmm.record import Struct

log = logging.getLogger("splitvmm.pci")

# Command register (PCI Local Bus 3.0 6.2.2): the bits the monitor keeps.
COMMAND_IO_SPACE = 0x1
COMMAND_MEMORY_SPACE = 0x2
COMMAND_INTX_DISABLE = 0x400
COMMAND_KEPT = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_INTX_DISABLE
FUNCTION = 0  # every device is single-function
# An ioeventfd of length 0 matches a write of any size (KVM_CAP_IOEVENTFD_ANY_LENGTH).
ANY_LENGTH = 0


class FunctionTarget(Protocol):
    """Who serves the function's window: the device's slot (monitor/slot.py)."""

    name: str

    def read(self, offset: int, size: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def sync(self) -> bool: ...


class IoEventFds(Protocol):
    """The VM's ioeventfd registration (native/kvm.py VmFd)."""

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None: ...
    def unregister_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None: ...


def place_bars(name: str, function: PciFunction, allocator: BarAllocator) -> dict[int, int]:
    """Each BAR's first base, from the 32-bit PCI window."""
    for bar in function.bars:
        if bar.kind is not BarKind.MEM32:
            raise ConfigError(
                f"device {name}: BAR {bar.index} is a {bar.kind.value} BAR; only 32-bit "
                "memory BARs can be placed yet"
            )
    # Largest first: each BAR is aligned to its size, so this wastes no room between them.
    ordered = sorted(function.bars, key=lambda b: (-b.size, b.index))
    return {bar.index: allocator.allocate(bar.size) for bar in ordered}


class SharedDecode:
    """The functions whose BARs share one MMIO bus: one lock for every decode change among
    them (rare: a guest's BAR or command write), and a retry of the BARs left undecoded
    once a range is given up (the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hosts: list[PciFunctionHost] = []

    def retry_locked(self) -> None:
        for host in self.hosts:
            host.retry_undecoded_locked()


class _Decoding(Struct, frozen=True):
    """Where a BAR decodes now: its bus range, and the notify addresses registered."""

    base: int
    notify: tuple[tuple[int, int], ...]  # (eventfd, address)


class PciFunctionHost:
    """The monitor's side of one PCI function on bus 0 (the module docstring)."""

    def __init__(
        self,
        name: str,
        function: PciFunction,
        placement: tuple[int, Mapping[int, int]],
        mmio: Bus,
        vm: IoEventFds,
        notify_fds: Sequence[int] = (),
        shared: SharedDecode | None = None,
    ) -> None:
        """`placement`: (PCI device number, BAR index -> first base); `notify_fds`: queue
        q's ioeventfd at index q; `shared`: that of every function on `mmio` (None: this
        function is the only one)."""
        self.name = name
        self.device, bases = placement
        self.function = function
        self._mmio, self._vm = mmio, vm
        self._notify_fds = tuple(notify_fds)
        if function.notify is not None and len(self._notify_fds) != function.notify.queues:
            raise ConfigError(
                f"device {name}: {len(self._notify_fds)} notify fds for "
                f"{function.notify.queues} queues"
            )
        self._target: FunctionTarget | None = None
        self._left: LeftIntx | None = None  # its INTx, once its device is left dead
        self._sync = function.sync_ranges()
        self._bars = {bar.index: bar for bar in function.bars}
        self._windows = {
            bar.index: BarWindow(self, bar.index, function.region_of_bar(bar.index).start)
            for bar in function.bars
        }
        self._shared = shared or SharedDecode()
        self._lock = self._shared.lock  # one decode change at a time, whichever vCPU
        # Pre-assigned BARs decode from the start (the module docstring).
        self._command = COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE
        self._decoding: dict[int, _Decoding] = {}
        self._refusals = RateLimitedLog(log)
        self.bars = BarDecoder(name, function.bars, bases, self._on_move)
        self.config = FunctionWithBars(_ConfigProxy(self), self.bars)
        with self._lock:
            self._shared.hosts.append(self)
            for index in self._bars:
                self._update_locked(index)

    def plug(self, root: PciRoot) -> None:
        root.add(self.device, FUNCTION, self.config)

    def bind(self, target: FunctionTarget) -> None:
        """The slot that serves the function from now on (before any vCPU runs)."""
        self._target = target

    def leave(self, intx: LeftIntx) -> None:
        """Its device is left dead: `intx` drives its INTx line from now on (intx.py)."""
        with self._lock:  # told under the lock: a command write meanwhile comes after it
            self._left = intx
            intx.set_enabled(not self._command & COMMAND_INTX_DISABLE)

    def decoding(self) -> dict[int, int]:
        """BAR index -> the base it decodes at now (BARs that decode nothing are left out)."""
        with self._lock:
            return {index: d.base for index, d in self._decoding.items()}

    # -- forwarding ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """A read at `offset` of the flat window."""
        target, left = self._target, self._left
        if left is not None and offset >= CONFIG_REGION_SIZE:
            left.looked()  # a BAR's register: the driver sees its device failed
        return b"\xff" * size if target is None else target.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """A write at `offset` of the flat window; synced if the descriptor says so."""
        target = self._target
        if target is None:
            return
        target.write(offset, data)
        if any(start <= offset < end for start, end in self._sync):
            target.sync()

    @property
    def command(self) -> int:
        """The command bits the monitor keeps (a snapshot's record of them)."""
        with self._lock:
            return self._command

    def restore(self, bars: tuple[int, ...], command: int) -> None:
        """BARs and enables from a snapshot (monitor/pci/state.py), before any vCPU runs."""
        self.bars.load(bars)
        self.command_written(command)

    def command_written(self, value: int, written: int = 0xFFFF) -> None:
        """The guest wrote the command register's bits in `written` (a byte of it may be
        written alone): follow its decode enables and Interrupt Disable."""
        with self._lock:
            self._command = (self._command & ~written | value & written) & COMMAND_KEPT
            for index in self._bars:
                self._update_locked(index)
            if self._left is not None:  # in the order of the writes, as leave() (intx.py)
                self._left.set_enabled(not self._command & COMMAND_INTX_DISABLE)

    # -- decode -------------------------------------------------------------------------------
    def _on_move(self, index: int, old: int, new: int) -> None:
        with self._lock:
            self._update_locked(index)

    def _enabled(self, bar: PciBar) -> bool:
        bit = COMMAND_IO_SPACE if bar.kind is BarKind.IO else COMMAND_MEMORY_SPACE
        return bool(self._command & bit)

    def _update_locked(self, index: int) -> None:
        """Make BAR `index` decode where its register says, if its space is enabled."""
        bar = self._bars[index]
        want = self.bars.base(index) if self._enabled(bar) else None
        have = self._decoding.get(index)
        if have is not None and have.base == want:
            return
        if have is not None:
            self._undecode_locked(index, have)
        if want is not None:
            self._decode_locked(index, want)
        if have is not None:
            self._shared.retry_locked()  # a range was given up: it may be what one waited for

    def retry_undecoded_locked(self) -> None:
        """Decode each BAR that should (its space enabled) but does not, where it can now;
        a BAR still in conflict is left as it was, without a second warning."""
        for index, bar in self._bars.items():
            if index not in self._decoding and self._enabled(bar):
                self._decode_locked(index, self.bars.base(index), warn=False)

    def _decode_locked(self, index: int, base: int, warn: bool = True) -> None:
        bar, window = self._bars[index], self._windows[index]
        try:
            self._mmio.insert(base, bar.size, window)
        except BusError as e:
            if warn:
                self._refusals.warning(
                    "overlap", "device %s: BAR %d left undecoded: %s", self.name, index, e
                )
            return
        done: list[tuple[int, int]] = []
        try:
            for fd, addr in self._notify_addresses(index, base):
                self._vm.register_ioeventfd(fd, addr, ANY_LENGTH, pio=False)
                done.append((fd, addr))
        except KvmError as e:
            self._unregister(done)
            self._mmio.remove(base, window)
            if warn:
                self._refusals.warning(
                    "ioeventfd", "device %s: BAR %d left undecoded: %s", self.name, index, e
                )
            return
        self._decoding[index] = _Decoding(base, tuple(done))

    def _undecode_locked(self, index: int, have: _Decoding) -> None:
        self._unregister(have.notify)
        self._mmio.remove(have.base, self._windows[index])
        del self._decoding[index]

    def _unregister(self, notify: Sequence[tuple[int, int]]) -> None:
        for fd, addr in notify:
            self._vm.unregister_ioeventfd(fd, addr, ANY_LENGTH, pio=False)

    def _notify_addresses(self, index: int, base: int) -> list[tuple[int, int]]:
        notify = self.function.notify
        if notify is None or notify.bar != index:
            return []
        return [
            (fd, base + notify.offset + q * notify.multiplier)
            for q, fd in enumerate(self._notify_fds)
        ]


class BarWindow:
    """BAR `index` on the MMIO bus: an access at its base + off reaches the window there.

    KVM hands over MMIO accesses of any length up to 8 (the fragments of one that crosses a
    page, a 6-byte far pointer), and the device channel takes 1, 2, 4 and 8 bytes
    (protocol/wire.py): any other length goes as its pieces, largest first, as QEMU's
    access_with_adjusted_size splits them. A 3-byte frame killed the device process, and
    its restart replayed the same frame."""

    def __init__(self, host: PciFunctionHost, index: int, start: int) -> None:
        self.name = f"{host.name} BAR {index}"
        self._host, self._start = host, start

    def read(self, offset: int, size: int) -> bytes:
        if size in ACCESS_SIZES:
            return self._host.read(self._start + offset, size)
        return b"".join(self._host.read(self._start + at, n) for at, n in _pieces(offset, size))

    def write(self, offset: int, data: bytes) -> None:
        if len(data) in ACCESS_SIZES:
            self._host.write(self._start + offset, data)
            return
        for at, n in _pieces(offset, len(data)):
            self._host.write(self._start + at, data[at - offset : at - offset + n])


def _pieces(offset: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of 4, 2 and 1 bytes that make up an access of `size`."""
    pieces = []
    while size:
        n = 4 if size >= 4 else 2 if size >= 2 else 1
        pieces.append((offset, n))
        offset, size = offset + n, size - n
    return pieces


class _ConfigProxy:
    """The function's configuration space (region 0 of its window), but for the BARs
    (FunctionWithBars answers those): forwarded, with the command register snooped."""

    def __init__(self, host: PciFunctionHost) -> None:
        self.name = host.name
        self._host = host

    def config_read(self, offset: int, size: int) -> bytes:
        return self._host.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self._host.write(offset, data)  # the device serves the register's readback
        # The bytes of the 16-bit register this write covers (either may be written alone)
        start, end = max(offset, COMMAND), min(offset + len(data), COMMAND + 2)
        if start < end:
            shift = 8 * (start - COMMAND)
            value = int.from_bytes(data[start - offset : end - offset], "little") << shift
            self._host.command_written(value, ((1 << 8 * (end - start)) - 1) << shift)
