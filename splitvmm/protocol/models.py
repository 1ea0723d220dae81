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
from dataclasses import dataclass


class FdKind(enum.Enum):
    """What the monitor puts behind an fd role of a device process."""

    IRQ = "irq"  # an eventfd registered as an irqfd on the transport's interrupt line
    OUTPUT = "output"  # the stream named by an option: "stdio", a file path, "unix:PATH"


@dataclass(frozen=True, slots=True)
class FdRole:
    name: str  # the key in the device's DeviceSpec.fds
    kind: FdKind
    option: str = ""  # OUTPUT: the option naming the stream


@dataclass(frozen=True, slots=True)
class PortWindow:
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


@dataclass(frozen=True, slots=True)
class PciBar:
    """One BAR of a PCI function: the monitor places it in the PCI hole and owns its decode."""

    index: int  # 0-5; a MEM64 BAR also takes index + 1
    size: int  # a power of two: at least 16 bytes of memory or 4 ports
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False


@dataclass(frozen=True, slots=True)
class PciFunction:
    """A PCI function on bus 0 whose configuration space its device process serves, all
    but the BAR registers (the monitor's). Ids and class as the PCI header has them."""

    vendor_id: int
    device_id: int
    class_code: int  # base class, sub-class, programming interface: 24 bits
    bars: tuple[PciBar, ...] = ()


Transport = PortWindow  # (PciFunction joins it with virtio)


@dataclass(frozen=True, slots=True)
class Option:
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


@dataclass(frozen=True, slots=True)
class OutputRecipe:
    """How to make a model emit output through its registers, for workloads that must
    stall its output (`splitvmm policy audit`): posted writes of (offset, value) that set
    it up, then writes of any byte at `emit_offset` each emit that byte."""

    setup: tuple[tuple[int, int], ...]
    emit_offset: int


@dataclass(frozen=True, slots=True)
class InterruptRecipe:
    """How to make a model raise its interrupt again and again, for workloads that must see
    its timed events (`splitvmm policy audit`): posted writes of (offset, value) that start
    it, then for each interrupt the `ack` writes and a read at `ack_read`, then `stop`."""

    start: tuple[tuple[int, int], ...]
    ack: tuple[tuple[int, int], ...]
    ack_read: int
    stop: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ModelDescriptor:
    name: str  # the config's `model`, the policy's file name, the log name
    transport: Transport
    options: tuple[Option, ...] = ()
    fds: tuple[FdRole, ...] = ()
    state_version: int = 1
    # A device every VM has unless `[vm] <name> = false` (the PC's RTC), with this name.
    default_device: str | None = None
    # Host input (the operator's keyboard when its output is stdio) goes to this device.
    console: bool = False
    output_recipe: OutputRecipe | None = None  # a model with an OUTPUT fd role has one
    interrupt_recipe: InterruptRecipe | None = None  # a model with timed interrupts has one

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)


SERIAL = ModelDescriptor(
    name="serial",  # 8250/16550A at COM1
    transport=PortWindow(base=0x3F8, size=8, irq=4, acpi_hid="PNP0501"),  # 16550A-compatible
    options=(Option("output", str, "stdio", host_resource=True, restore_default="stdio"),),
    fds=(FdRole("irq", FdKind.IRQ), FdRole("out", FdKind.OUTPUT, option="output")),
    state_version=2,
    console=True,
    # LCR = 8 data bits with DLAB clear (offset 0 is THR), MCR = OUT2 without loopback
    output_recipe=OutputRecipe(setup=((3, 0x03), (4, 0x08)), emit_offset=0),
)

RTC = ModelDescriptor(
    name="rtc",  # MC146818A CMOS clock, as on every PC
    # index (bit 7: NMI off), data; PNP0B00: an AT-compatible CMOS clock
    transport=PortWindow(base=0x70, size=2, irq=8, acpi_hid="PNP0B00"),
    options=(Option("base", str, "utc", choices=("utc", "localtime")),),
    fds=(FdRole("irq", FdKind.IRQ),),
    default_device="rtc",
    # register A = 32.768 kHz time base at rate 3 (8192 Hz), B = periodic interrupt on,
    # 24 h; each interrupt acknowledged by reading register C
    interrupt_recipe=InterruptRecipe(
        start=((0, 0x0A), (1, 0x23), (0, 0x0B), (1, 0x42)),
        ack=((0, 0x0C),),
        ack_read=1,
        stop=((0, 0x0B), (1, 0x02)),
    ),
)

MODELS: dict[str, ModelDescriptor] = {d.name: d for d in (SERIAL, RTC)}
