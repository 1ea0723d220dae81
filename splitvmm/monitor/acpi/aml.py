"""A small AML encoder: the named objects, resource descriptors and the few method terms our
DSDT needs (the root bridge's _OSC, the Generic Event Device's _EVT).

Each function returns the bytes of one term, encoded as ACPI 6.5 chapter 20 ("ACPI Machine
Language Specification") and 6.4 ("Resource Data Types for ACPI") say; unit tests pin them
against what iasl compiles from the equivalent ASL.
"""

from __future__ import annotations

import struct
import uuid as uuid_module

# 20.2.5 opcodes and prefixes
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
OP_REGION_OP, FIELD_OP = 0x80, 0x81  # after EXT_OP_PREFIX (20.2.5.2)
ROOT_CHAR, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = ord("\\"), 0x2E, 0x2F
ONES = (1 << 64) - 1
# 20.2.5.2-4: methods and the terms inside them
METHOD_OP, RETURN_OP, IF_OP, ELSE_OP = 0x14, 0xA4, 0xA0, 0xA1
STORE_OP, AND_OP, OR_OP, CREATE_DWORD_FIELD_OP = 0x70, 0x7B, 0x7D, 0x8A
NOTIFY_OP = 0x86
LNOT_OP, LEQUAL_OP, LLESS_OP = 0x92, 0x93, 0x95
LOCAL0_OP, ARG0_OP = 0x60, 0x68
MAX_METHOD_ARGS = 7
METHOD_SERIALIZED = 1 << 3  # MethodFlags bit 3 (20.2.5.2)
NULL_TARGET = b"\x00"  # NullName as an operator's target: the result is only returned
# 19.6.100 OperationRegion spaces, 20.2.5.2 FieldFlags: AccessType in bits 0-3, LockRule in
# bit 4, UpdateRule in bits 5-6
REGION_SYSTEM_IO = 0x01
FIELD_DWORD_ACC = 0x03
FIELD_WRITE_AS_ZEROS = 0x02 << 5

# 6.4 resource descriptors: small items (tag byte = type << 3 | length) and large items.
SMALL_IRQ_NO_FLAGS = 0x22  # IRQ descriptor, 2 bytes: the mask alone (edge, active high)
SMALL_IO = 0x47  # I/O port descriptor, 7 bytes
SMALL_END_TAG = 0x79
LARGE_MEMORY32_FIXED = 0x86
LARGE_DWORD_ADDRESS = 0x87
LARGE_WORD_ADDRESS = 0x88
LARGE_EXTENDED_INTERRUPT = 0x89
# 6.4.3.6 Extended Interrupt Descriptor flags: consumer (bit 0), edge (bit 1); active high
# (bit 2 clear) and exclusive (bit 3 clear)
INTERRUPT_CONSUMER, INTERRUPT_EDGE = 1 << 0, 1 << 1
IO_DECODE_16 = 0x01
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS = 0, 1, 2
# 6.4.3.5.5 general flags: producer (bit 0 clear), positive decode, MinFixed, MaxFixed.
ADDRESS_PRODUCER_FIXED = 0x0C
IO_ENTIRE_RANGE = 0x03  # 6.4.3.5.5 I/O type-specific flags: both ISA and non-ISA ranges
MEM_READ_WRITE = 0x01  # memory type-specific flags: read-write, non-cacheable


def pkg_length(content_len: int) -> bytes:
    """PkgLength (20.2.4) of a package whose contents after PkgLength are content_len bytes;
    the encoded length counts its own bytes."""
    for extra in range(4):
        total = content_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([extra << 6 | (total & 0xF)]) + rest
    raise ValueError(f"AML package of {content_len} bytes is too long for a PkgLength")


def _packaged(*opcode: int, body: bytes) -> bytes:
    """A term whose opcode is followed by the PkgLength of `body`, then `body` (Scope,
    Device, Buffer, Package, Method, If, Else: 20.2.5)."""
    return bytes(opcode) + pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"AML name segment {seg!r} is not 1-4 characters from A-Z or _")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString (20.2.2): an optional root prefix and one or more segments by '.'."""
    prefix = bytes([ROOT_CHAR]) if path.startswith("\\") else b""
    segs = [name_seg(s) for s in path.lstrip("\\").split(".")] if path.strip("\\") else []
    if len(segs) == 0:
        return prefix + b"\x00"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest ComputationalData for an integer, as iasl emits it."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == ONES:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A08"): three letters packed 5 bits each, then four hex digits, as a
    big-endian dword (19.6.35), emitted as a DWordConst."""
    if len(text) != 7 or not text[:3].isupper() or not text[:3].isalpha():
        raise ValueError(f"EISA id {text!r} is not three capitals and four hex digits")
    letters = [ord(c) - ord("@") for c in text[:3]]
    packed = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return bytes([DWORD_PREFIX]) + packed.to_bytes(4, "big")


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return _packaged(SCOPE_OP, body=body)


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return _packaged(EXT_OP_PREFIX, DEVICE_OP, body=body)


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return _packaged(BUFFER_OP, body=body)


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return _packaged(PACKAGE_OP, body=body)


def uuid(text: str) -> bytes:
    """ToUUID ("..."): a 16-byte Buffer, the first three fields little-endian (19.6.142)."""
    return buffer(uuid_module.UUID(text).bytes_le)


