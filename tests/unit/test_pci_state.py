"""The monitor's PCI platform in a snapshot (monitor/pci/state.py): moved BARs, decode
enables, MSI routes, 0xCF8's latch and the host bridge saved, and put back into a VM built
from the same config; a hostile chunk refused naming the field, never applied half."""

from __future__ import annotations

import pytest

from splitvmm.errors import StateError
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.irqroutes import GsiRoutes
from splitvmm.monitor.pci import state as pcistate
from splitvmm.monitor.pci.function import SharedDecode
from splitvmm.monitor.pci.root import ConfigPorts, PciRoot
from splitvmm.native.routing import MsiRoute
from tests.unit.test_irqroutes import RoutingVm
from tests.unit.test_pci_function import BAR0_BASE, BAR1_BASE, Function

MSI_ADDRESS = 0xFEE0_0000
MOVED = 0xD000_0000
VERSION = pcistate.PciState.VERSION
LATCHED = 0x8000_0004  # enabled, 00:00.0, the command register's dword


def platform() -> tuple[Function, GsiRoutes, RoutingVm]:
    vm = RoutingVm()
    routes = GsiRoutes(vm)
    routes.allocate(2, "device blk0")
    return Function(), routes, vm


def ports() -> ConfigPorts:
    return ConfigPorts(PciRoot())


def saved() -> dict[str, object]:
    f, routes, _ = platform()
    f.move_bar(0, MOVED)
    f.config_write(0x04, b"\x04")  # bus master only: memory decode off
    routes.set_msi(25, MSI_ADDRESS, 0x4041)
    return pcistate.save({"blk0": f.host}, routes, ports())


def test_pci_state_round_trip_puts_moved_bar_enables_and_routes_back() -> None:
    data = saved()
    f, routes, vm = platform()
    pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert (f.host.bars.base(0), f.host.command, f.host.decoding()) == (MOVED, 0, {})
    assert routes.routes() == {25: MsiRoute(25, MSI_ADDRESS, 0x4041)}
    f.config_write(0x04, b"\x02")  # memory decode on: the BAR decodes where it was moved to
    assert f.host.decoding()[0] == MOVED


def test_pci_state_bar_moved_into_a_range_its_sibling_left_decodes_after_restore() -> None:
    """The VM a snapshot restores into has its BARs at their first bases: BAR 0 saved where
    BAR 1 started is in conflict until BAR 1 is put back where it was moved to."""
    f, routes, _ = platform()
    f.move_bar(1, MOVED)
    f.move_bar(0, BAR1_BASE)
    data = pcistate.save({"blk0": f.host}, routes, ports())
    g, routes2, _ = platform()
    pcistate.apply(pcistate.decode(data, VERSION), {"blk0": g.host}, routes2, ports())
    assert g.host.decoding() == f.host.decoding() == {0: BAR1_BASE, 1: MOVED}


def test_pci_state_bar_moved_into_a_range_another_function_left_decodes_after_restore():
    def two() -> tuple[Function, Function, GsiRoutes]:
        mmio, shared = Bus("mmio"), SharedDecode()
        a = Function(mmio=mmio, shared=shared)
        b = Function(mmio=mmio, shared=shared, device=2, bases=(0xC001_0000, 0xC001_4000))
        return a, b, platform()[1]

    a, b, routes = two()
    b.move_bar(0, MOVED)
    a.move_bar(0, 0xC001_0000)  # into the range b's BAR 0 left
    data = pcistate.save({"blk1": a.host, "blk2": b.host}, routes, ports())
    a2, b2, routes2 = two()
    pcistate.apply(
        pcistate.decode(data, VERSION), {"blk1": a2.host, "blk2": b2.host}, routes2, ports()
    )
    assert (a2.host.decoding(), b2.host.decoding()) == (
        {0: 0xC001_0000, 1: BAR1_BASE},
        {0: MOVED, 1: 0xC001_4000},
    )


def test_pci_state_bar_value_keeps_only_what_the_bar_allows() -> None:
    data = saved()
    functions = data["functions"]
    assert isinstance(functions, list)
    functions[0]["bars"][0] = 0xFFFF_FFFF  # not aligned to its 16 KiB, flag bits set
    f, routes, _ = platform()
    pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert f.host.bars.registers()[0] == 0xFFFF_C000


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "other", "no PCI device other"),
        ("device", 7, "at 00:07.0"),
    ],
)
def test_pci_state_function_not_in_this_vm_is_refused(field: str, value: object, message: str):
    data = saved()
    data["functions"][0][field] = value  # type: ignore[index]
    f, routes, _ = platform()
    with pytest.raises(StateError, match=message):
        pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert f.host.bars.base(0) == BAR0_BASE


def test_pci_state_without_a_function_of_this_vm_is_refused_naming_it():
    """A function left out would stay where the boot put it, not where its guest moved it."""
    data = saved()
    data["functions"] = []
    f, routes, _ = platform()
    with pytest.raises(StateError, match="functions: none saved for blk0"):
        pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())


def test_pci_state_with_a_function_twice_is_refused():
    data = saved()
    functions = data["functions"]
    assert isinstance(functions, list)
    data["functions"] = [functions[0], functions[0]]
    with pytest.raises(StateError, match="a device is saved twice"):
        pcistate.decode(data, VERSION)  # needing no VM: `snapshot verify` refuses it too
    f, routes, _ = platform()
    with pytest.raises(StateError, match="a device is saved twice"):
        pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert f.host.bars.base(0) == BAR0_BASE  # nothing applied


