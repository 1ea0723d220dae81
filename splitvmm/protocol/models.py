"""Model descriptors: what the monitor needs to know of a device model, and nothing more.

The monitor never imports a device model (splitvmm/devprocs): it builds a VM from these
descriptors alone. A descriptor says where the model sits on the platform (its transport:
a port window and an interrupt line today, a PCI function with config space and BARs for
virtio), which options its config section takes (and which of them name a host resource,
which a snapshot must never supply), which fds its process receives (by role kind: the
monitor knows how to make an irq eventfd or open an output, never what a UART is), and
the version of its saved state.

Adding a device model: its module in splitvmm/devprocs/ (registered with
devprocs.base.register, which checks the model against its descriptor here), its seccomp
policy in policies/<arch>/, its tests, and one entry in MODELS below.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable, Mapping

from splitvmm.protocol.wire import ACCESS_SIZES, MAX_MIRRORED, MIRROR_BYTES
from splitvmm.record import Struct

UNIX_OUTPUT = "unix:"  # an output option's prefix for a UNIX socket: "unix:PATH"
# DeviceSpec.transport key, True where the device's output is a regular file another device
# writes too: its growth says what neither line took (monitor/slot.py mark_shared_outputs)
OUTPUT_SHARED = "output_shared"
# O_DIRECT moves whole blocks between a disk image and memory: its file offsets, lengths and
# buffer addresses aligned to the file system's block (statx's STATX_DIOALIGN, 512 on most
# disks). 4 KiB is the largest logical block in common use, so the monitor refuses a direct
# image whose size or first block this does not fit, and a device bounces what it misses.
DIRECT_IO_ALIGN = 4096
# The byte of a device's progress page (FdKind.PROGRESS) that says, while it is 1, that the
# device is inside a host I/O call that may block for long: the monitor then waits for it
# past a request's deadline, rather than failing it as hung (devprocs/progress.py).
PROGRESS_HOST_IO_BYTE = 64
# Where a PCI device's progress page has a byte per MSI-X vector (PROGRESS_MAX_VECTORS of
# them): 1 while the device would send the vector's message (MSI-X enabled, neither the
# function nor the vector masked, Bus Master Enable set, and the monitor's route for the
# vector holds the message its entry holds now), 0 otherwise. A device left dead has its
# vectors signalled by the monitor, which signals only these (PCI 3.0 6.8.2.9: a masked
# vector's message is not sent) (devprocs/virtio/msix.py, monitor/devicefds.py).
PROGRESS_VECTORS_AT = 192
# The byte before them: 1 while the function's MSI-X Enable is set. PCI 3.0 6.8.2.3: the
# function may not use its INTx# pin then, so the monitor does not raise the INTx of a device
# it leaves dead while it is 1 (monitor/machine.py _leave_intx).
PROGRESS_MSIX_ENABLED_BYTE = PROGRESS_VECTORS_AT - 1
PROGRESS_MAX_VECTORS = 128


def unix_output_path(value: object) -> str | None:
    """The socket path an output option names after "unix:"; None for stdio or a file."""
    text = str(value)
    return text.removeprefix(UNIX_OUTPUT) if text.startswith(UNIX_OUTPUT) else None


class FdKind(enum.Enum):
    """What the monitor puts behind an fd role of a device process."""

    IRQ = "irq"  # an eventfd registered as an irqfd on the port window's ISA line
    OUTPUT = "output"  # the stream named by an option: "stdio", a file path, "unix:PATH"
    # -- PCI functions (virtio) --
    GUEST_RAM = "guest-ram"  # the guest RAM memfd; where it sits: DeviceSpec.transport["ram"]
    # A memfd of two bitmaps of one bit per 4 KiB page of the RAM memfd (bit n of byte n // 8 =
    # page n), each half of it: in the first the device marks every page it writes (KVM's
    # dirty log sees vCPU writes only); into the second, the harvest, it moves them when asked
    # (harvest_dirty: devprocs/virtio/guestram.py, monitor/dirtylog.py).
    DIRTY_LOG = "dirty-log"
    # A memfd page that outlives each process of the device: what one writes there (its
    # transmit progress, a latched error, which used rings it wrote: devprocs/progress.py),
    # the one started after its crash reads; and its host-I/O flag (PROGRESS_HOST_IO_BYTE),
    # which the monitor reads.
    PROGRESS = "progress"
    NOTIFY = "notify"  # an ioeventfd on the notify address of queue `index`
    MSIX = "msix"  # an irqfd for MSI-X vector `index`: its route is asked for (protocol/events)
    INTX = "intx"  # an irqfd (level, with a resample fd) on the function's INTx GSI
    INTX_RESAMPLE = "intx-resample"  # signalled when the guest ends an INTx interrupt (EOI)
    # The file `option` names: read-only when option `readonly_option` is true, and with
    # O_DIRECT (no host page cache) when option `direct_option` is (DIRECT_IO_ALIGN).
    DISK = "disk"
    # The file of the DISK role with the same option, opened again read-only, once for the
    # VM's life: an open file description of its own, which tells of each write-back error
    # of the file once (errseq), whoever else's sync took it. A process started after its
    # device's crash asks it, for a failure the dead process's sync took with it
    # (devprocs/virtio_blk.py). No process of the device syncs it otherwise.
    DISK_ERRORS = "disk-errors"
    # The TAP interface `option` names (made if missing), opened with a virtio net header
    # per frame (native/tun.py): the device reads and writes frames, nothing else.
    TAP = "tap"


class FdRole(Struct, frozen=True):
    name: str  # the key in the device's DeviceSpec.fds
    kind: FdKind
    option: str = ""  # OUTPUT, DISK, TAP: the option naming the stream, file or interface
    index: int = 0  # NOTIFY: the queue; MSIX: the vector
    readonly_option: str = ""  # DISK: the bool option that opens it read-only
    direct_option: str = ""  # DISK: the bool option that opens it with O_DIRECT
    min_size: int = 0  # DISK: the fewest bytes the file may hold (the model's smallest disk)


def indexed_roles(prefix: str, kind: FdKind, count: int) -> tuple[FdRole, ...]:
    """`count` roles prefix0, prefix1, ...: one per queue or vector."""
    return tuple(FdRole(f"{prefix}{i}", kind, index=i) for i in range(count))


class PortWindow(Struct, frozen=True):
    """An x86 port-I/O window at a fixed address (ISA), with its ISA interrupt line."""

    base: int
    size: int  # bytes of port space the model decodes (its Device.WINDOW)
    irq: int | None = None  # ISA IRQ = IOAPIC pin = GSI
    acpi_hid: str | None = None  # its PNP id in the DSDT (kernel boot), if an OS looks for it


class BarKind(enum.Enum):
    """What a base address register decodes (PCI Local Bus 3.0, 6.2.5.1)."""

    IO = "io"  # port I/O space
    MEM32 = "mem32"  # memory below 4 GiB, one BAR register
    MEM64 = "mem64"  # memory anywhere, two BAR registers (this one and the next)


class PciBar(Struct, frozen=True):
    """One BAR of a PCI function: the monitor places it in the PCI hole and owns its decode."""

    index: int  # 0-5; a MEM64 BAR also takes index + 1
    size: int  # a power of two: at least 16 bytes of memory or 4 ports
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False


class QueueNotify(Struct, frozen=True):
    """Where a virtio function's queue notify addresses are (virtio 1.2 4.1.4.4): queue q's
    at BAR `bar` + `offset` + q * `multiplier`. The monitor puts an ioeventfd on each (fd
    roles of kind NOTIFY), at the BAR's current base: a guest write there costs no exit."""

    bar: int
    offset: int
    multiplier: int
    queues: int