# -- methods (20.2.5.2) -----------------------------------------------------------------------


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    """Method (path, args, NotSerialized or Serialized): flags are the argument count and
    the serialize flag, sync level 0."""
    if not 0 <= args <= MAX_METHOD_ARGS:
        raise ValueError(f"an AML method takes 0 to {MAX_METHOD_ARGS} arguments, not {args}")
    flags = args | (METHOD_SERIALIZED if serialized else 0)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return _packaged(METHOD_OP, body=body)


def arg(n: int) -> bytes:
    return bytes([ARG0_OP + n])


def local(n: int) -> bytes:
    return bytes([LOCAL0_OP + n])


def ref(path: str) -> bytes:
    """A named object used as an operand or a target."""
    return name_string(path)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    body = predicate + b"".join(terms)
    return _packaged(IF_OP, body=body)


def else_(*terms: bytes) -> bytes:
    body = b"".join(terms)
    return _packaged(ELSE_OP, body=body)


def create_dword_field(source: bytes, byte_index: int, path: str) -> bytes:
    return bytes([CREATE_DWORD_FIELD_OP]) + source + integer(byte_index) + name_string(path)


def store(source: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + source + target


def and_(a: bytes, b: bytes, target: bytes) -> bytes:
    return bytes([AND_OP]) + a + b + target


def or_(a: bytes, b: bytes, target: bytes) -> bytes:
    return bytes([OR_OP]) + a + b + target


def lequal(a: bytes, b: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + a + b


def lless(a: bytes, b: bytes) -> bytes:
    return bytes([LLESS_OP]) + a + b


def lnot(a: bytes) -> bytes:
    return bytes([LNOT_OP]) + a


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def notify(path: str, value: int) -> bytes:
    """Notify (path, value): tell the OS of an event on the object at `path` (5.6.6)."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# -- operation regions and fields (19.6.100, 19.6.48) --------------------------------------


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    """OperationRegion (path, space, offset, length)."""
    body = name_string(path) + bytes([space]) + integer(offset) + integer(length)
    return bytes([EXT_OP_PREFIX, OP_REGION_OP]) + body


def field(region: str, flags: int, *units: tuple[str, int]) -> bytes:
    """Field (region, flags) {name, bits, ...}: named units laid out from the region's start.
    A unit's width is encoded as a PkgLength holding the bit count itself (20.2.5.2
    NamedField), not counting its own bytes as a package's length does."""
    body = name_string(region) + bytes([flags])
    for unit, bits in units:
        if not 0 < bits < 0x40:
            raise ValueError(f"field unit {unit}: {bits} bits is outside what one byte encodes")
        body += name_seg(unit) + bytes([bits])
    return _packaged(EXT_OP_PREFIX, FIELD_OP, body=body)


# -- resource descriptors (6.4) ------------------------------------------------------------


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate: a Buffer of descriptors closed by an End Tag (checksum 0: none)."""
    return buffer(b"".join(descriptors) + bytes([SMALL_END_TAG, 0]))


def io(base: int, length: int, alignment: int = 1) -> bytes:
    """IO (Decode16, base, base, alignment, length): a fixed 16-bit port range (6.4.2.5)."""
    return struct.pack("<BBHHBB", SMALL_IO, IO_DECODE_16, base, base, alignment, length)


def memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed (ReadWrite, base, length): a fixed memory range (6.4.3.4)."""
    return struct.pack("<BHBII", LARGE_MEMORY32_FIXED, 9, MEM_READ_WRITE, base, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: ISA IRQs, edge-triggered, active high (6.4.2.1)."""
    mask = sum(1 << irq for irq in irqs)
    return struct.pack("<BH", SMALL_IRQ_NO_FLAGS, mask)


def extended_interrupt(*gsis: int) -> bytes:
    """Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsis}: global system
    interrupts, no resource source (6.4.3.6)."""
    body = struct.pack(f"<BB{len(gsis)}I", INTERRUPT_CONSUMER | INTERRUPT_EDGE, len(gsis), *gsis)
    return struct.pack("<BH", LARGE_EXTENDED_INTERRUPT, len(body)) + body


def _address_fields(low: int, high: int) -> tuple[int, int, int, int, int]:
    """Granularity, minimum, maximum, translation offset, length of an address range."""
    return 0, low, high, 0, high - low + 1


def word_bus_number(first: int, last: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, ...) (6.4.3.5.3)."""
    body = struct.pack(
        "<BBB5H", RESOURCE_BUS, ADDRESS_PRODUCER_FIXED, 0, *_address_fields(first, last)
    )
    return struct.pack("<BH", LARGE_WORD_ADDRESS, len(body)) + body


def dword_io(low: int, high: int) -> bytes:
    """DWordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    body = struct.pack(
        "<BBB5I", RESOURCE_IO, ADDRESS_PRODUCER_FIXED, IO_ENTIRE_RANGE, *_address_fields(low, high)
    )
    return struct.pack("<BH", LARGE_DWORD_ADDRESS, len(body)) + body


def dword_memory(low: int, high: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, ...) (6.4.3.5.2)."""
    body = struct.pack(
        "<BBB5I", RESOURCE_MEMORY, ADDRESS_PRODUCER_FIXED, MEM_READ_WRITE,
        *_address_fields(low, high),
    )  # fmt: skip
    return struct.pack("<BH", LARGE_DWORD_ADDRESS, len(body)) + body