# Messages no driver programs (a routable GSI): what decode() refuses, with its words
BAD_MSI_MESSAGES = [
    ({"gsi": 24, "address": 0x1000, "data": 0x30}, "not an x86 MSI address"),
    ({"gsi": 24, "address": MSI_ADDRESS, "data": 0x10000}, "16 bits"),
    ({"gsi": 24, "address": MSI_ADDRESS, "data": 0x400}, "delivery mode 100"),
]


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"gsi": 4, "address": MSI_ADDRESS, "data": 0x30}, "GSI 4 is no MSI GSI"),
        ({"gsi": 26, "address": MSI_ADDRESS, "data": 0x30}, "GSI 26 is no MSI GSI"),
        *BAD_MSI_MESSAGES,
    ],
)
def test_pci_state_msi_route_a_device_could_not_ask_for_is_refused(
    route: dict[str, int], message: str
) -> None:
    data = saved()
    data["msi_routes"] = [route]
    f, routes, vm = platform()
    with pytest.raises(StateError, match=message):
        pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert vm.tables == []


@pytest.mark.parametrize(("route", "message"), BAD_MSI_MESSAGES)
def test_pci_state_msi_message_no_driver_programs_is_refused_needing_no_vm(
    route: dict[str, int], message: str
) -> None:
    """decode() refuses it, so `snapshot verify` does too: only apply() did, once the
    restore had built the VM and loaded guest RAM."""
    data = saved()
    data["msi_routes"] = [route]
    with pytest.raises(StateError, match=rf"msi_routes\[gsi 24\]: .*{message}"):
        pcistate.decode(data, VERSION)


def test_pci_state_msi_route_saved_twice_for_one_gsi_is_refused() -> None:
    data = saved()
    route = {"gsi": 24, "address": MSI_ADDRESS, "data": 0x30}
    data["msi_routes"] = [route, route]
    with pytest.raises(StateError, match="a GSI is routed twice"):
        pcistate.decode(data, VERSION)  # needing no VM: `snapshot verify` refuses it too
    f, routes, vm = platform()
    with pytest.raises(StateError, match="a GSI is routed twice"):
        pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, ports())
    assert vm.tables == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["functions"][0].update(bars=[0] * 5), "bars"),
        (lambda d: d["functions"][0].update(command=-1), "command"),
        (lambda d: d["functions"][0].update(device=32), "device"),  # past bus 0's devices
        (lambda d: d["msi_routes"][0].update(gsi=4096), "gsi"),  # past KVM's table
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["msi_routes"].append({"gsi": 24}), "msi_routes"),
        (lambda d: d.update(config_address=1 << 32), "config_address"),
        (lambda d: d["host_bridge"].update(command=0x10000), "command"),
        (lambda d: d.pop("host_bridge"), "host_bridge"),
    ],
)
def test_pci_state_malformed_chunk_names_the_field(mutate, message: str) -> None:
    data = saved()
    mutate(data)
    with pytest.raises(StateError, match=message):
        pcistate.decode(data, VERSION)


def test_pci_state_from_a_newer_release_is_refused() -> None:
    with pytest.raises(StateError, match="newer"):
        pcistate.decode(saved(), VERSION + 1)


def test_pci_state_keeps_the_config_address_latch_and_the_host_bridge() -> None:
    """A vCPU paused between its `out 0xCF8` and its `in 0xCFC`: restored, its read reaches
    the register it latched (a fresh latch reads all-ones, a device gone), and what the
    guest wrote to the host bridge reads back."""
    f, routes, _ = platform()
    before = ports()
    before.root.config_write(0, 0, 0, 0x04, b"\x06\x00")  # memory space and bus master
    before.root.config_write(0, 0, 0, 0x3C, b"\x0b")  # the interrupt line, a scratch byte
    before.write(0, LATCHED.to_bytes(4, "little"))
    data = pcistate.save({"blk0": f.host}, routes, before)
    g, routes2, _ = platform()
    after = ports()
    pcistate.apply(pcistate.decode(data, VERSION), {"blk0": g.host}, routes2, after)
    assert after.address == LATCHED
    assert after.read(4, 2) == b"\x06\x00"  # 0xCFC: the host bridge's command register
    assert after.root.config_read(0, 0, 0, 0x3C, 1) == b"\x0b"


def test_pci_state_v1_restores_with_nothing_latched_and_the_host_bridge_as_booted() -> None:
    data = saved()
    del data["config_address"], data["host_bridge"]
    state = pcistate.decode(data, 1)
    assert (state.config_address, state.host_bridge) == (
        0,
        pcistate.HostBridgeState(command=0, interrupt_line=0),
    )


def test_pci_state_latch_and_host_bridge_keep_only_what_their_registers_allow() -> None:
    """The chunk is untrusted: reserved latch bits and read-only host bridge bits are
    dropped as the guest's own writes would be."""
    data = saved()
    data["config_address"] = 0xFFFF_FFFF
    data["host_bridge"] = {"command": 0xFFFF, "interrupt_line": 0xFF}
    f, routes, _ = platform()
    after = ports()
    pcistate.apply(pcistate.decode(data, VERSION), {"blk0": f.host}, routes, after)
    assert after.address == 0x80FF_FFFC
    assert after.root.host_bridge.saved() == (0x0147, 0xFF)
