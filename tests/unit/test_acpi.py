"""ACPI tables and the AML encoder: byte sequences from iasl 20200925, fields from ACPI 6.3."""

from __future__ import annotations

import struct

import pytest

from splitvmm.devprocs import rtc
from splitvmm.monitor import acpi, layout
from splitvmm.monitor.acpi import aml, tables
from splitvmm.monitor.acpi.dsdt import generic_event_device, pci_osc, pci_root_bridge, prt_entry
from splitvmm.monitor.mptable import build_mptable
from splitvmm.monitor.platform import (
    GED_POWER_BUTTON,
    I8042,
    I8042_STATUS_IDLE,
    AcpiGed,
    AcpiPm,
)
from splitvmm.protocol.models import RTC, SERIAL

# `Name (_HID, EisaId ("PNP0A08"))`, compiled by iasl -p.
IASL_HID_PNP0A08 = bytes.fromhex("085f4849440c41d00a08")
# `Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
#  IRQNoFlags () {4} })`
IASL_COM1_CRS = bytes.fromhex("085f4352531110" + "0a0d4701f803f8030108221000" + "7900")
# `WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)`
IASL_WORD_BUS = bytes.fromhex("880d00020c0000000000ff0000000001")
# `DWordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0, 0xCF7, 0,
#  0xCF8)`
IASL_DWORD_IO = bytes.fromhex("871700010c030000000000000000f70c000000000000f80c0000")
# `DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
#  0, 0xC0000000, 0xDFFFFFFF, 0, 0x20000000)`
IASL_DWORD_MEMORY = bytes.fromhex("871700000c0100000000000000c0ffffffdf0000000000000020")
# `Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000)`
IASL_MEMORY32_FIXED = bytes.fromhex("86090001000000e000001000")
# Scope (\_SB) { Device (GED) { Name (_HID, "ACPI0013") Name (_UID, Zero)
#  Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive,
#  ,, ) { 9 } }) OperationRegion (EREG, SystemIO, 0x0604, 0x04)
#  Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
#  Method (_EVT, 1, Serialized) { Local0 = ESEL If (((Local0 & 0x02) == 0x02))
#  { Notify (PWRB, 0x80) } } }
#  Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) } }
IASL_GED = bytes.fromhex(
    "1046085c5f53425f5b8246064745445f085f4849440d414350493030313300085f55494400085f435253"
    "110e0a0b89060003010900000079005b8045524547010b04060a045b810b45524547434553454c20141d"
    "5f45565409704553454c60a010937b600a02000a0286505752420a805b821550575242085f4849440c41"
    "d00c0c085f55494400"
)
# `Name (_S5, Package (0x02) { 0x05, Zero })`
IASL_S5 = bytes.fromhex("085f53355f1205020a0500")
# `Name (\_SB.PCI0.ABCD, 0x12345678)`, `Name (XQ, "hi")`, `Name (BIGI, 0x123456789A)`
IASL_MULTI_NAME = bytes.fromhex("082f035f53425f504349304142434" + "40c78563412")
IASL_STRING = bytes.fromhex("0858515f5f0d686900")
IASL_QWORD = bytes.fromhex("084249474" + "90e9a78563412000000")
# `Name (_PRT, Package (0x02) { Package (0x04) { 0x0001FFFF, Zero, Zero, 0x11 },
#  Package (0x04) { 0x0002FFFF, Zero, Zero, 0x12 } })`
IASL_PRT = bytes.fromhex(
    "085f505254121a02" + "120b040cffff010000000a11" + "120b040cffff020000000a12"
)


def test_aml_name_eisa_id_matches_iasl() -> None:
    assert aml.name("_HID", aml.eisa_id("PNP0A08")) == IASL_HID_PNP0A08


def test_aml_resource_template_io_irq_matches_iasl() -> None:
    crs = aml.resource_template(aml.io(0x3F8, 8), aml.irq_no_flags(4))
    assert aml.name("_CRS", crs) == IASL_COM1_CRS


def test_aml_memory32_fixed_matches_iasl() -> None:
    assert aml.memory32_fixed(0xE000_0000, 0x10_0000) == IASL_MEMORY32_FIXED