class Region(Struct, frozen=True):
    """A part of a PCI function's window on its device channel (see PciFunction)."""

    start: int  # offset in the flat window
    size: int
    bar: int | None  # None: the configuration space


CONFIG_REGION_SIZE = 4096  # PCI Express configuration space (ECAM reaches all of it)
REGION_ALIGN = 4096


class PciFunction(Struct, frozen=True):
    """A PCI function on bus 0. Its device process serves its configuration space (header,
    capabilities) and its BARs' registers; the monitor owns what it must: the BAR registers
    (placement, sizing, moves), the command register's decode enables, the ioeventfds on
    queue notify addresses, the MSI-X and INTx routes (after it checks what the device asks).

    On the device channel a function is one flat window (wire offsets): the configuration
    space at 0, then each BAR's registers in BAR order, each region 4 KiB aligned
    (regions()); so frames, journal and replay stay those of a port window."""

    bars: tuple[PciBar, ...]
    notify: QueueNotify | None = None
    msix_vectors: int = 0  # MSI-X table entries (the table itself is the device's)
    intx: bool = False  # INTA#: an irqfd on a GSI the monitor chooses (_PRT in the DSDT)
    # Writes the vCPU waits for the device to apply: (bar, offset, size), bar None for the
    # configuration space. A write there may make the device ask for an interrupt route
    # (MSI-X enabled or a vector unmasked), which must be in place before the guest runs
    # on: the monitor follows such a write with a sync, serving the device's route events.
    # Other writes stay posted.
    sync_writes: tuple[tuple[int | None, int, int], ...] = ()

    def regions(self) -> tuple[Region, ...]:
        out = [Region(0, CONFIG_REGION_SIZE, None)]
        start = CONFIG_REGION_SIZE
        for bar in sorted(self.bars, key=lambda b: b.index):
            out.append(Region(start, bar.size, bar.index))
            start += -(-bar.size // REGION_ALIGN) * REGION_ALIGN
        return tuple(out)

    def region_of_bar(self, index: int) -> Region:
        return next(r for r in self.regions() if r.bar == index)

    def sync_ranges(self) -> tuple[tuple[int, int], ...]:
        """sync_writes as [start, end) ranges of the flat window."""
        out = []
        for bar, offset, size in self.sync_writes:
            region = self.regions()[0] if bar is None else self.region_of_bar(bar)
            out.append((region.start + offset, region.start + offset + size))
        return tuple(out)

    @property
    def size(self) -> int:
        """The flat window's size (a device's WINDOW)."""
        last = self.regions()[-1]
        return last.start + -(-last.size // REGION_ALIGN) * REGION_ALIGN


Transport = PortWindow | PciFunction


PAUSE_CHOICES = ("pause", "error")  # a pause_option's values (ModelDescriptor)


class Option(Struct, frozen=True):
    """One option of a model's [[device]] table.

    host_resource: the option names something on the host (a path, a socket, later an
    image or a TAP). A restore takes it from the operator only: `restore_default` if the
    operator names none, or a refusal when that is None."""

    name: str
    kind: type  # str, int or bool
    default: object  # the value when the table leaves it out
    choices: tuple[object, ...] = ()  # empty: any value of `kind`
    host_resource: bool = False
    restore_default: str | None = None
    # A host path: a relative one is taken from the config file's directory, as boot's paths
    # are (an output's after its "unix:" prefix; "stdio" names none).
    path: bool = False
    # The value when the table leaves the option out, from (VM name, device name), when no
    # constant will do (a MAC address: each NIC its own, the same at every start).
    derive: Callable[[str, str], object] | None = None
    # What is wrong with a value (of `kind`), or None: the config names the option with it,
    # before any process starts; the model's process, given options, asks the same.
    check: Callable[[object], str | None] | None = None


class OutputRecipe(Struct, frozen=True):
    """How to make a model emit output through its registers, for workloads that must
    stall its output (`splitvmm policy audit`): posted writes of (offset, value) that set
    it up, then writes of any byte at `emit_offset` each emit that byte."""

    setup: tuple[tuple[int, int], ...]
    emit_offset: int


class InterruptRecipe(Struct, frozen=True):
    """How to make a model raise its interrupt again and again, for workloads that must see
    its timed events (`splitvmm policy audit`): posted writes of (offset, value) that start
    it, then for each interrupt the `ack` writes and a read at `ack_read`, then `stop`."""

    start: tuple[tuple[int, int], ...]
    ack: tuple[tuple[int, int], ...]
    ack_read: int
    stop: tuple[tuple[int, int], ...]


class QueueRecipe(Struct, frozen=True):
    """What one of a virtio model's queues is given, for workloads that must see it do its
    I/O (`splitvmm policy audit`): chains of (the bytes the driver sends, how many bytes it
    lets the device write), each made available and notified in turn; with
    `backend_input`, the device's backend (a TAP's stand-in) delivers that first for each
    chain (a frame the device receives into it); with `host_input`, the monitor sends it as
    host input first (a console's receive queue fills from it)."""

    chains: tuple[tuple[bytes, int], ...]
    queue: int = 0
    backend_input: bytes = b""
    host_input: bytes = b""
    # Device features (bits 0-31) the driver takes, beside VERSION_1, for these chains: a
    # device serves a command only to a driver that took its feature
    features: int = 0


class ModelDescriptor(Struct, frozen=True):
    name: str  # the config's `model`, the policy's file name, the log name
    transport: Transport
    options: tuple[Option, ...] = ()
    fds: tuple[FdRole, ...] = ()
    state_version: int = 1
    # A device every VM has unless `[vm] <name> = false` (the PC's RTC), with this name.
    default_device: str | None = None
    # Host input (the operator's keyboard when its output is stdio) goes to this device.
    console: bool = False
    # ...and, with a `unix:` output, what the socket's peer writes (virtio-console; the
    # 8250 takes its input from the keyboard only).
    peer_input: bool = False
    output_recipe: OutputRecipe | None = None  # a model with an OUTPUT fd role has one
    interrupt_recipe: InterruptRecipe | None = None  # a model with timed interrupts has one
    queue_recipes: tuple[QueueRecipe, ...] = ()  # a virtio model has one per queue it audits
    # Registers, (offset, size) in its window, whose values the device publishes so that the
    # monitor answers their reads itself (monitor/mirror.py): only registers a read of which
    # may have no side effect; the device says, with each value, whether it may now. At most
    # MAX_MIRRORED of them, MIRROR_BYTES together.
    mirrored: tuple[tuple[int, int], ...] = ()
    # Registers, (offset, size) in its port window, whose writes the monitor may hold back
    # and deliver later, in order (monitor/writebehind.py): KVM keeps them without an exit.
    # They reach the device before its next access other than a read its mirror answers,
    # before a snapshot, and within a few milliseconds: a model declares only registers
    # whose write the guest sees the effect of through those reads and its interrupts alone.
    write_behind: tuple[tuple[int, int], ...] = ()
    # When: while every mirrored register at offset has (value & mask) == value (none given:
    # always), all read from one MIRROR; registers the monitor reads from the device's
    # MIRROR, nothing else of their meaning.
    write_behind_while: tuple[tuple[int, int, int], ...] = ()
    # While every (offset, mask, value) holds of its mirrored registers, the model raises no
    # interrupt but in answer to a frame: what it does on its own (its output line draining)
    # shows only through its mirrored registers. A read may then be answered from a MIRROR
    # that the device's news has not refreshed (monitor/mirror.py, news); () never.
    quiet_while: tuple[tuple[int, int, int], ...] = ()
    # The option (its values PAUSE_CHOICES) with which the operator lets the device pause the
    # VM when the host runs out of what a request needs (a full file system): its "stall"
    # event (protocol/events.py), which the monitor takes only where this option is "pause".
    pause_option: str = ""
    # Told the machine's RAM and vCPUs (DeviceSpec.transport["machine"]): what a PC's CMOS
    # NVRAM says of them to firmware, which the RTC holds.
    machine_facts: bool = False
    # A network link the operator takes down and up (`ctl link`, the control op `link`):
    # while it is down the device drops every frame both ways, as a cable pulled out would.
    link: bool = False
    # Requests an io-error fault (protocol/faults.py) may fail, as a failing disk would: the
    # model serves requests of the kinds faults.REQUEST_KINDS names (devprocs/faults.py).
    request_faults: bool = False

    def __post_init__(self) -> None:
        if self.pause_option and self.option(self.pause_option).choices != PAUSE_CHOICES:
            raise ValueError(f"{self.name}: {self.pause_option} must offer {PAUSE_CHOICES}")
        check_mirrored(self.name, self.mirrored, self.transport.size)
        check_write_behind(self.name, self.write_behind, self.transport)
        check_conditions(self.name, "write_behind_while", self.write_behind_while, self.mirrored)
        check_conditions(self.name, "quiet_while", self.quiet_while, self.mirrored)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    @property
    def reads_guest_ram(self) -> bool:
        """Whether its processes are handed guest RAM (a restore starts one only once RAM is
        loaded: monitor/machine.py build)."""
        return any(role.kind is FdKind.GUEST_RAM for role in self.fds)

    def pauses(self, options: Mapping[str, object]) -> bool:
        """Whether a device with these options may stall and pause the VM: its model has a
        pause_option, and `options` (the option's default where they leave it out) say
        "pause". The device decides with this whether to stall, the monitor whether to take
        its stall event."""
        if not self.pause_option:
            return False
        return options.get(self.pause_option, self.option(self.pause_option).default) == "pause"


def check_mirrored(model: str, registers: tuple[tuple[int, int], ...], window: int) -> None:
    """A mirror declaration a MIRROR frame can carry, inside the window, without overlaps."""
    if len(registers) > MAX_MIRRORED or sum(size for _, size in registers) > MIRROR_BYTES:
        raise ValueError(
            f"{model}: mirrors more than {MAX_MIRRORED} registers or {MIRROR_BYTES} bytes"
        )
    taken: set[int] = set()
    for offset, size in registers:
        span = set(range(offset, offset + size))
        if size not in ACCESS_SIZES or offset < 0 or offset + size > window or span & taken:
            raise ValueError(
                f"{model}: mirrored register at {offset:#x} of {size} bytes is not valid"
            )
        taken |= span


def check_conditions(
    model: str,
    what: str,
    conditions: tuple[tuple[int, int, int], ...],
    mirrored: tuple[tuple[int, int], ...],
) -> None:
    """(offset, mask, value) conditions on mirrored registers: each names one, and its mask
    and value fit the register, the value inside the mask."""
    sizes = dict(mirrored)
    for offset, mask, value in conditions:
        size = sizes.get(offset)
        if size is None:
            raise ValueError(f"{model}: {what} names a register at {offset:#x} it does not mirror")
        if not (0 < mask < 1 << 8 * size and value & ~mask == 0):
            raise ValueError(
                f"{model}: {what} has mask {mask:#x} and value {value:#x} at {offset:#x}"
            )


def condition_holds(register: bytes, mask: int, value: int) -> bool:
    """Whether a mirrored register's bytes meet an (offset, mask, value) condition the model
    declared (write_behind_while, quiet_while; check_conditions checked it)."""
    return int.from_bytes(register, "little") & mask == value


def check_write_behind(
    model: str, registers: tuple[tuple[int, int], ...], transport: Transport
) -> None:
    """Write-behind registers: in a port window (KVM coalesces port writes at fixed ports;
    a PCI BAR moves), inside it, without overlaps."""
    if registers and not isinstance(transport, PortWindow):
        raise ValueError(f"{model}: write-behind registers need a port window")
    taken: set[int] = set()
    for offset, size in registers:
        span = set(range(offset, offset + size))
        if size not in ACCESS_SIZES or offset < 0 or offset + size > transport.size or span & taken:
            raise ValueError(
                f"{model}: write-behind register at {offset:#x} of {size} bytes is not valid"
            )
        taken |= span


# The 8250's THRE interrupt known to be off: LCR's DLAB clear (offset 1 mirrors IER, not DLM)
# and IER's THRI clear. Both its write-behind and its quietness rest on it.
_SERIAL_THRI_OFF = ((3, 0x80, 0x00), (1, 0x02, 0x00))

SERIAL = ModelDescriptor(
    name="serial",  # 8250/16550A at COM1
    transport=PortWindow(base=0x3F8, size=8, irq=4, acpi_hid="PNP0501"),  # 16550A-compatible
    options=(
        Option("output", str, "stdio", host_resource=True, restore_default="stdio", path=True),
    ),
    fds=(FdRole("irq", FdKind.IRQ), FdRole("out", FdKind.OUTPUT, option="output")),
    state_version=4,
    console=True,
    # LCR = 8 data bits with DLAB clear (offset 0 is THR), MCR = OUT2 without loopback
    output_recipe=OutputRecipe(setup=((3, 0x03), (4, 0x08)), emit_offset=0),
    # IER (DLM with DLAB), LCR, MCR, LSR, MSR, SCR: no read side effect, except LSR's and
    # MSR's, which the device marks not valid while a read of them would clear a bit.
    mirrored=((1, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1)),
    # THR (DLL with DLAB): a polled driver writes it once per byte, after an LSR read the
    # mirror answers; the device's THR credit covers the writes held meanwhile. Only while
    # THRI is off: a driver that waits for the THRE interrupt instead would wait for the
    # flusher's tick (monitor/writebehind.py). With DLAB set, offset 1 mirrors DLM, not IER,
    # and says nothing of THRI: not then either (a divisor whose DLM had bit 1 clear let a
    # driver with THRI on arm write-behind, its THRE interrupts then held for ticks).
    write_behind=((0, 1),),
    write_behind_while=_SERIAL_THRI_OFF,
    # DLAB clear and IER's THRI off: the line draining is then no interrupt (the THRE one),
    # and every other interrupt answers a frame (input, a write). A polled driver's LSR reads
    # need not ask for news each.
    quiet_while=_SERIAL_THRI_OFF,
)

RTC = ModelDescriptor(
    name="rtc",  # MC146818A CMOS clock, as on every PC
    # index (bit 7: NMI off), data; PNP0B00: an AT-compatible CMOS clock
    transport=PortWindow(base=0x70, size=2, irq=8, acpi_hid="PNP0B00"),
    options=(Option("base", str, "utc", choices=("utc", "localtime")),),
    fds=(FdRole("irq", FdKind.IRQ),),
    state_version=4,
    default_device="rtc",
    machine_facts=True,
    # register A = 32.768 kHz time base at rate 3 (8192 Hz), B = periodic interrupt on,
    # 24 h; each interrupt acknowledged by reading register C
    interrupt_recipe=InterruptRecipe(
        start=((0, 0x0A), (1, 0x23), (0, 0x0B), (1, 0x42)),
        ack=((0, 0x0C),),
        ack_read=1,
        stop=((0, 0x0B), (1, 0x02)),
    ),
)

# -- virtio 1.x over PCI (virtio 1.2 4.1) ------------------------------------------------------
# Every virtio function has the same two 32-bit memory BARs: BAR 0 holds the virtio
# structures (common configuration at 0, ISR at 0x1000, device configuration at 0x2000, queue
# notify addresses from 0x3000, 4 bytes apart), BAR 1 the MSI-X table (at 0) and PBA (0x800).
# Small BARs below 4 GiB, where a 32-bit driver reaches them.
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_REGISTERS_BAR = PciBar(0, 0x4000)
VIRTIO_MSIX_BAR = PciBar(1, 0x1000)
VIRTIO_NOTIFY_OFFSET = 0x3000
VIRTIO_NOTIFY_MULTIPLIER = 4
VIRTIO_COMMON_CFG_SIZE = 0x1000  # the common configuration's page of BAR 0


def virtio_function(queues: int) -> PciFunction:
    """A virtio function with `queues` virtqueues: one MSI-X vector per queue plus one for
    configuration changes, and INTx as the fallback."""
    notify = QueueNotify(0, VIRTIO_NOTIFY_OFFSET, VIRTIO_NOTIFY_MULTIPLIER, queues)
    bars = (VIRTIO_REGISTERS_BAR, VIRTIO_MSIX_BAR)
    # Writes that can change an interrupt route: the MSI-X capability (config space), the
    # MSI-X table and PBA (BAR 1), the common configuration (msix_config,
    # queue_msix_vector, queue_enable, device_status).
    sync_writes = (
        (None, 0, CONFIG_REGION_SIZE),
        (VIRTIO_MSIX_BAR.index, 0, VIRTIO_MSIX_BAR.size),
        (VIRTIO_REGISTERS_BAR.index, 0, VIRTIO_COMMON_CFG_SIZE),
    )
    return PciFunction(
        bars=bars, notify=notify, msix_vectors=queues + 1, intx=True, sync_writes=sync_writes
    )


def virtio_fds(queues: int, *backend: FdRole) -> tuple[FdRole, ...]:
    """What every virtio device process holds, then its backend's fds."""
    return (
        FdRole("ram", FdKind.GUEST_RAM),
        FdRole("dirty", FdKind.DIRTY_LOG),
        *indexed_roles("notify", FdKind.NOTIFY, queues),
        *indexed_roles("msix", FdKind.MSIX, queues + 1),
        FdRole("intx", FdKind.INTX),
        FdRole("intx_resample", FdKind.INTX_RESAMPLE),
        # which used rings it wrote, across restarts; a model's own records too
        FdRole("progress", FdKind.PROGRESS),
        *backend,
    )


BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES: the longest answer to VIRTIO_BLK_T_GET_ID
BLK_SECTOR = 512  # virtio 1.2 5.2.4: capacity, and every request's sector, count these


def blk_serial_problem(value: object) -> str | None:
    """Why `value` cannot be a virtio-blk serial (GET_ID's answer), or None."""
    text = str(value)
    if not text.isascii():  # virtio 1.2 5.2.6: an ASCII string
        return "must be ASCII"
    if len(text) > BLK_ID_BYTES:
        return f"is {len(text)} bytes, at most {BLK_ID_BYTES}"
    return None


def _blk_request(kind: int, sector: int = 0, data: bytes = b"") -> bytes:
    return struct.pack("<IIQ", kind, 0, sector) + data


VIRTIO_BLK = ModelDescriptor(
    name="virtio-blk",  # virtio 1.2 5.2, one request queue
    transport=virtio_function(queues=1),
    options=(
        # default None: the option is required (config.py names it when it is missing)
        Option("path", str, None, host_resource=True, path=True),
        Option("readonly", bool, False),
        Option("direct", bool, False),  # O_DIRECT: the host's page cache left out
        Option("serial", str, "", check=blk_serial_problem),  # VIRTIO_BLK_T_GET_ID's answer
        # A write the host's file system has no room for (ENOSPC, EDQUOT): "pause" the VM
        # until the operator makes room and resumes it, the write then done (QEMU's default,
        # werror=enospc), or fail it ("error": the guest reads IOERR).
        Option("on_full", str, "pause", choices=PAUSE_CHOICES),
    ),
    fds=virtio_fds(
        1,
        FdRole(
            "disk",
            FdKind.DISK,
            option="path",
            readonly_option="readonly",
            direct_option="direct",
            min_size=BLK_SECTOR,  # a disk of no sector is none
        ),
        FdRole("disk-errors", FdKind.DISK_ERRORS, option="path"),
    ),
    state_version=2,
    pause_option="on_full",
    request_faults=True,
    # IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES (zeroing, then unmapping), and a type the
    # device does not know; each request's last writable byte is its status
    queue_recipes=(
        QueueRecipe(
            chains=(
                (_blk_request(0, 1), 1024 + 1),
                (_blk_request(1, 2, bytes(range(256)) * 4), 1),
                (_blk_request(4), 1),
                (_blk_request(8), 20 + 1),
                (_blk_request(11, 0, struct.pack("<QII", 8, 8, 0)), 1),
                (_blk_request(13, 0, struct.pack("<QII", 16, 8, 0)), 1),
                (_blk_request(13, 0, struct.pack("<QII", 24, 8, 1)), 1),
                (_blk_request(99), 1),
            ),
            features=1 << 13 | 1 << 14,  # VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES
        ),
    ),
)

VIRTIO_RNG = ModelDescriptor(
    name="virtio-rng",  # virtio 1.2 5.4, one request queue
    transport=virtio_function(queues=1),
    fds=virtio_fds(1),
    queue_recipes=(QueueRecipe(chains=((b"", 4096),)),),
)

VIRTIO_CONSOLE = ModelDescriptor(
    name="virtio-console",  # virtio 1.2 5.3, one port: receiveq0 (queue 0), transmitq0 (1)
    transport=virtio_function(queues=2),
    options=(
        Option("output", str, "stdio", host_resource=True, restore_default="stdio", path=True),
    ),
    fds=virtio_fds(2, FdRole("out", FdKind.OUTPUT, option="output")),
    console=True,
    peer_input=True,
    state_version=2,
    # receive: two buffers, filled from the host input sent before each; transmit: a line,
    # then more than the audit's pipe and the device's buffer hold (its output stalls until
    # the audit reads, and the chain completes only then)
    queue_recipes=(
        QueueRecipe(chains=((b"", 64), (b"", 4096)), queue=0, host_input=b"input\n"),
        QueueRecipe(chains=((b"hello\n", 0), (bytes(range(32, 127)) * 128, 0)), queue=1),
    ),
)


def default_mac(vm: str, device: str) -> str:
    """A MAC address of its own for each NIC, the same at every start: 52:54:00 (the prefix
    QEMU and libvirt use: locally administered, unicast) and 3 bytes of a hash of the VM's
    and the device's names.

    hashlib is imported here, not with this module: only the monitor's config derives a MAC
    (config.py), and the zygote and the launcher, which import this module too, need not
    load OpenSSL for it (~3 ms and ~0.6 MiB each: bench/startup.py, bench/memory.py)."""
    import hashlib

    digest = hashlib.sha256(f"{vm}\0{device}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00, *digest[:3]))


MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def mac_problem(value: object) -> str | None:
    """Why `value` cannot be a NIC's MAC address ("52:54:00:12:34:56": unicast, not all
    zeroes), or None. Empty: none given, the device's own default."""
    text = str(value)
    if not text:
        return None
    if not MAC_RE.fullmatch(text):
        return "is not six hex bytes, ':'-separated"
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        return "is a multicast address"
    if not any(mac):  # a driver cannot bring its interface up with it (eth_validate_addr)
        return "is the all-zero address"
    return None


VNET_HDR = bytes(12)  # struct virtio_net_hdr with VERSION_1: no offload, num_buffers 0
ETH_FRAME = bytes.fromhex("ffffffffffff5254000000010806") + bytes(46)  # a broadcast frame

VIRTIO_NET = ModelDescriptor(
    name="virtio-net",  # virtio 1.2 5.1: receiveq0, transmitq0; no control queue
    transport=virtio_function(queues=2),
    options=(
        # default None: required; restore takes it from the operator, never the snapshot
        Option("tap", str, None, host_resource=True),
        Option("mac", str, "", derive=default_mac, check=mac_problem),  # "52:54:00:12:34:56"
    ),
    fds=virtio_fds(2, FdRole("tap", FdKind.TAP, option="tap")),
    # a frame received into a buffer the driver posted, then one transmitted
    queue_recipes=(
        QueueRecipe(chains=((b"", 1526),), queue=0, backend_input=VNET_HDR + ETH_FRAME),
        QueueRecipe(chains=((VNET_HDR + ETH_FRAME, 0),), queue=1),
    ),
    state_version=2,  # 2: the link
    link=True,
)

MODELS: dict[str, ModelDescriptor] = {
    d.name: d for d in (SERIAL, RTC, VIRTIO_BLK, VIRTIO_RNG, VIRTIO_CONSOLE, VIRTIO_NET)
}


def module_name(model: str) -> str:
    """The model's module in splitvmm.devprocs (a config name may hold a hyphen)."""
    return model.replace("-", "_")
