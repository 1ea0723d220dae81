"""The monitor's side of a PCI function (monitor/pci/function.py): placement, command-register
decode, BAR moves with their ioeventfds, and the writes it syncs, with a fake slot and VM."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.errors import ConfigError, KvmError
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.pci.bars import BarAllocator
from splitvmm.monitor.pci.function import PciFunctionHost, SharedDecode, place_bars
from splitvmm.monitor.pci.root import Ecam, PciRoot
from splitvmm.protocol.models import BarKind, PciBar, PciFunction, virtio_function
from splitvmm.ratelimit import RateLimitedLog

BAR0_BASE, BAR1_BASE = 0xC000_0000, 0xC000_4000
DEVICE = 1
ECAM_DEV = DEVICE << 15  # ECAM offset of 00:01.0
NOTIFY_FDS = (41,)
COMMAND_MEMORY = 0x0006  # memory space + bus master
COMMAND_INTX_DISABLE = 0x0400


class FakeSlot:
    """The device's flat window: records what reaches it."""

    name = "blk0"

    def __init__(self) -> None:
        self.log: list[tuple[str, int, bytes | int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("r", offset, size))
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, data))

    def sync(self) -> bool:
        self.log.append(("sync", 0, 0))
        return True


class FakeVm:
    """Records ioeventfd registrations as a set of live (fd, addr, length) and every call."""

    def __init__(self, refuse: bool = False, room: int | None = None) -> None:
        """`refuse`: every registration fails; `room`: those past `room` live ones do."""
        self.live: set[tuple[int, int, int]] = set()
        self.calls: list[tuple[str, int, int]] = []
        self.refuse = refuse
        self.room = room

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        if self.refuse or (self.room is not None and len(self.live) >= self.room):
            raise KvmError(17, "KVM_IOEVENTFD")
        self.calls.append(("assign", eventfd, addr))
        self.live.add((eventfd, addr, length))

    def unregister_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        self.calls.append(("deassign", eventfd, addr))
        self.live.remove((eventfd, addr, length))


class Function:
    """A virtio-shaped function at 00:01.0, its BARs at BAR0_BASE and BAR1_BASE; or, for a
    second one on the same bus, at `device` with `bases` (its own root: ECAM of its own)."""

    def __init__(
        self,
        vm: FakeVm | None = None,
        mmio: Bus | None = None,
        shared: SharedDecode | None = None,
        device: int = DEVICE,
        bases: tuple[int, int] = (BAR0_BASE, BAR1_BASE),
    ) -> None:
        self.vm, self.mmio, self.slot, self.root = (
            vm or FakeVm(),
            mmio or Bus("mmio"),
            FakeSlot(),
            PciRoot(),
        )
        self.device = device
        self.host = PciFunctionHost(
            f"blk{device}", virtio_function(1), (device, dict(enumerate(bases))), self.mmio,
            self.vm, NOTIFY_FDS, shared,
        )  # fmt: skip
        self.host.plug(self.root)
        self.host.bind(self.slot)
        self.ecam = Ecam(self.root)

    def config_write(self, offset: int, data: bytes) -> None:
        self.ecam.write((self.device << 15) + offset, data)

    def move_bar(self, index: int, base: int) -> None:
        self.config_write(0x10 + 4 * index, struct.pack("<I", base))


def test_function_preassigned_bars_decode_with_notify_ioeventfd_at_bar0_plus_0x3000() -> None:
    f = Function()
    assert (f.host.decoding(), f.vm.live) == (
        {0: BAR0_BASE, 1: BAR1_BASE},
        {(41, BAR0_BASE + 0x3000, 0)},
    )


def test_function_bar1_read_reaches_window_at_bar1_region_start() -> None:
    f = Function()
    f.mmio.read(BAR1_BASE + 8, 4)
    assert f.slot.log == [("r", 0x5008, 4)]


@pytest.mark.parametrize(
    ("size", "pieces"),
    [
        (3, [(0x5101, 2), (0x5103, 1)]),
        (6, [(0x5101, 4), (0x5105, 2)]),
        (7, [(0x5101, 4), (0x5105, 2), (0x5107, 1)]),
    ],
)
def test_function_odd_sized_mmio_access_reaches_the_device_in_pieces(size, pieces) -> None:
    """KVM passes MMIO accesses of any length up to 8 (a page-crossing access's fragments);
    the device channel takes 1, 2, 4 and 8 bytes (a 3-byte frame killed the device)."""
    f = Function()
    assert f.mmio.read(BAR1_BASE + 0x101, size) == bytes(size)
    f.mmio.write(BAR1_BASE + 0x101, bytes(range(size)))

    reads = [(off, n) for kind, off, n in f.slot.log if kind == "r"]
    writes = [(off, data) for kind, off, data in f.slot.log if kind == "w"]
    assert reads == pieces
    assert [(off, len(data)) for off, data in writes] == pieces
    assert b"".join(data for _, data in writes) == bytes(range(size))