def test_aml_word_bus_number_matches_iasl() -> None:
    assert aml.word_bus_number(0, 0xFF) == IASL_WORD_BUS


def test_aml_dword_io_matches_iasl() -> None:
    assert aml.dword_io(0, 0xCF7) == IASL_DWORD_IO


def test_aml_dword_memory_matches_iasl() -> None:
    assert aml.dword_memory(0xC000_0000, 0xDFFF_FFFF) == IASL_DWORD_MEMORY


def test_aml_package_of_integers_matches_iasl() -> None:
    assert aml.name("_S5", aml.package(aml.integer(5), aml.integer(0))) == IASL_S5


def test_dsdt_prt_entries_match_iasl() -> None:
    prt = aml.name("_PRT", aml.package(prt_entry(1, 17), prt_entry(2, 18)))
    assert prt == IASL_PRT


def test_dsdt_root_bridge_has_prt_with_each_pci_intx() -> None:
    bridge = pci_root_bridge([(1, 17), (2, 18)])
    assert bridge.endswith(IASL_PRT + pci_osc())  # the _PRT, then the _OSC, last


def test_dsdt_root_bridge_without_pci_intx_has_no_prt() -> None:
    assert b"_PRT" not in pci_root_bridge()


def test_aml_three_segment_name_uses_multi_name_prefix() -> None:
    assert aml.name("_SB.PCI0.ABCD", aml.integer(0x12345678)) == IASL_MULTI_NAME


def test_aml_string_and_qword_match_iasl() -> None:
    assert aml.name("XQ", aml.string("hi")) + aml.name("BIGI", aml.integer(0x123456789A)) == (
        IASL_STRING + IASL_QWORD
    )


@pytest.mark.parametrize(
    ("content", "encoded"),
    [(0x3E, "3f"), (0x3F, "4104"), (0xFFD, "4fff"), (0x1000, "830001")],
)
def test_aml_pkg_length_counts_its_own_bytes(content: int, encoded: str) -> None:
    assert aml.pkg_length(content).hex() == encoded


def test_dsdt_generic_event_device_and_power_button_match_iasl() -> None:
    """The GED's interrupt, register, field and _EVT (Serialized, a Notify under an If), and
    the button device: every AML term this encoder gained for them, against iasl."""
    assert aml.scope("\\_SB", generic_event_device()) == IASL_GED


def test_aml_field_unit_wider_than_one_length_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="64 bits"):
        aml.field("EREG", aml.FIELD_DWORD_ACC, ("WIDE", 64))


def test_aml_name_segment_too_long_is_refused() -> None:
    with pytest.raises(ValueError, match="'PCI00'"):
        aml.name_seg("PCI00")


# -- tables ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> acpi.AcpiTables:
    return acpi.build(2, [SERIAL.transport, RTC.transport])


def table_at(built: acpi.AcpiTables, gpa: int) -> bytes:
    offset = gpa - built.base
    length = struct.unpack_from("<I", built.data, offset + 4)[0]
    return built.data[offset : offset + length]


def xsdt_entries(built: acpi.AcpiTables) -> dict[bytes, bytes]:
    xsdt = table_at(built, struct.unpack_from("<Q", built.data, 24)[0])
    gpas = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    return {table_at(built, g)[:4]: table_at(built, g) for g in gpas}


def test_rsdp_is_at_the_start_of_the_bios_area_with_both_checksums(
    built: acpi.AcpiTables,
) -> None:
    rsdp = built.data[:36]
    assert built.base == 0xE0000
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0


def test_xsdt_lists_fadt_madt_mcfg_each_checksummed(built: acpi.AcpiTables) -> None:
    entries = xsdt_entries(built)
    assert sorted(entries) == [b"APIC", b"FACP", b"MCFG"]
    assert all(sum(t) % 256 == 0 for t in entries.values())


