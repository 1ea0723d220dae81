"""The PCI root in the monitor: bus 0, its host bridge, and the two ways to reach config space.

A guest reaches configuration space through mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus
3.0 3.2.2.3.2) or ECAM (PCI Express Base 4.0 7.2.2, a memory window announced in the ACPI
MCFG table); both land in one PciRoot, which finds the function and forwards the access.
Absent functions read as all-ones from the root itself, so a guest scanning the bus costs no
device process a round trip. Each function's config space is served by whoever owns it (the
host bridge here, by the monitor; a device's, later, by its process), except its BAR
registers: BAR placement and decode belong to the monitor (bars.py), since a BAR write moves
bus ranges only the monitor may change.

Modules: config.py (the header's registers, the host bridge), bars.py (BAR decode and
placement), root.py (the function registry, mechanism #1 and ECAM).
"""
