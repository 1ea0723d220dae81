"""The PCI root: mechanism #1 and ECAM against the PCI specs, BAR sizing with a fake function."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor.pci.bars import BarAllocator, BarDecoder, FunctionWithBars
from splitvmm.monitor.pci.config import HostBridge
from splitvmm.monitor.pci.root import ConfigPorts, Ecam, PciRoot, device_numbers
from splitvmm.protocol.models import BarKind, PciBar

ENABLE = 1 << 31
DATA = 4  # 0xCFC within the 0xCF8 window


def cf8(bus: int, device: int, function: int, register: int) -> bytes:
    return struct.pack("<I", ENABLE | bus << 16 | device << 11 | function << 8 | register)


def u32(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


class FakeFunction:
    """A device-served config space: a 4 KiB scratch area that records every access."""

    name = "fake"

    def __init__(self) -> None:
        self.space = bytearray(4096)
        self.space[0:4] = struct.pack("<HH", 0x1AF4, 0x1042)
        self.accesses: list[tuple[str, int, int]] = []

    def config_read(self, offset: int, size: int) -> bytes:
        self.accesses.append(("r", offset, size))
        return bytes(self.space[offset : offset + size])

    def config_write(self, offset: int, data: bytes) -> None:
        self.accesses.append(("w", offset, len(data)))
        self.space[offset : offset + len(data)] = data


@pytest.fixture
def ports() -> ConfigPorts:
    return ConfigPorts(PciRoot())


def ports_with_fake_at(device: int) -> tuple[ConfigPorts, FakeFunction]:
    root, fake = PciRoot(), FakeFunction()
    root.add(device, 0, fake)
    return ConfigPorts(root), fake


def test_config_ports_host_bridge_dword_reads_intel_ids(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 0, 0, 0))
    assert u32(ports.read(DATA, 4)) == 0x1237_8086


def test_config_ports_host_bridge_class_is_host_bridge_header_type_0(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 0, 0, 0x08))
    assert u32(ports.read(DATA, 4)) >> 8 == 0x060000
    ports.write(0, cf8(0, 0, 0, 0x0C))
    assert ports.read(DATA + 2, 1) == b"\x00"  # header type at 0x0E


def test_config_ports_byte_and_word_reads_hit_their_offsets(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 0, 0, 0))
    assert ports.read(DATA + 1, 1) == b"\x80"  # vendor id high byte
    assert ports.read(DATA + 2, 2) == b"\x37\x12"  # device id
    assert ports.read(DATA + 3, 1) == b"\x12"


def test_config_ports_enable_bit_clear_reads_all_ones(ports: ConfigPorts) -> None:
    ports.write(0, struct.pack("<I", 0))  # bus 0, device 0, no enable
    assert ports.read(DATA, 4) == b"\xff" * 4


def test_config_ports_address_reads_back_without_reserved_bits(ports: ConfigPorts) -> None:
    ports.write(0, struct.pack("<I", 0xFFFF_FFFF))
    assert u32(ports.read(0, 4)) == 0x80FF_FFFC


def test_config_ports_byte_write_to_0xcfb_does_not_latch(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 0, 0, 0))
    ports.write(3, b"\x01")  # Linux's pci_check_type1 pokes 0xCFB with a byte first
    assert u32(ports.read(0, 4)) == ENABLE


def test_config_ports_0xcf9_rst_cpu_resets_as_linux_reboot_pci_writes_it() -> None:
    """0xCF9 is the chipset's reset control register: Linux's reboot=pci reads it, writes
    SYS_RST (no reset yet), then SYS_RST | RST_CPU. It was absent I/O: the guest went on to
    a triple fault, which ends the VM as a fault, not a reset."""
    resets: list[None] = []
    ports = ConfigPorts(PciRoot(), lambda: resets.append(None))
    ports.write(0, cf8(0, 0, 0, 0))

    cf9 = ports.read(1, 1)[0]
    ports.write(1, bytes([cf9 | 0x02]))
    before = len(resets)
    ports.write(1, bytes([cf9 | 0x06]))

    assert (cf9, before, len(resets)) == (0, 0, 1)
    assert u32(ports.read(0, 4)) == ENABLE  # the address register is left as it was
    assert ports.read(0, 2) == b"\xff\x00" and ports.read(2, 2) == b"\xff\xff"


def test_config_ports_word_write_over_0xcf9_resets_too() -> None:
    resets: list[None] = []
    ports = ConfigPorts(PciRoot(), lambda: resets.append(None))

    ports.write(0, b"\x00\x06")  # a word at 0xCF8: its second byte is 0xCF9's

    assert len(resets) == 1


def test_config_ports_without_a_reset_0xcf9_is_absent(ports: ConfigPorts) -> None:
    ports.write(1, b"\x06")
    assert ports.read(1, 1) == b"\xff"


def test_config_ports_absent_function_reads_all_ones(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 3, 0, 0))
    assert ports.read(DATA, 4) == b"\xff" * 4


def test_config_ports_other_bus_reads_all_ones(ports: ConfigPorts) -> None:
    ports.write(0, cf8(1, 0, 0, 0))
    assert ports.read(DATA, 4) == b"\xff" * 4


def test_config_ports_absent_function_write_is_ignored() -> None:
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0, 2, 1, 0x40))  # function 1 of device 2: absent
    ports.write(DATA, b"\x11\x22\x33\x44")
    assert fake.accesses == []


def test_config_ports_register_offset_plus_data_byte_reaches_function() -> None:
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0, 2, 0, 0x44))
    ports.write(DATA + 2, b"\xab\xcd")
    assert fake.accesses == [("w", 0x46, 2)]
    assert fake.space[0x46:0x48] == b"\xab\xcd"


def test_config_ports_unaligned_word_is_split_into_bytes() -> None:
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0, 2, 0, 0))
    assert ports.read(DATA + 1, 2) == b"\x1a\x42"
    assert fake.accesses == [("r", 1, 1), ("r", 2, 1)]


def test_config_ports_unaligned_word_write_is_split_into_bytes() -> None:
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0, 2, 0, 0))
    ports.write(DATA + 1, b"\xab\xcd")
    assert fake.accesses == [("w", 1, 1), ("w", 2, 1)]


def test_config_ports_decode_every_bit_of_device_function_and_register() -> None:
    """Device 31, function 7, register 0xFC: the top bit of each field (a field cut short
    would reach device 15, function 3, or take the function's bits into the register)."""
    root, fake = PciRoot(), FakeFunction()
    root.add(31, 7, fake)
    ports = ConfigPorts(root)
    ports.write(0, cf8(0, 31, 7, 0xFC))
    ports.read(DATA, 4)
    assert fake.accesses == [("r", 0xFC, 4)]


def test_config_ports_write_to_bus_128_is_ignored() -> None:
    """Only bus 0 exists: a write to the same device on another bus (bus 0x80: the top bit
    of the field) reaches nothing, as a read of it reads all-ones."""
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0x80, 2, 0, 0x10))
    ports.write(DATA, b"\xff" * 4)
    assert (ports.read(DATA, 4), fake.accesses) == (b"\xff" * 4, [])