def test_fadt_is_hardware_reduced_with_reset_register_and_dsdt(built: acpi.AcpiTables) -> None:
    fadt = xsdt_entries(built)[b"FACP"]
    flags = struct.unpack_from("<I", fadt, 112)[0]
    dsdt = table_at(built, struct.unpack_from("<Q", fadt, 140)[0])
    assert flags == (
        tables.FADT_HW_REDUCED_ACPI
        | tables.FADT_RESET_REG_SUP
        | tables.FADT_WBINVD
        | tables.FADT_PWR_BUTTON
        | tables.FADT_SLP_BUTTON
    )
    assert fadt[116:128] == tables.io_register(layout.ACPI_PM_PORT + 2)
    assert dsdt[:4] == b"DSDT" and sum(dsdt) % 256 == 0


def test_fadt_has_no_fixed_feature_buttons_and_says_wbinvd_works(built: acpi.AcpiTables) -> None:
    """Table 5-35: PWR_BUTTON and SLP_BUTTON set mean no fixed-feature button (a hardware-
    reduced platform has none); WBINVD MUST be set by new systems."""
    flags = struct.unpack_from("<I", xsdt_entries(built)[b"FACP"], 112)[0]
    assert flags & 0x31 == 0x31


@pytest.mark.parametrize("with_rtc", [True, False], ids=["rtc", "no-rtc"])
def test_fadt_boot_arch_says_no_vga_and_whether_the_cmos_clock_is_there(with_rtc: bool) -> None:
    """Table 5.11: LEGACY_DEVICES set, as the DSDT declares a serial port (a user-visible
    ISA device an OS loads a driver for)."""
    windows = [SERIAL.transport, RTC.transport] if with_rtc else [SERIAL.transport]
    fadt = xsdt_entries(acpi.build(1, windows))[b"FACP"]

    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch == tables.BOOT_ARCH_VGA_NOT_PRESENT | tables.BOOT_ARCH_LEGACY_DEVICES | (
        0 if with_rtc else tables.BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    )


def test_fadt_boot_arch_without_serial_or_with_the_clock_alone_has_no_legacy_devices() -> None:
    fadt = xsdt_entries(acpi.build(1, [RTC.transport]))[b"FACP"]
    assert not struct.unpack_from("<H", fadt, 109)[0] & tables.BOOT_ARCH_LEGACY_DEVICES


@pytest.mark.parametrize("with_rtc", [True, False], ids=["rtc", "no-rtc"])
def test_fadt_century_is_the_cmos_clocks_century_index(with_rtc: bool) -> None:
    """ACPI 5.2.9 CENTURY: 0 says the RTC has no century byte; the model keeps one at 0x32,
    and Linux uses it only when the FADT says where."""
    windows = [SERIAL.transport, RTC.transport] if with_rtc else [SERIAL.transport]
    fadt = xsdt_entries(acpi.build(1, windows))[b"FACP"]

    assert fadt[108] == (rtc.Reg.CENTURY if with_rtc else 0)


def test_madt_has_one_enabled_lapic_per_vcpu_then_the_ioapic(built: acpi.AcpiTables) -> None:
    madt = xsdt_entries(built)[b"APIC"]
    assert madt[44:52] == bytes.fromhex("0008000001000000")  # vCPU 0: uid 0, APIC id 0
    assert madt[52:60] == bytes.fromhex("0008010101000000")  # vCPU 1
    # the IOAPIC: id 0 (what KVM's IOAPIC holds: layout.IOAPIC_ID), GSIs from 0
    assert madt[60:72] == struct.pack("<BBBBII", 1, 12, 0, 0, 0xFEC0_0000, 0)


@pytest.mark.parametrize("nvcpus", [1, 16, 254])
def test_madt_and_mp_table_give_the_ioapic_one_id_that_fits_its_register(nvcpus: int) -> None:
    """The 82093AA's ID register (and KVM's) holds 4 bits: an ID after the vCPUs' APIC IDs
    would not fit from 16 vCPUs on, and the guest would read another ID from the IOAPIC."""
    madt = xsdt_entries(acpi.build(nvcpus, [SERIAL.transport]))[b"APIC"]
    ioapic = 44 + nvcpus * 8  # after the local APICs
    assert madt[ioapic : ioapic + 3] == bytes([tables.MADT_TYPE_IOAPIC, 12, layout.IOAPIC_ID])
    mp = build_mptable(nvcpus)
    mp_ioapic = 16 + 44 + nvcpus * 20 + 8  # floating pointer, header, processors, the bus
    assert mp[mp_ioapic : mp_ioapic + 2] == bytes([2, layout.IOAPIC_ID])
    assert layout.IOAPIC_ID < 16


