"""RunPage decodes a struct kvm_run page into typed exits and completes read exits.

The page is an anonymous mapping filled through the header's own layout (cffi), as KVM
would fill the vCPU's mmapped page; no /dev/kvm is needed.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

import pytest

from splitvmm.native._kvm import ffi, lib
from splitvmm.native.exits import (
    HLT,
    INTERRUPTED,
    SHUTDOWN,
    UNSTARTED,
    FailEntry,
    InternalError,
    MmioRead,
    MmioWrite,
    PioIn,
    PioOut,
    RunPage,
    SystemEvent,
    SystemEventKind,
    Unknown,
    field_reader,
)

DATA_OFFSET = 0x800  # where "KVM" puts port I/O data in the page (any offset in the page)


class Page:
    """A fake kvm_run page: `run` writes fields by name, `page` decodes them."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, mmap.PAGESIZE)
        self.buf = ffi.from_buffer(self.map)  # SAFETY (test only): closed before self.map
        self.run: Any = ffi.cast("struct kvm_run *", self.buf)
        self.page = RunPage(self.map)

    def io(self, direction: int, port: int, size: int, data: bytes) -> None:
        self.run.exit_reason = lib.KVM_EXIT_IO
        io = self.run.io
        io.direction, io.port, io.size = direction, port, size
        io.count, io.data_offset = len(data) // size, DATA_OFFSET
        self.map[DATA_OFFSET : DATA_OFFSET + len(data)] = data

    def mmio(self, gpa: int, data: bytes, is_write: bool) -> None:
        self.run.exit_reason = lib.KVM_EXIT_MMIO
        mmio = self.run.mmio
        mmio.phys_addr, mmio.len, mmio.is_write = gpa, len(data), is_write
        mmio.data[0 : len(data)] = list(data)

    def close(self) -> None:
        self.page.close()
        self.run = self.buf = None
        self.map.close()


@pytest.fixture
def fake() -> Iterator[Page]:
    page = Page()
    yield page
    page.close()


def test_runpage_pio_out_gives_port_size_and_bytes(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_OUT, 0x3F8, 1, b"A")

    assert fake.page.decode() == PioOut(0x3F8, 1, b"A")


def test_runpage_rep_outs_gives_every_access_in_order(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_OUT, 0x510, 2, b"\x01\x02\x03\x04\x05\x06")

    assert fake.page.decode() == PioOut(0x510, 2, b"\x01\x02\x03\x04\x05\x06")


def test_runpage_pio_in_completed_read_lands_at_data_offset(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_IN, 0x3FD, 1, b"\x00\x00")

    ex = fake.page.decode()
    fake.page.complete_read(b"\x60\x61")

    assert (ex, fake.map[DATA_OFFSET : DATA_OFFSET + 2]) == (PioIn(0x3FD, 1, 2), b"\x60\x61")


def test_runpage_complete_read_of_wrong_length_raises(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_IN, 0x3FD, 4, bytes(4))
    fake.page.decode()

    with pytest.raises(ValueError, match="wants 4 bytes, 1 given"):
        fake.page.complete_read(b"\x00")


def test_runpage_complete_read_after_a_write_exit_raises(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_IN, 0x3FD, 1, b"\x00")
    fake.page.decode()
    fake.io(lib.KVM_EXIT_IO_OUT, 0x3F8, 1, b"A")
    fake.page.decode()

    with pytest.raises(ValueError, match="no port or MMIO read exit is pending"):
        fake.page.complete_read(b"\x00")


def test_runpage_mmio_write_gives_gpa_and_data(fake: Page) -> None:
    fake.mmio(0xD000_0010, b"\x11\x22\x33\x44", is_write=True)

    assert fake.page.decode() == MmioWrite(0xD000_0010, b"\x11\x22\x33\x44")


def test_runpage_mmio_read_completed_read_lands_in_mmio_data(fake: Page) -> None:
    fake.mmio(0xD000_0000, bytes(2), is_write=False)

    ex = fake.page.decode()
    fake.page.complete_read(b"\xbe\xef")

    assert (ex, bytes(fake.run.mmio.data[0:2])) == (MmioRead(0xD000_0000, 2), b"\xbe\xef")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [(lib.KVM_EXIT_HLT, HLT), (lib.KVM_EXIT_SHUTDOWN, SHUTDOWN), (lib.KVM_EXIT_INTR, INTERRUPTED)],
    ids=["hlt", "shutdown", "intr"],
)
def test_runpage_exit_without_fields_is_its_singleton(fake: Page, reason: int, expected) -> None:
    fake.run.exit_reason = reason

    assert fake.page.decode() is expected


