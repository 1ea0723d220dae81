"""The saved state of a virtio PCI function (transport), which each model's State extends.

Untrusted when read back (a snapshot file): the schema checks each field's range, and
VirtioPciDevice.restore checks what ties fields together (a queue size the device offers, a
vector its table has, a pending bit of a vector that exists)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from splitvmm.devprocs.base import DeviceState
from splitvmm.protocol import schema
from splitvmm.record import Struct

U8 = Annotated[int, schema.U8]
U16 = Annotated[int, schema.U16]
U32 = Annotated[int, schema.U32]
U64 = Annotated[int, schema.U64]
MAX_QUEUES = 64  # more than any model here has (the descriptor says how many)
MAX_VECTORS = 64  # queues + 1


class QueueState(Struct, frozen=True):
    """One virtqueue's configuration (common cfg) and where the device is in it."""

    size: U16
    msix_vector: U16
    enabled: bool
    desc: U64
    driver: U64
    device: U64
    last_avail: U16  # the next available-ring index the device takes
    used_idx: U16  # the device's used index


class MsixEntryState(Struct, frozen=True):
    address: U64
    data: U32
    masked: bool


class VirtioPciState(DeviceState, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1
    # configuration space
    command: U16 = 0
    interrupt_line: U8 = 0xFF
    msix_enabled: bool = False
    msix_function_mask: bool = False
    msix_table: Annotated[tuple[MsixEntryState, ...], schema.MaxLen(MAX_VECTORS)] = ()
    msix_pending: U64 = 0
    pci_cfg_bar: U8 = 0  # the VIRTIO_PCI_CAP_PCI_CFG window's selection
    pci_cfg_offset: U32 = 0
    pci_cfg_length: U32 = 0
    # common configuration (virtio 1.2 4.1.4.3)
    status: U8 = 0
    device_feature_select: U32 = 0
    driver_feature_select: U32 = 0
    driver_features: Annotated[int, schema.Range(0, (1 << 128) - 1)] = 0
    msix_config: U16 = 0xFFFF
    config_generation: U8 = 0
    queue_select: U16 = 0
    isr: U8 = 0
    queues: Annotated[tuple[QueueState, ...], schema.MaxLen(MAX_QUEUES)] = ()