@pytest.mark.parametrize(
    ("offset", "size", "want"),
    [(3, 2, b"\xff\x86"), (2, 4, b"\xff\xff\x86\x80"), (3, 4, b"\xff\x86\x80\x37")],
    ids=["word-0xcfb", "dword-0xcfa", "dword-0xcfb"],
)
def test_config_ports_read_from_0xcfb_into_0xcfc_reads_the_data_bytes(
    ports: ConfigPorts, offset: int, size: int, want: bytes
) -> None:
    """The CPU splits a misaligned I/O access at the dword boundary (Intel SDM vol. 1, "I/O
    Address Space"): the bytes from 0xCFC on are a cycle on CONFIG_DATA, no part of the
    address register's dword. They read all-ones, though a function was latched."""
    ports.write(0, cf8(0, 0, 0, 0))
    assert ports.read(offset, size) == want


def test_config_ports_write_from_0xcfb_into_0xcfc_reaches_the_function() -> None:
    ports, fake = ports_with_fake_at(2)
    ports.write(0, cf8(0, 2, 0, 0x44))
    ports.write(2, b"\x00\x00\xab\xcd")  # 0xCFA-0xCFD: its last two bytes are data bytes 0-1
    assert fake.accesses == [("w", 0x44, 2)]
    assert fake.space[0x44:0x46] == b"\xab\xcd"
    assert u32(ports.read(0, 4)) == ENABLE | 2 << 11 | 0x44  # the latch is left as it was


