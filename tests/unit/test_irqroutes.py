"""The GSI routing table's one owner (monitor/irqroutes.py): MSI GSIs, and the checks on what
a device asks for, with a VM that records each table it is given."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor.irqroutes import GsiRoutes, MsiVectors, intx_gsi
from splitvmm.native.routing import GsiRoute, MsiRoute, pc_default_routes

MSI_ADDRESS = 0xFEE0_0000


class RoutingVm:
    def __init__(self) -> None:
        self.tables: list[list[GsiRoute]] = []

    def set_gsi_routing(self, routes: Sequence[GsiRoute]) -> None:
        self.tables.append(list(routes))


def vectors(count: int = 2) -> tuple[MsiVectors, RoutingVm]:
    vm = RoutingVm()
    routes = GsiRoutes(vm)
    return MsiVectors("blk0", routes, routes.allocate(count, "device blk0")), vm


def test_gsi_routes_allocate_starts_after_the_ioapic_pins() -> None:
    routes = GsiRoutes(RoutingVm())
    assert (routes.allocate(2, "a"), routes.allocate(1, "b")) == ((24, 25), (26,))


def test_gsi_routes_allocate_past_the_table_raises_naming_device() -> None:
    routes = GsiRoutes(RoutingVm())
    with pytest.raises(ConfigError, match="device x: no GSIs left for 5000"):
        routes.allocate(5000, "device x")


def test_msi_route_sets_pc_default_routes_plus_the_route() -> None:
    msi, vm = vectors()
    reason = msi.route(1, MSI_ADDRESS, 0x4041)
    assert (reason, vm.tables) == ("", [[*pc_default_routes(), MsiRoute(25, MSI_ADDRESS, 0x4041)]])


def test_msi_routes_of_two_vectors_are_both_in_the_table() -> None:
    msi, vm = vectors()
    msi.route(0, MSI_ADDRESS, 0x30)
    msi.route(1, MSI_ADDRESS, 0x31)
    assert vm.tables[-1][-2:] == [MsiRoute(24, MSI_ADDRESS, 0x30), MsiRoute(25, MSI_ADDRESS, 0x31)]


def test_msi_route_changed_replaces_the_old_one() -> None:
    msi, vm = vectors()
    msi.route(0, MSI_ADDRESS, 0x30)
    msi.route(0, MSI_ADDRESS | 0x1000, 0x40)
    assert vm.tables[-1][len(pc_default_routes()) :] == [MsiRoute(24, MSI_ADDRESS | 0x1000, 0x40)]


def test_msi_route_asked_twice_sets_the_table_once() -> None:
    msi, vm = vectors()
    msi.route(0, MSI_ADDRESS, 0x30)
    msi.route(0, MSI_ADDRESS, 0x30)
    assert len(vm.tables) == 1


@pytest.mark.parametrize(
    ("vector", "address", "data", "why"),
    [
        (2, MSI_ADDRESS, 0x30, "vector 2 is past the 2 MSI-X vectors of blk0"),
        (0, 0xFEF0_0000, 0x30, "address 0xfef00000 is not an x86 MSI address"),
        (0, 0x1_FEE0_0000, 0x30, "address 0x1fee00000 is not an x86 MSI address"),
        (0, 0xC000_0000, 0x30, "address 0xc0000000 is not an x86 MSI address"),
        (0, MSI_ADDRESS, 0x10000, "data 0x10000 does not fit the 16 bits"),
    ],
)
def test_msi_route_outside_what_x86_allows_is_refused_and_nothing_set(
    vector: int, address: int, data: int, why: str
) -> None:
    msi, vm = vectors()
    assert (msi.route(vector, address, data).startswith(why), vm.tables) == (True, [])


def test_intx_gsi_is_ioapic_pin_16_plus_device_mod_8() -> None:
    assert [intx_gsi(d) for d in (1, 7, 8, 9)] == [17, 23, 16, 17]