def test_runpage_exit_singletons_differ_from_each_other() -> None:
    assert len({HLT, SHUTDOWN, INTERRUPTED, UNSTARTED}) == 4


def test_runpage_fail_entry_gives_hardware_reason(fake: Page) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    fake.run.fail_entry.hardware_entry_failure_reason = 0x80000021

    assert fake.page.decode() == FailEntry(0x80000021)


def test_runpage_emulation_failure_gives_instruction_bytes(fake: Page) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    failure = fake.run.emulation_failure
    failure.suberror, failure.ndata = lib.KVM_INTERNAL_ERROR_EMULATION, 3
    failure.flags = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    failure.insn_size, failure.insn_bytes[0:2] = 2, [0xF3, 0x0F]

    ex = fake.page.decode()

    assert (ex, ex.emulation_failure) == (
        InternalError(lib.KVM_INTERNAL_ERROR_EMULATION, b"\xf3\x0f"),
        True,
    )


def test_runpage_emulation_failure_without_bytes_flag_gives_none(fake: Page) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    fake.run.internal.suberror, fake.run.internal.ndata = lib.KVM_INTERNAL_ERROR_EMULATION, 0

    assert fake.page.decode() == InternalError(lib.KVM_INTERNAL_ERROR_EMULATION, None)


def test_runpage_other_internal_error_is_no_emulation_failure(fake: Page) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    fake.run.internal.suberror = lib.KVM_INTERNAL_ERROR_DELIVERY_EV

    ex = fake.page.decode()

    assert (ex, ex.emulation_failure) == (
        InternalError(lib.KVM_INTERNAL_ERROR_DELIVERY_EV, None),
        False,
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (lib.KVM_SYSTEM_EVENT_SHUTDOWN, SystemEventKind.SHUTDOWN),
        (lib.KVM_SYSTEM_EVENT_RESET, SystemEventKind.RESET),
        (lib.KVM_SYSTEM_EVENT_CRASH, SystemEventKind.OTHER),
    ],
    ids=["shutdown", "reset", "crash"],
)
def test_runpage_system_event_gives_its_kind(
    fake: Page, kind: int, expected: SystemEventKind
) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
    fake.run.system_event.type = kind

    assert fake.page.decode() == SystemEvent(expected, kind)


def test_runpage_unhandled_reason_is_unknown_with_header_name(fake: Page) -> None:
    fake.run.exit_reason = lib.KVM_EXIT_DEBUG

    assert fake.page.decode() == Unknown(lib.KVM_EXIT_DEBUG, "KVM_EXIT_DEBUG")


def test_runpage_reason_missing_from_header_list_is_unknown_question_mark(fake: Page) -> None:
    fake.run.exit_reason = 0xFFFF

    assert fake.page.decode() == Unknown(0xFFFF, "?")


def test_runpage_immediate_exit_sets_and_clears_the_field(fake: Page) -> None:
    fake.page.set_immediate_exit(True)
    on = fake.run.immediate_exit
    fake.page.set_immediate_exit(False)

    assert (on, fake.run.immediate_exit) == (1, 0)


def test_field_reader_unpacks_fields_at_header_offsets(fake: Page) -> None:
    fake.io(lib.KVM_EXIT_IO_OUT, 0x1234, 4, bytes(8))

    reader = field_reader("struct kvm_run", "exit_reason", "io.port", "io.count")

    assert reader.unpack_from(fake.map) == (lib.KVM_EXIT_IO, 0x1234, 2)


def test_field_reader_rejects_fields_out_of_order() -> None:
    with pytest.raises(ValueError, match=r"io\.size is not after"):
        field_reader("struct kvm_run", "io.port", "io.size")


def test_access_record_equals_neither_a_tuple_nor_another_record() -> None:
    assert (
        PioIn(0x60, 1, 1) == (0x60, 1, 1),
        PioIn(0x60, 1, 1) != (0x60, 1, 1),
        MmioRead(0x60, 1) == MmioWrite(0x60, 1),  # type: ignore[arg-type]
        PioIn(0x60, 1, 1) == PioIn(0x60, 1, 1),
    ) == (False, True, False, True)
