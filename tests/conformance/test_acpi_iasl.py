"""The ACPI tables through ACPICA's own tools (Debian acpica-tools, installed by bootstrap).

"No warnings" means, for each table the XSDT reaches (and the DSDT): `iasl -d` disassembles
it with exit status 0 and neither its output nor the .dsl mentions an error, a warning or a
bad checksum; the .dsl recompiles with "0 Errors, 0 Warnings, 0 Remarks"; the recompiled
table equals ours but for the checksum and creator fields iasl writes itself. Then acpiexec
loads all of them into one namespace and evaluates the objects Linux will read, and runs the
root bridge's _OSC method with the buffers an OS passes it.
The RSDP is not an SDT (iasl cannot disassemble it alone): its checks are in tests/unit.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from uuid import UUID

import pytest

from splitvmm.monitor import acpi, layout
from splitvmm.monitor.acpi.dsdt import PCI_OSC_UUID
from splitvmm.monitor.platform import GED_POWER_BUTTON
from splitvmm.protocol.models import RTC, SERIAL

pytestmark = pytest.mark.skipif(
    shutil.which("iasl") is None or shutil.which("acpiexec") is None,
    reason="iasl/acpiexec missing: scripts/bootstrap.sh installs acpica-tools",
)

COMPLAINT = re.compile(r"error|warning|incorrect|invalid", re.IGNORECASE)
CHECKSUM, CREATOR = slice(9, 10), slice(28, 36)


def _tables(vcpus: int) -> dict[str, bytes]:
    # two PCI devices with INTA# (the DSDT's _PRT), as virtio devices at 00:01.0 and 00:02.0
    built = acpi.build(vcpus, [SERIAL.transport, RTC.transport], [(1, 17), (2, 18)])

    def at(gpa: int) -> bytes:
        offset = gpa - built.base
        return built.data[offset : offset + struct.unpack_from("<I", built.data, offset + 4)[0]]

    xsdt = at(struct.unpack_from("<Q", built.data, 24)[0])
    found = {t[:4].decode(): t for t in map(at, struct.unpack_from("<3Q", xsdt, 36))}
    found["XSDT"] = xsdt
    found["DSDT"] = at(struct.unpack_from("<Q", found["FACP"], 140)[0])
    return found


@pytest.fixture(scope="module")
def table_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("acpi")
    files = {}
    for sig, data in _tables(2).items():
        files[sig] = out / f"{sig.lower()}.dat"
        files[sig].write_bytes(data)
    return files


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _without_iasl_fields(table: bytes) -> bytes:
    return table[: CHECKSUM.start] + table[CHECKSUM.stop : CREATOR.start] + table[CREATOR.stop :]


@pytest.mark.parametrize("sig", ["XSDT", "FACP", "APIC", "MCFG", "DSDT"])
def test_iasl_disassembles_and_recompiles_table_without_complaint(
    table_files: dict[str, Path], sig: str
) -> None:
    dat = table_files[sig]
    banner = _run(["iasl", "-d", dat.name], dat.parent)
    dsl = dat.with_suffix(".dsl").read_text()
    assert f"{sig} 0x" in banner or "DefinitionBlock" in dsl
    complaints = [line for line in (banner + dsl).splitlines() if COMPLAINT.search(line)]
    assert complaints == []
    compiled = _run(["iasl", "-p", f"re_{dat.stem}", dat.with_suffix(".dsl").name], dat.parent)
    assert "0 Errors, 0 Warnings, 0 Remarks" in compiled
    again = (dat.parent / f"re_{dat.stem}.aml").read_bytes()
    assert _without_iasl_fields(again) == _without_iasl_fields(dat.read_bytes())


def test_acpiexec_loads_namespace_and_evaluates_root_bridge_and_s5(
    table_files: dict[str, Path],
) -> None:
    names = [table_files[s].name for s in ("FACP", "DSDT", "APIC", "MCFG")]
    script = (
        "Evaluate \\_SB.PCI0._CRS; Evaluate \\_S5; Evaluate \\_SB.DV00._HID; "
        "Evaluate \\_SB.PCI0._PRT"
    )
    out = _run(["acpiexec", "-b", script, *names], table_files["DSDT"].parent)
    assert [line for line in out.splitlines() if COMPLAINT.search(line)] == []
    assert "Evaluation of \\_S5 returned" in out
    assert "[Integer] = 000000000105D041" in out  # EISAID("PNP0501"): the UART's _HID
    assert "Evaluation of \\_SB.PCI0._PRT returned" in out
    assert "[Integer] = 000000000002FFFF" in out  # 00:02.0's _PRT address


def _osc(table_files: dict[str, Path], uuid: str, revision: int, dwords: list[int]) -> list[int]:
    """What \\_SB.PCI0._OSC returns for a capabilities buffer of `dwords`, as acpiexec
    evaluates it (a buffer argument is written as its bytes in parentheses)."""

    def hex_bytes(data: bytes) -> str:
        return "(" + " ".join(f"{b:02x}" for b in data) + ")"

    buffer = struct.pack(f"<{len(dwords)}I", *dwords)
    args = f"{hex_bytes(UUID(uuid).bytes_le)} {revision} {len(dwords)} {hex_bytes(buffer)}"
    out = _run(["acpiexec", "-b", f"Evaluate \\_SB.PCI0._OSC {args}", "dsdt.dat"],
               table_files["DSDT"].parent)  # fmt: skip
    assert [line for line in out.splitlines() if COMPLAINT.search(line)] == []
    dumped = re.search(r"\[Buffer\] Length [0-9A-F]+ =\s+0000: ((?:[0-9A-F]{2} )+)", out)
    assert dumped is not None, out
    returned = bytes.fromhex(dumped.group(1))
    return list(struct.unpack(f"<{len(returned) // 4}I", returned))


@pytest.mark.parametrize(
    ("revision", "dwords", "expected"),
    [
        # Linux's request: support, then the controls it wants (no LTR): all granted
        (1, [0, 0x1F, 0x1D], [0, 0x1F, 0x1D]),
        # a query (dword 1 bit 0) for everything: the later bits masked, and said so (bit 4)
        (1, [1, 0x1F, 0xFF], [0x11, 0x1F, 0x1F]),
        (2, [0, 0x1F, 0x1D], [0x08, 0x1F, 0x1D]),  # a revision it does not know: bit 3
        (1, [0, 0x1F], [0x02, 0x1F]),  # no control dword: _OSC failure (bit 1), nothing read
    ],
    ids=["linux", "query-masked", "unknown-revision", "short-buffer"],
)
def test_acpiexec_root_bridge_osc_grants_what_the_pci_firmware_spec_says(
    table_files: dict[str, Path], revision: int, dwords: list[int], expected: list[int]
) -> None:
    assert _osc(table_files, PCI_OSC_UUID, revision, dwords) == expected


def test_acpiexec_root_bridge_osc_flags_an_unknown_uuid(table_files: dict[str, Path]) -> None:
    other = "0811b06e-4a27-44f9-8d60-3cbbc22e7b48"  # the platform-wide _OSC's, not PCI's
    assert _osc(table_files, other, 1, [0, 0, 0]) == [0x04, 0, 0]


def test_acpiexec_finds_a_processor_device_for_each_madt_lapic(
    table_files: dict[str, Path],
) -> None:
    """ACPI 6.5 5.2.12.2: each MADT processor UID (vCPU i has i) names a processor device."""
    script = "; ".join(f"Evaluate \\_SB.C00{i}._HID; Evaluate \\_SB.C00{i}._UID" for i in (0, 1))
    out = _run(["acpiexec", "-b", script, "dsdt.dat"], table_files["DSDT"].parent)
    assert [line for line in out.splitlines() if COMPLAINT.search(line)] == []
    assert out.count('[String] Length 08 = "ACPI0007"') == 2
    assert "[Integer] = 0000000000000001" in out
    assert "AE_NOT_FOUND" not in out


# An SSDT of the test's own that writes the GED's event register as the monitor would set it:
# acpiexec's SystemIO region is memory it keeps, which _EVT then reads.
PRESS_ASL = """DefinitionBlock ("press.aml", "SSDT", 2, "SPLITV", "PRESS", 1)
{
    External (\\_SB.GED.ESEL, FieldUnitObj)
    Method (\\PRES, 1) { \\_SB.GED.ESEL = Arg0 }
}
"""
NOTIFIED = "Received a Device Notify on [PWRB]"


@pytest.mark.parametrize(("events", "notified"), [(GED_POWER_BUTTON, True), (1, False), (0, False)])
def test_acpiexec_ged_event_notifies_the_power_button_only_for_its_bit(
    table_files: dict[str, Path], events: int, notified: bool
) -> None:
    """ACPI 6.3 5.6.9: the OS runs _EVT with the GED's interrupt number; ours reads the event
    register and notifies \\_SB.PWRB (PNP0C0C) with 0x80, "pressed" (5.6.6), when the power
    button's bit is set, and nothing else."""
    where = table_files["DSDT"].parent
    (where / "press.asl").write_text(PRESS_ASL)
    _run(["iasl", "press.asl"], where)
    script = f"Evaluate \\PRES {events}; Evaluate \\_SB.GED._EVT {layout.ACPI_GED_GSI}; "
    script += "Evaluate \\_SB.PWRB._HID"
    names = [table_files[s].name for s in ("FACP", "DSDT")]
    out = _run(["acpiexec", "-b", script, *names, "press.aml"], where)
    assert [line for line in out.splitlines() if COMPLAINT.search(line)] == []
    assert "Evaluation of \\_SB.PWRB._HID returned" in out
    assert "[Integer] = 000000000C0CD041" in out  # EISAID("PNP0C0C"): a power button
    assert (f"{NOTIFIED} 0x" in out and "Value 0x80" in out) is notified
    assert out.count(NOTIFIED) == int(notified)