def test_madt_has_no_interrupt_source_override(built: acpi.AcpiTables) -> None:
    """ISA IRQs reach their IOAPIC pins edge-triggered, active high, as the MP table says;
    with no SCI (hardware-reduced), nothing moves IRQ 9 to level."""
    madt = xsdt_entries(built)[b"APIC"]
    at, types = 44, []
    while at < len(madt):
        types.append(madt[at])
        at += madt[at + 1]
    assert tables.MADT_TYPE_ISO not in types


def test_dsdt_reserves_ecam_and_the_pm_ports_as_motherboard_resources(
    built: acpi.AcpiTables,
) -> None:
    fadt = xsdt_entries(built)[b"FACP"]
    dsdt = table_at(built, struct.unpack_from("<Q", fadt, 140)[0])
    assert aml.name("_HID", aml.eisa_id("PNP0C02")) in dsdt
    ranges = aml.memory32_fixed(layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE)
    ranges += aml.io(layout.ACPI_PM_PORT, 3) + aml.io(layout.ACPI_GED_PORT, AcpiGed.WINDOW)
    assert ranges in dsdt
    assert generic_event_device() in dsdt


class Pulses:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_acpi_ged_event_sets_its_bit_and_pulses_the_interrupt_once() -> None:
    pulses = Pulses()
    ged = AcpiGed(pulses)

    ged.signal(GED_POWER_BUTTON)

    assert (ged.events, pulses.count) == (GED_POWER_BUTTON, 1)


def test_acpi_ged_read_returns_the_events_and_clears_them() -> None:
    """As QEMU's GED register: _EVT reads it once, and a second press after that read is a
    new event, with an interrupt of its own."""
    pulses = Pulses()
    ged = AcpiGed(pulses)
    ged.signal(GED_POWER_BUTTON)
    ged.signal(GED_POWER_BUTTON)  # pressed twice before the guest looked: one event

    assert ged.read(0, 4) == GED_POWER_BUTTON.to_bytes(4, "little")
    assert ged.read(0, 4) == bytes(4)
    assert pulses.count == 2


def test_acpi_ged_byte_read_clears_only_the_byte_read() -> None:
    ged = AcpiGed(Pulses())
    ged.signal(GED_POWER_BUTTON)

    assert ged.read(1, 1) == b"\x00"  # bit 1 is in byte 0: not read, not cleared
    assert ged.events == GED_POWER_BUTTON
    assert ged.read(0, 1) == bytes([GED_POWER_BUTTON])
    assert ged.events == 0


def test_acpi_ged_write_changes_nothing() -> None:
    ged = AcpiGed(Pulses())
    ged.signal(GED_POWER_BUTTON)

    ged.write(0, b"\x00\x00\x00\x00")

    assert ged.events == GED_POWER_BUTTON


def test_acpi_ged_restore_sets_events_without_an_interrupt_and_refuses_unknown_bits() -> None:
    pulses = Pulses()
    ged = AcpiGed(pulses)

    ged.restore(GED_POWER_BUTTON)
    assert (ged.events, pulses.count) == (GED_POWER_BUTTON, 0)
    with pytest.raises(ValueError, match="0x5"):
        ged.restore(0x5)
    assert ged.events == GED_POWER_BUTTON


def test_mcfg_announces_ecam_for_bus_0(built: acpi.AcpiTables) -> None:
    mcfg = xsdt_entries(built)[b"MCFG"]
    assert struct.unpack_from("<QHBB", mcfg, 44) == (layout.PCIE_ECAM_BASE, 0, 0, 0)


def test_dsdt_serial_takes_port_and_irq_from_its_descriptor(built: acpi.AcpiTables) -> None:
    fadt = xsdt_entries(built)[b"FACP"]
    dsdt = table_at(built, struct.unpack_from("<Q", fadt, 140)[0])
    assert aml.io(SERIAL.transport.base, 8) + aml.irq_no_flags(4) in dsdt


