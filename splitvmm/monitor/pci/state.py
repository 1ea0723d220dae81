"""What the monitor keeps of the PCI platform, saved in a snapshot (chunk `pci`, kind vm).

A device process saves its own function's state (configuration space, MSI-X table, queues);
what the monitor owns is saved here: each function's BAR registers, decode enables and
Interrupt Disable (a guest may have moved a BAR, or turned decode off; a device left dead
raises no INTx its guest disabled: intx.py), the MSI routes devices asked for (so an
interrupt a restored device raises before it could ask again still arrives), mechanism
#1's address latch (a vCPU may be paused between its `out 0xCF8` and its `in 0xCFC`: once
restored it must reach the register it chose, not read all-ones) and the host bridge's
writable registers (v2; a v1 chunk restores them as a boot leaves them).

A restore builds the VM from the same config, so the same functions sit at the same device
numbers with the same GSIs. The chunk is untrusted: each function is matched by name and
device number, each BAR value goes through the BAR decoder (which keeps only what the BAR's
size and flags allow), and each MSI route is checked as a device's request would be. A
snapshot from before PCI existed has no chunk: every function starts as a fresh boot's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar

from splitvmm.errors import StateError
from splitvmm.monitor.irqroutes import GsiRoutes, msi_message_refused
from splitvmm.monitor.pci.function import PciFunctionHost
from splitvmm.monitor.pci.root import DEVICES, ConfigPorts
from splitvmm.protocol import schema
from splitvmm.protocol.control import MAX_GSI
from splitvmm.protocol.schema import U32, U64, Len, MaxLen, Pattern, Range
from splitvmm.protocol.spec import NAME_RE
from splitvmm.record import Struct

CHUNK = "pci"  # a reserved device name (config.py), like "vm" and "ram"
MAX_MSI_ROUTES = MAX_GSI + 1


class FunctionState(Struct, frozen=True, kw_only=True):
    LABEL: ClassVar[str] = "name"

    name: Annotated[str, Pattern(NAME_RE.pattern, "a device name")]
    device: Annotated[int, Range(0, DEVICES - 1)]
    bars: Annotated[tuple[Annotated[int, U32], ...], Len(6, 6)]  # the six BAR dwords
    command: Annotated[int, Range(0, 0xFFFF)]  # the bits the monitor keeps (function.py)


class MsiRouteState(Struct, frozen=True, kw_only=True):
    gsi: Annotated[int, Range(0, MAX_GSI)]
    address: Annotated[int, U64]
    data: Annotated[int, U32]


class HostBridgeState(Struct, frozen=True, kw_only=True):
    command: Annotated[int, Range(0, 0xFFFF)]
    interrupt_line: Annotated[int, Range(0, 0xFF)]


class PciState(Struct, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 2
    # v1 had neither the latch nor the host bridge: a boot's values (nothing latched).
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {
        1: lambda f: {**f, "config_address": 0, "host_bridge": {"command": 0, "interrupt_line": 0}}
    }

    functions: Annotated[tuple[FunctionState, ...], MaxLen(DEVICES)]
    msi_routes: Annotated[tuple[MsiRouteState, ...], MaxLen(MAX_MSI_ROUTES)]
    config_address: Annotated[int, U32]  # 0xCF8's latch
    host_bridge: HostBridgeState


def save(
    functions: Mapping[str, PciFunctionHost], routes: GsiRoutes, ports: ConfigPorts
) -> dict[str, object]:
    """The chunk's JSON fields, from a paused VM."""
    command, interrupt_line = ports.root.host_bridge.saved()
    state = PciState(
        functions=tuple(
            FunctionState(
                name=name, device=host.device, bars=host.bars.registers(), command=host.command
            )
            for name, host in functions.items()
        ),
        msi_routes=tuple(
            MsiRouteState(gsi=r.gsi, address=r.address, data=r.data)
            for r in routes.routes().values()
        ),
        config_address=ports.address,
        host_bridge=HostBridgeState(command=command, interrupt_line=interrupt_line),
    )
    encoded: dict[str, object] = schema.encode(state)
    return encoded


def decode(data: object, version: int) -> PciState:
    """The chunk, checked field by field (StateError names the first bad one)."""
    if version > PciState.VERSION:
        raise StateError(f"state version {version} is newer than this splitvmm reads")
    state: PciState = schema.decode(
        PciState, data, where="PciState", error=StateError, version=version
    )
    # What needs no VM to refuse, refused here: `snapshot verify` decodes the chunk only.
    names = [saved.name for saved in state.functions]
    if len(set(names)) != len(names):
        raise StateError("PciState: functions: a device is saved twice")
    gsis = [route.gsi for route in state.msi_routes]
    if len(set(gsis)) != len(gsis):  # each a whole table rebuild: 4096 of them took ~0.7 s
        raise StateError("PciState: msi_routes: a GSI is routed twice")
    for route in state.msi_routes:  # needing no VM: refused by `snapshot verify` too
        why = msi_message_refused(route.address, route.data)
        if why:
            raise StateError(f"PciState: msi_routes[gsi {route.gsi}]: {why}")
    return state


def check(state: PciState, functions: Mapping[str, PciFunctionHost], routes: GsiRoutes) -> None:
    """What apply() refuses, before anything is applied: restore.apply asks before it loads
    guest RAM (a config that lists the same PCI devices in another order puts each at
    another number than the guest's drivers know, and was refused only once RAM was in)."""
    for saved in state.functions:
        host = functions.get(saved.name)
        if host is None or host.device != saved.device:
            raise StateError(
                f"PciState: functions[{saved.name!r}]: no PCI device {saved.name} at "
                f"00:{saved.device:02x}.0 in this VM"
            )
    missing = sorted(set(functions) - {saved.name for saved in state.functions})
    if missing:
        raise StateError(f"PciState: functions: none saved for {', '.join(missing)}")
    for route in state.msi_routes:
        why = routes.check_msi(route.gsi, route.address, route.data)
        if why:
            raise StateError(f"PciState: msi_routes[gsi {route.gsi}]: {why}")


def apply(
    state: PciState,
    functions: Mapping[str, PciFunctionHost],
    routes: GsiRoutes,
    ports: ConfigPorts,
) -> None:
    """Put the saved BARs, enables, routes, latch and host bridge into a VM built from the
    same config: every function of it, each once (one left out would sit where the boot put
    it, not where the guest moved it, and its driver would hang)."""
    check(state, functions, routes)
    for saved in state.functions:  # (decode() refused a function saved twice)
        functions[saved.name].restore(saved.bars, saved.command)
    for route in state.msi_routes:  # (and a GSI routed twice)
        routes.set_msi(route.gsi, route.address, route.data)
    ports.restore_address(state.config_address)
    ports.root.host_bridge.restore(state.host_bridge.command, state.host_bridge.interrupt_line)