def test_function_config_read_reaches_region_0_but_bar_registers_do_not() -> None:
    f = Function()
    f.ecam.read(ECAM_DEV + 0x00, 4)
    bar0 = f.ecam.read(ECAM_DEV + 0x10, 4)
    assert (f.slot.log, int.from_bytes(bar0, "little")) == ([("r", 0, 4)], BAR0_BASE)


def test_function_command_memory_off_removes_ranges_and_ioeventfds() -> None:
    f = Function()
    f.config_write(0x04, struct.pack("<H", 0x0004))  # bus master only
    assert (f.host.decoding(), f.vm.live, f.mmio.find(BAR0_BASE, 4)) == ({}, set(), None)


def test_function_command_memory_back_on_decodes_again() -> None:
    f = Function()
    f.config_write(0x04, b"\x00")
    f.config_write(0x04, struct.pack("<I", COMMAND_MEMORY))  # a dword: command and status
    assert (f.host.decoding(), f.vm.live) == (
        {0: BAR0_BASE, 1: BAR1_BASE},
        {(41, BAR0_BASE + 0x3000, 0)},
    )


def test_function_command_write_is_forwarded_to_the_device_too() -> None:
    f = Function()
    f.config_write(0x04, struct.pack("<H", COMMAND_MEMORY))
    assert ("w", 0x04, struct.pack("<H", COMMAND_MEMORY)) in f.slot.log


def test_function_status_byte_write_leaves_decode_alone() -> None:
    f = Function()
    f.config_write(0x06, b"\x00")
    assert f.host.decoding() == {0: BAR0_BASE, 1: BAR1_BASE}


def test_function_bar0_move_reregisters_notify_ioeventfd_at_new_base() -> None:
    f = Function()
    f.move_bar(0, 0xD000_0000)
    assert (f.vm.calls[-2:], f.vm.live, f.mmio.find(BAR0_BASE, 4)) == (
        [("deassign", 41, BAR0_BASE + 0x3000), ("assign", 41, 0xD000_3000)],
        {(41, 0xD000_3000, 0)},
        None,
    )


def test_function_moved_bar_forwards_from_its_new_base() -> None:
    f = Function()
    f.move_bar(1, 0xD000_0000)
    f.mmio.write(0xD000_0010, b"\x01\x00\x00\x00")
    assert f.slot.log[-2:] == [("w", 0x5010, b"\x01\x00\x00\x00"), ("sync", 0, 0)]


def test_function_bar_moved_while_memory_off_decodes_only_once_enabled() -> None:
    f = Function()
    f.config_write(0x04, b"\x00")
    f.move_bar(0, 0xD000_0000)
    before = f.host.decoding()
    f.config_write(0x04, b"\x02")
    assert (before, f.host.decoding()[0], f.vm.live) == (
        {},
        0xD000_0000,
        {(41, 0xD000_3000, 0)},
    )


def test_function_bar_moved_onto_another_range_is_left_undecoded() -> None:
    f = Function()
    f.move_bar(0, BAR1_BASE)  # onto its own BAR 1: overlap
    assert (f.host.decoding(), f.vm.live) == ({1: BAR1_BASE}, set())


def test_function_bar_moved_off_an_overlap_decodes_again() -> None:
    f = Function()
    f.move_bar(0, BAR1_BASE)
    f.move_bar(0, 0xD000_0000)
    assert (f.host.decoding()[0], f.vm.live) == (0xD000_0000, {(41, 0xD000_3000, 0)})


def test_function_bars_swapped_with_decode_on_both_decode_at_their_new_bases() -> None:
    """PCI 3.0 6.2.2/6.2.5.1: with Memory Space on, a BAR decodes where it holds. BAR 1's
    move onto BAR 0's range is refused while BAR 0 is there; once BAR 0 moves away, the
    range is free and BAR 1 decodes (it used to stay dead until it moved again)."""
    f = Function()
    f.move_bar(1, BAR0_BASE)  # refused: BAR 0 is there
    assert f.host.decoding() == {0: BAR0_BASE}
    f.move_bar(0, 0xD000_0000)
    assert (f.host.decoding(), f.vm.live) == (
        {0: 0xD000_0000, 1: BAR0_BASE},
        {(41, 0xD000_3000, 0)},
    )
    assert f.mmio.find(BAR0_BASE + 8, 4) is not None