# -- the PM registers -----------------------------------------------------------------------


class Ends:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, why: str) -> None:
        self.reasons.append(why)


def test_acpi_pm_s5_with_slp_en_powers_off() -> None:
    ends = Ends()
    AcpiPm(5, 1, ends).write(0, bytes([5 << 2 | 1 << 5]))
    assert ends.reasons == ["guest powered off (ACPI S5)"]


def test_acpi_pm_s5_without_slp_en_does_nothing() -> None:
    ends = Ends()
    AcpiPm(5, 1, ends).write(0, bytes([5 << 2]))
    assert ends.reasons == []


def test_acpi_pm_reset_value_resets() -> None:
    ends = Ends()
    AcpiPm(5, 1, ends).write(2, b"\x01")
    assert ends.reasons == ["guest reset through the ACPI reset register"]


def test_acpi_pm_word_write_reaches_the_reset_register_in_its_high_byte() -> None:
    """A 2-byte write at the sleep status register covers the reset register too: an ISA
    bus splits it into bytes, and the second is the reset value."""
    ends = Ends()
    AcpiPm(5, 1, ends).write(1, b"\x00\x01")
    assert ends.reasons == ["guest reset through the ACPI reset register"]


def test_i8042_word_access_reaches_the_command_port_in_its_high_byte() -> None:
    resets: list[int] = []
    i8042 = I8042(lambda: resets.append(1))

    assert i8042.read(3, 2) == bytes([0, I8042_STATUS_IDLE])
    i8042.write(3, b"\x00\xfe")  # outw 0x63: 0xFE lands on 0x64, the reset command
    assert resets == [1]


@pytest.mark.parametrize("command", [0xF0, 0xF2, 0xFA, 0xFC, 0xFE])
def test_i8042_pulse_command_with_output_bit_0_clear_resets(command: int) -> None:
    """Commands 0xF0-0xFF pulse low the output port bits whose bits 3:0 in the command are 0
    (IBM PC AT Technical Reference, 8042 commands; QEMU's pckbd too): output bit 0 is the CPU
    reset line, so every even one resets, not only the 0xFE that Linux writes. 0xF0 went
    unheard, and a guest that used it went on to its next way out (a triple fault, status 4)."""
    resets: list[int] = []

    I8042(lambda: resets.append(1)).write(4, bytes([command]))

    assert resets == [1]


@pytest.mark.parametrize("command", [0xF1, 0xFD, 0xFF, 0xEE])
def test_i8042_command_that_leaves_output_bit_0_alone_does_not_reset(command: int) -> None:
    resets: list[int] = []

    I8042(lambda: resets.append(1)).write(4, bytes([command]))

    assert resets == []


@pytest.mark.parametrize("output", [0x00, 0xFC, 0xFE])
def test_i8042_output_port_written_with_bit_0_clear_resets(output: int) -> None:
    """Command 0xD1 makes the next data byte the output port (IBM PC AT Technical Reference,
    8042 commands; QEMU's pckbd outport_write): bit 0 is the CPU reset line, active low, so a
    byte with it clear resets as the pulse commands do. The byte went unheard."""
    resets: list[int] = []
    i8042 = I8042(lambda: resets.append(1))

    i8042.write(4, bytes([0xD1]))
    i8042.write(0, bytes([output]))

    assert resets == [1]


def test_i8042_output_port_written_with_bit_0_set_does_not_reset() -> None:
    """Linux's A20 enabling (arch/x86/boot/a20.c) writes 0xD1 then 0xDF: A20 on, reset line
    high."""
    resets: list[int] = []
    i8042 = I8042(lambda: resets.append(1))

    i8042.write(4, bytes([0xD1]))
    i8042.write(0, bytes([0xDF]))

    assert resets == []


def test_i8042_data_byte_after_the_output_port_byte_does_not_reset() -> None:
    resets: list[int] = []
    i8042 = I8042(lambda: resets.append(1))

    i8042.write(4, bytes([0xD1]))
    i8042.write(0, bytes([0xDF]))
    i8042.write(0, bytes([0x00]))  # the keyboard's: 0xD1 takes one data byte

    assert resets == []
