"""MP table: layout and checksums per Intel MP spec 1.4, chapter 4."""

from __future__ import annotations

import struct

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor.layout import MPTABLE
from splitvmm.monitor.mptable import build_mptable, write_mptable
from splitvmm.native.kvm import CpuidEntry
from tests.fakes import FakeGuestMemory

MPF_SIZE = 16  # floating pointer structure
HEADER_SIZE = 44  # configuration table header


def config_table(data: bytes) -> bytes:
    length = struct.unpack_from("<H", data, MPF_SIZE + 4)[0]
    return data[MPF_SIZE : MPF_SIZE + length]


def entry_types(table: bytes) -> list[int]:
    """Walk the entries: processor entries are 20 bytes, all others 8 (MP spec table 4-3)."""
    types, offset = [], HEADER_SIZE
    while offset < len(table):
        types.append(table[offset])
        offset += 20 if table[offset] == 0 else 8
    return types


def test_mptable_floating_pointer_sums_to_zero() -> None:
    data = build_mptable(4)

    assert sum(data[:MPF_SIZE]) % 256 == 0


def test_mptable_config_table_sums_to_zero() -> None:
    data = build_mptable(4)

    assert sum(config_table(data)) % 256 == 0


def test_mptable_floating_pointer_points_at_config_table() -> None:
    data = build_mptable(2)

    assert data[:4] == b"_MP_"
    assert struct.unpack_from("<IBB", data, 4) == (MPTABLE + MPF_SIZE, 1, 4)
    assert data[MPF_SIZE : MPF_SIZE + 4] == b"PCMP"


def test_mptable_header_names_oem_and_lapic() -> None:
    table = config_table(build_mptable(2))

    assert table[8:16] == b"SPLITVMM"
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000


def entries(table: bytes) -> list[bytes]:
    """The entries of a configuration table, each whole (same sizes as entry_types)."""
    out, offset = [], HEADER_SIZE
    while offset < len(table):
        size = 20 if table[offset] == 0 else 8
        out.append(table[offset : offset + size])
        offset += size
    return out


def mp_pci_irq(data: bytes, bus: int, device: int, pin: int = 0) -> int | None:
    """The IOAPIC pin of a PCI interrupt, found as Linux's IO_APIC_get_PCI_irq_vector finds
    it (an I/O interrupt entry of type INT whose source bus is the PCI bus numbered `bus`
    and whose source IRQ is device << 2 | pin), or None."""
    found = entries(config_table(data))
    pci_buses = {e[1] for e in found if e[0] == 1 and e[2:8] == b"PCI   "}
    for e in found:
        if e[0] == 3 and e[1] == 0 and e[4] == bus in pci_buses and e[5] == device << 2 | pin:
            return e[7]
    return None


def test_mptable_entry_count_matches_vcpus_bus_ioapic_and_interrupts() -> None:
    table = config_table(build_mptable(3))

    assert struct.unpack_from("<H", table, 34)[0] == 3 + 1 + 1 + 16 + 2


def test_mptable_entries_are_cpus_bus_ioapic_16_irqs_2_lints() -> None:
    table = config_table(build_mptable(2))

    assert entry_types(table) == [0, 0, 1, 2] + [3] * 16 + [4, 4]


def test_mptable_only_vcpu0_is_bsp() -> None:
    table = config_table(build_mptable(2))

    assert (table[HEADER_SIZE + 3], table[HEADER_SIZE + 20 + 3]) == (0x3, 0x1)


def test_mptable_ioapic_has_the_id_kvms_ioapic_holds() -> None:
    table = config_table(build_mptable(2))
    ioapic = HEADER_SIZE + 2 * 20 + 8

    assert struct.unpack_from("<BBBBI", table, ioapic) == (2, 0, 0x11, 1, 0xFEC00000)
    intsrc = ioapic + 8  # the ISA IRQs' entries name it as their destination
    assert {table[intsrc + 8 * irq + 6] for irq in range(16)} == {0}


def test_mptable_cpu_entries_take_signature_and_features_from_cpuid() -> None:
    leaf1 = CpuidEntry(1, 0, 0, eax=0x00A10F11, ebx=0, ecx=0, edx=0x078BFBFF)

    table = config_table(build_mptable(1, leaf1))

    assert struct.unpack_from("<II", table, HEADER_SIZE + 4) == (0xF11, 0x078BFBFF)


def test_mptable_too_many_vcpus_is_refused() -> None:
    with pytest.raises(ConfigError, match="1 to 254 vCPUs, not 255"):
        build_mptable(255)


def test_write_mptable_puts_it_at_mptable_address() -> None:
    mem = FakeGuestMemory(2 << 20)

    size = write_mptable(mem, 1)

    assert mem.read(MPTABLE, size) == build_mptable(1)


def test_mptable_routes_each_pci_inta_to_its_ioapic_pin() -> None:
    """4.3.4: one I/O interrupt entry per connected IOAPIC input, PCI INTA# included. With
    none, a guest booted with acpi=off printed "can't find IRQ for PCI INT A; probably buggy
    MP table" and its INTx fallback never fired."""
    data = build_mptable(2, pci_intx=[(1, 17), (2, 18)])

    assert (mp_pci_irq(data, 0, 1), mp_pci_irq(data, 0, 2), mp_pci_irq(data, 0, 3)) == (
        17,
        18,
        None,
    )


def test_mptable_with_pci_keeps_the_isa_irqs_on_an_isa_bus_of_its_own() -> None:
    found = entries(config_table(build_mptable(1, pci_intx=[(1, 17)])))
    isa = {e[1] for e in found if e[0] == 1 and e[2:8] == b"ISA   "}

    assert len(isa) == 1 and 0 not in isa  # bus 0 is the PCI bus: Linux matches its number
    assert sorted(e[5] for e in found if e[0] == 3 and e[4] in isa) == list(range(16))
    assert {e[4] for e in found if e[0] == 4} == isa  # LINT0/1 name the ISA bus too