def test_function_bar_waiting_for_another_functions_range_decodes_once_it_is_free() -> None:
    mmio, shared = Bus("mmio"), SharedDecode()
    a = Function(mmio=mmio, shared=shared)
    b = Function(mmio=mmio, shared=shared, device=2, bases=(0xC001_0000, 0xC001_4000))
    a.move_bar(0, 0xC001_0000)  # onto b's BAR 0: refused
    assert a.host.decoding() == {1: BAR1_BASE}
    b.config_write(0x04, b"\x04")  # b's memory decode off gives its ranges up
    assert (a.host.decoding(), b.host.decoding()) == ({0: 0xC001_0000, 1: BAR1_BASE}, {})
    b.config_write(0x04, b"\x06")  # b's BAR 0 is in conflict now, its BAR 1 is not
    assert b.host.decoding() == {1: 0xC001_4000}


def test_function_bar_still_in_conflict_after_a_retry_is_not_logged_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RateLimitedLog, "INTERVAL_S", 0.0)  # every warning gets through
    mmio, shared = Bus("mmio"), SharedDecode()
    a = Function(mmio=mmio, shared=shared)
    b = Function(mmio=mmio, shared=shared, device=2, bases=(0xC001_0000, 0xC001_4000))
    a.move_bar(0, 0xC001_0000)  # onto b's BAR 0: refused, logged
    b.move_bar(1, 0xD000_0000)  # a range given up: a's BAR 0 is tried again, in vain
    overlaps = [r for r in caplog.records if "left undecoded" in r.getMessage()]
    assert (len(overlaps), a.host.decoding()) == (1, {1: BAR1_BASE})


def test_function_ioeventfd_refused_leaves_bar_undecoded_without_bus_range() -> None:
    f = Function(vm=FakeVm(refuse=True))
    assert (f.host.decoding(), f.mmio.find(BAR0_BASE, 4) is None) == ({1: BAR1_BASE}, True)


def test_function_ioeventfd_refused_for_a_later_queue_unregisters_the_earlier_ones() -> None:
    """An undecoded BAR keeps no ioeventfd: one left at its notify address would signal the
    queue for writes to whatever decodes there later, and block the BAR's next decode."""
    vm = FakeVm(room=1)
    host = PciFunctionHost(
        "blk0", virtio_function(2), (1, {0: BAR0_BASE, 1: BAR1_BASE}), Bus("mmio"), vm, (41, 42)
    )
    assert (host.decoding(), vm.live) == ({1: BAR1_BASE}, set())


def test_function_write_to_common_cfg_is_followed_by_sync() -> None:
    f = Function()
    f.mmio.write(BAR0_BASE + 0x14, b"\x0f")  # device_status
    assert f.slot.log == [("w", 0x1014, b"\x0f"), ("sync", 0, 0)]


def test_function_write_to_device_cfg_stays_posted() -> None:
    f = Function()
    f.mmio.write(BAR0_BASE + 0x2000, b"\x01")
    assert f.slot.log == [("w", 0x3000, b"\x01")]


def test_function_config_space_write_is_followed_by_sync() -> None:
    f = Function()
    f.config_write(0x42, b"\x80\x00")  # an MSI-X message control, say
    assert f.slot.log == [("w", 0x42, b"\x80\x00"), ("sync", 0, 0)]


def test_function_wrong_notify_fd_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="blk0: 2 notify fds for 1 queues"):
        PciFunctionHost(
            "blk0", virtio_function(1), (1, {0: 0, 1: 0x4000}), Bus("mmio"), FakeVm(), (1, 2)
        )


def test_function_unbound_reads_all_ones() -> None:
    host = PciFunctionHost(
        "blk0", virtio_function(1), (1, {0: BAR0_BASE, 1: BAR1_BASE}), Bus("mmio"), FakeVm(), (7,)
    )
    assert host.read(0, 2) == b"\xff\xff"


def test_place_bars_largest_first_each_aligned_to_its_size() -> None:
    window = BarAllocator(0xC000_0000, 0xE000_0000, "test")
    function = PciFunction(bars=(PciBar(0, 0x1000), PciBar(1, 0x4000)))
    assert place_bars("d", function, window) == {1: 0xC000_0000, 0: 0xC000_4000}


def test_place_bars_mem64_is_refused_naming_device_and_bar() -> None:
    function = PciFunction(bars=(PciBar(0, 0x4000, BarKind.MEM64),))
    with pytest.raises(ConfigError, match="device d: BAR 0 is a mem64 BAR"):
        place_bars("d", function, BarAllocator(0xC000_0000, 0xE000_0000, "test"))


def test_virtio_function_sync_ranges_cover_config_bar1_and_common_cfg() -> None:
    assert virtio_function(1).sync_ranges() == ((0, 0x1000), (0x5000, 0x6000), (0x1000, 0x2000))