@pytest.mark.parametrize("offset", [0, 2, 3], ids=["0xcf8", "0xcfa", "0xcfb"])
def test_config_ports_rst_cpu_byte_beside_0xcf9_does_not_reset(offset: int) -> None:
    resets: list[None] = []
    ports = ConfigPorts(PciRoot(), lambda: resets.append(None))
    ports.write(offset, b"\x06")
    assert resets == []


def test_config_ports_host_bridge_command_is_writable_ids_are_not(ports: ConfigPorts) -> None:
    ports.write(0, cf8(0, 0, 0, 0))
    ports.write(DATA, b"\x00\x00\x00\x00")
    ports.write(0, cf8(0, 0, 0, 0x04))
    ports.write(DATA, struct.pack("<I", 0xFFFF_FFFF))
    assert u32(ports.read(DATA, 4)) == 0x0147  # command bits only; status has none set
    ports.write(0, cf8(0, 0, 0, 0))
    assert u32(ports.read(DATA, 4)) == 0x1237_8086


def test_ecam_reads_host_bridge_ids_at_bus0_device0() -> None:
    ecam = Ecam(PciRoot())
    assert u32(ecam.read(0, 4)) == 0x1237_8086


def test_ecam_offset_decodes_device_function_register() -> None:
    root = PciRoot()
    fake = FakeFunction()
    root.add(5, 3, fake)
    ecam = Ecam(root)
    ecam.write(5 << 15 | 3 << 12 | 0x104, b"\x55")
    assert fake.accesses == [("w", 0x104, 1)]


def test_ecam_absent_function_reads_all_ones() -> None:
    assert Ecam(PciRoot()).read(1 << 15, 4) == b"\xff" * 4


def test_ecam_access_crossing_a_dword_reads_all_ones() -> None:
    assert Ecam(PciRoot()).read(2, 4) == b"\xff" * 4


@pytest.mark.parametrize(("offset", "size"), [(2, 4), (1, 4), (3, 2)])
def test_ecam_access_crossing_a_dword_never_reaches_the_function(offset: int, size: int) -> None:
    root, fake = PciRoot(), FakeFunction()
    root.add(1, 0, fake)
    ecam = Ecam(root)
    ecam.write(1 << 15 | offset, b"\x11" * size)
    assert (ecam.read(1 << 15 | offset, size), fake.accesses) == (b"\xff" * size, [])


def test_ecam_bus_1_reads_all_ones() -> None:
    """Bus 0 only: the same device a bus further on is absent, not an alias of it."""
    root, fake = PciRoot(), FakeFunction()
    root.add(1, 0, fake)
    assert (Ecam(root).read(1 << 20 | 1 << 15, 4), fake.accesses) == (b"\xff" * 4, [])


def test_ecam_three_byte_access_never_reaches_the_function() -> None:
    """KVM hands over MMIO of any length up to 8: a 3-byte access inside one dword is no
    config access (PCIe 7.2.2: 1, 2 or 4 bytes), and a 3-byte frame kills a device process."""
    root, fake = PciRoot(), FakeFunction()
    root.add(1, 0, fake)
    ecam = Ecam(root)
    ecam.write(1 << 15, b"\x11\x22\x33")
    assert (ecam.read(1 << 15, 3), fake.accesses) == (b"\xff" * 3, [])


def test_ecam_offset_decodes_device_31_function_7_register_0xffc() -> None:
    root, fake = PciRoot(), FakeFunction()
    root.add(31, 7, fake)
    Ecam(root).write(31 << 15 | 7 << 12 | 0xFFC, b"\x55")
    assert fake.accesses == [("w", 0xFFC, 1)]


def test_host_bridge_extended_space_reads_zero() -> None:
    assert HostBridge().config_read(0x100, 4) == bytes(4)


def test_host_bridge_extended_space_write_through_ecam_is_ignored() -> None:
    """ECAM reaches 4 KiB of each function; the host bridge has 256 bytes (without its bound,
    a write past them raises IndexError in the vCPU thread that serves it)."""
    ecam = Ecam(PciRoot())
    ecam.write(0x100, b"\xff" * 4)
    ecam.write(0xFFC, b"\xff" * 4)
    assert ecam.read(0x100, 4) == bytes(4)


def test_host_bridge_command_bits_set_then_cleared_read_zero() -> None:
    bridge = HostBridge()
    bridge.config_write(0x04, b"\x47\x01")
    bridge.config_write(0x04, b"\x00\x00")
    assert bridge.config_read(0x04, 2) == b"\x00\x00"


@pytest.mark.parametrize(("device", "function"), [(32, 0), (-1, 0), (1, 8)])
def test_root_add_off_bus_0_is_refused(device: int, function: int) -> None:
    with pytest.raises(ConfigError, match=f"{device}.{function} is not on bus 0"):
        PciRoot().add(device, function, FakeFunction())


def test_root_add_taken_slot_is_refused() -> None:
    root = PciRoot()
    with pytest.raises(ConfigError, match="00:00.0 is taken"):
        root.add(0, 0, FakeFunction())


def test_device_numbers_follow_the_host_bridge_in_config_order_to_a_full_bus() -> None:
    """Where Machine plugs a config's PCI devices, and where a restore's saved PCI chunk must
    have them (restore.check_compatible)."""
    config = [("serial0", "serial"), ("blk0", "virtio-blk"), ("rng0", "virtio-rng")]
    devices = [SimpleNamespace(name=name, model=model) for name, model in config]
    assert device_numbers(devices) == {"blk0": 1, "rng0": 2}  # the 8250 is on ports
    rngs = [SimpleNamespace(name=f"d{i}", model="virtio-rng") for i in range(32)]
    assert max(device_numbers(rngs[:31]).values()) == 31
    with pytest.raises(ConfigError, match="PCI bus 0 is full: 32 devices"):
        device_numbers(rngs)


# -- BARs ---------------------------------------------------------------------------------


class Moves:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, index: int, old: int, new: int) -> None:
        self.seen.append((index, old, new))


def bar_function(bars: tuple[PciBar, ...], bases: dict[int, int]) -> tuple[Ecam, Moves]:
    root, moves = PciRoot(), Moves()
    decoder = BarDecoder("fake", bars, bases, moves)
    root.add(1, 0, FunctionWithBars(FakeFunction(), decoder))
    return Ecam(root), moves


DEV1 = 1 << 15


def test_bar_mem32_reads_its_preassigned_base() -> None:
    ecam, _ = bar_function((PciBar(0, 0x4000),), {0: 0xC000_0000})
    assert u32(ecam.read(DEV1 | 0x10, 4)) == 0xC000_0000


def test_bar_mem32_all_ones_reads_size_mask_and_flags() -> None:
    ecam, _ = bar_function((PciBar(0, 0x4000, prefetchable=True),), {0: 0xC000_0000})
    ecam.write(DEV1 | 0x10, b"\xff" * 4)
    assert u32(ecam.read(DEV1 | 0x10, 4)) == 0xFFFF_C008


def test_bar_mem32_new_base_is_reported_as_a_move() -> None:
    ecam, moves = bar_function((PciBar(0, 0x4000),), {0: 0xC000_0000})
    ecam.write(DEV1 | 0x10, struct.pack("<I", 0xD000_4000))
    assert moves.seen == [(0, 0xC000_0000, 0xD000_4000)]
    assert u32(ecam.read(DEV1 | 0x10, 4)) == 0xD000_4000