# -- any sequence of a guest's BAR and command writes (hypothesis) ---------------------------
class StrictVm(FakeVm):
    """KVM's rule on top: a second ioeventfd on an address already taken is refused
    (EEXIST), as the kernel refuses it."""

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None = None
    ) -> None:
        if any(at == addr for _, at, _ in self.live):
            raise KvmError(17, "KVM_IOEVENTFD")
        super().register_ioeventfd(eventfd, addr, length, pio, datamatch)


MEM64_FUNCTION = PciFunction(
    bars=(PciBar(0, 0x4000, BarKind.MEM64), PciBar(2, 0x1000)),
    notify=virtio_function(1).notify,
)
# Three functions on one MMIO bus, each with its own notify eventfds: two virtio ones at
# devices 1 and 2, one with a 64-bit BAR at device 3; bases as place_bars would give them.
FUZZED = (
    (1, virtio_function(2), {0: 0xC000_0000, 1: 0xC000_4000}, (41, 42)),
    (2, virtio_function(1), {0: 0xC001_0000, 1: 0xC001_4000}, (51,)),
    (3, MEM64_FUNCTION, {0: 0xC002_0000, 2: 0xC002_4000}, (61,)),
)
# where a guest puts a BAR: onto another's base or into it, its own, anywhere, all-ones
BAR_VALUES = st.sampled_from(
    [0xC000_0000, 0xC000_4000, 0xC001_0000, 0xC001_2000, 0xC002_0000, 0xC002_4000, 0xFFFF_FFFF]
) | st.integers(0, 0xFFFF_FFFF)
CONFIG_WRITE = st.tuples(
    st.integers(1, 3),  # the device
    st.sampled_from([0x04, 0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24]).flatmap(
        lambda at: st.tuples(st.integers(at, at + 3), st.sampled_from([1, 2, 4]))
    ),
    BAR_VALUES,
)


def bar_ranges(host: PciFunctionHost, function: PciFunction) -> dict[int, tuple[int, int]]:
    """BAR index -> (base, end) where its registers say it is."""
    return {bar.index: (host.bars.base(bar.index), host.bars.base(bar.index) + bar.size)
            for bar in function.bars}  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(CONFIG_WRITE, max_size=40))
def test_function_decode_follows_any_sequence_of_bar_and_command_writes(writes) -> None:
    """Whatever a guest writes to BARs and command registers, in any order and size: the MMIO
    bus and the ioeventfds are exactly those of the BARs that decode; a BAR decodes where its
    registers say, with its space enabled; and one that should but does not is in conflict
    with one that does (it decodes again once that one moves: the module docstring)."""
    vm, mmio, shared, root = StrictVm(), Bus("mmio"), SharedDecode(), PciRoot()
    hosts = {}
    for device, function, bases, fds in FUZZED:
        host = PciFunctionHost(f"dev{device}", function, (device, bases), mmio, vm, fds, shared)
        host.plug(root)
        host.bind(FakeSlot())
        hosts[device] = (host, function, fds)
    ecam = Ecam(root)

    for device, (offset, size), value in writes:
        if offset + size > (offset & ~3) + 4:
            size = 4 - (offset & 3)  # an access inside its dword, as config mechanism #1 has
        ecam.write(
            (device << 15) + offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        )

        decoding = {(d, i): r for d, (h, f, _) in hosts.items()
                    for i, r in bar_ranges(h, f).items() if i in h.decoding()}  # fmt: skip
        notify = set()
        for d, (host, function, fds) in hosts.items():
            memory_on = bool(host.command & 0x2)
            for index, (base, end) in bar_ranges(host, function).items():
                decodes = index in host.decoding()
                assert not decodes or (host.decoding()[index] == base and memory_on)
                if decodes:
                    assert mmio.find(base, 1) is not None and mmio.find(end - 1, 1) is not None
                elif memory_on:
                    assert any(
                        b < end and base < e
                        for (od, oi), (b, e) in decoding.items()
                        if (od, oi) != (d, index)
                    ), f"dev{d} BAR {index} at {base:#x} decodes nothing, and nothing is in its way"
            if function.notify is not None and function.notify.bar in host.decoding():
                base = host.decoding()[function.notify.bar]
                notify |= {(fd, base + 0x3000 + 4 * q, 0) for q, fd in enumerate(fds)}
        assert vm.live == notify
        ranges = sorted(decoding.values())
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # no overlap


def test_function_command_keeps_interrupt_disable_through_a_snapshot() -> None:
    """The bits a snapshot saves (pci/state.py): a restored VM's device left dead must not
    raise an INTx its guest had disabled (pci/intx.py)."""
    f, restored = Function(), Function()
    f.config_write(4, (COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_bytes(2, "little"))
    restored.host.restore(f.host.bars.registers(), f.host.command)
    assert restored.host.command == 0x2 | COMMAND_INTX_DISABLE  # memory space, no I/O