def test_bar_mem32_unaligned_base_loses_its_low_bits() -> None:
    ecam, _ = bar_function((PciBar(0, 0x4000),), {0: 0xC000_0000})
    ecam.write(DEV1 | 0x10, struct.pack("<I", 0xD000_1234))
    assert u32(ecam.read(DEV1 | 0x10, 4)) == 0xD000_0000


def test_bar_mem64_sizes_both_dwords() -> None:
    bars = (PciBar(2, 0x2_0000_0000, BarKind.MEM64),)
    ecam, _ = bar_function(bars, {2: 0x10_0000_0000})
    ecam.write(DEV1 | 0x18, b"\xff" * 4)
    ecam.write(DEV1 | 0x1C, b"\xff" * 4)
    assert u32(ecam.read(DEV1 | 0x18, 4)) == 0x0000_0004
    assert u32(ecam.read(DEV1 | 0x1C, 4)) == 0xFFFF_FFFE


def test_bar_mem64_upper_dword_write_moves_the_bar() -> None:
    ecam, moves = bar_function((PciBar(2, 0x1000, BarKind.MEM64),), {2: 0xC000_0000})
    ecam.write(DEV1 | 0x1C, struct.pack("<I", 0x1))
    assert moves.seen == [(2, 0xC000_0000, 0x1_C000_0000)]


def test_bar_io_all_ones_reads_size_mask_with_io_flag() -> None:
    ecam, _ = bar_function((PciBar(1, 0x20, BarKind.IO),), {1: 0xC000})
    ecam.write(DEV1 | 0x14, b"\xff" * 4)
    assert u32(ecam.read(DEV1 | 0x14, 4)) == 0xFFFF_FFE1


def test_bar_unimplemented_register_reads_zero_after_all_ones() -> None:
    ecam, _ = bar_function((PciBar(0, 0x1000),), {0: 0xC000_0000})
    ecam.write(DEV1 | 0x20, b"\xff" * 4)
    assert u32(ecam.read(DEV1 | 0x20, 4)) == 0


def test_bar_accesses_never_reach_the_function() -> None:
    root, fake = PciRoot(), FakeFunction()
    decoder = BarDecoder("fake", (PciBar(0, 0x1000),), {0: 0xC000_0000}, Moves())
    root.add(1, 0, FunctionWithBars(fake, decoder))
    Ecam(root).write(DEV1 | 0x10, b"\xff" * 4)
    Ecam(root).read(DEV1 | 0x00, 4)
    assert fake.accesses == [("r", 0, 4)]


def test_bar_registers_are_0x10_to_0x27_and_0x28_is_the_functions() -> None:
    """The monitor owns all six BAR registers, BAR 5's too (a function's own BAR 5 would
    move without the monitor seeing it); the next register is the function's again."""
    root, fake = PciRoot(), FakeFunction()
    decoder = BarDecoder("fake", (PciBar(5, 0x1000),), {5: 0xC000_0000}, Moves())
    root.add(1, 0, FunctionWithBars(fake, decoder))
    Ecam(root).write(DEV1 | 0x24, b"\xff" * 4)
    value = Ecam(root).read(DEV1 | 0x28, 4)
    assert (value, fake.accesses) == (bytes(4), [("r", 0x28, 4)])


def test_bar_load_keeps_address_bits_and_flags_unimplemented_bars_read_zero() -> None:
    """A snapshot's BAR dwords (untrusted) are taken as a guest's writes would be."""
    decoder = BarDecoder("fake", (PciBar(0, 0x4000, prefetchable=True),), {0: 0xC000_0000}, Moves())
    decoder.load((0xD000_0000, 0xFFFF_FFFF, 0xE000_0000, 0, 0, 0))
    assert decoder.registers() == (0xD000_0008, 0, 0, 0, 0, 0)


def test_bar_smallest_and_largest_sizes_a_guest_can_size_are_accepted() -> None:
    bars = (PciBar(0, 16), PciBar(1, 4, BarKind.IO), PciBar(2, 256, BarKind.IO))
    decoder = BarDecoder("fake", bars, {0: 0xC000_0000, 1: 0xC000, 2: 0xC100}, Moves())
    assert decoder.registers()[:3] == (0xC000_0000, 0xC001, 0xC101)


def test_bar_sizes_not_power_of_two_are_refused() -> None:
    with pytest.raises(ConfigError, match="BAR 0 size 0x3000"):
        BarDecoder("fake", (PciBar(0, 0x3000),), {0: 0xC000_0000}, Moves())


def test_bar_mem64_in_bar5_is_refused() -> None:
    with pytest.raises(ConfigError, match="BAR 5 overlaps another or lies past BAR 5"):
        BarDecoder("fake", (PciBar(5, 0x1000, BarKind.MEM64),), {5: 0xC000_0000}, Moves())


@pytest.mark.parametrize(
    ("bars", "why"),
    [
        ((PciBar(0, 8),), "BAR 0 size 0x8 is not"),  # a memory BAR's 4 flag bits need 16 bytes
        ((PciBar(0, 2, BarKind.IO),), "BAR 0 size 0x2 is not"),  # an I/O BAR: 4 ports
        ((PciBar(0, 512, BarKind.IO),), "BAR 0 size 0x200 is not"),  # PCI 6.2.5.1: <= 256
        ((PciBar(0, 1 << 32),), "32-bit BAR 0 is larger than 2 GiB"),
        ((PciBar(0, 0x1000, BarKind.MEM64), PciBar(1, 0x1000)), "BAR 1 overlaps another"),
        ((PciBar(2, 0x1000), PciBar(2, 0x2000)), "BAR 2 overlaps another"),
    ],
    ids=[
        "mem-under-16",
        "io-under-4",
        "io-over-256",
        "mem32-over-2g",
        "mem64-upper-taken",
        "same-index",
    ],  # fmt: skip
)
def test_bar_descriptors_a_guest_could_not_size_are_refused(bars, why) -> None:
    """A model's descriptor is checked once (its author's mistake, not the guest's): every
    BAR sizable by the PCI rules, in BAR registers of its own."""
    with pytest.raises(ConfigError, match=why):
        BarDecoder("fake", bars, dict.fromkeys(range(6), 0xC000_0000), Moves())


def test_bar_base_not_aligned_to_its_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="BAR 0 base 0xc0000800 is not aligned to its size"):
        BarDecoder("fake", (PciBar(0, 0x1000),), {0: 0xC000_0800}, Moves())


def test_bar_allocator_aligns_each_bar_to_its_size() -> None:
    alloc = BarAllocator(0xC000_0000, 0xE000_0000, "mmio32")
    alloc.allocate(0x1000)
    assert alloc.allocate(0x4000) == 0xC000_4000


def test_bar_allocator_full_window_is_refused() -> None:
    alloc = BarAllocator(0xC000_0000, 0xC000_1000, "mmio32")
    with pytest.raises(ConfigError, match="mmio32 window"):
        alloc.allocate(0x2000)


# -- mutation audit: guest-facing checks no test caught when broken -------------------------------
def test_host_bridge_only_command_and_interrupt_line_take_writes() -> None:
    """PCI 3.0 6.1: of the host bridge's header only the command bits it has and Interrupt
    Line (6.2.4, a scratch byte) are writable; Interrupt Pin (0x3D) beside it, the IDs and
    the rest keep their values whatever a guest writes over the whole header."""
    bridge = HostBridge()
    before = bridge.config_read(0, 256)

    for offset in range(0, 256, 4):
        bridge.config_write(offset, b"\xff\xff\xff\xff")

    after = bridge.config_read(0, 256)
    changed = {i for i in range(256) if after[i] != before[i]}
    assert changed == {0x04, 0x05, 0x3C}
    assert (after[0x3C], after[0x3D], u32(after[4:8]) & 0xFFFF) == (0xFF, 0, 0x0147)
