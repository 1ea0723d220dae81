"""Which pages of guest RAM were written while a live snapshot copied them (pre-copy).

`ctl snapshot` copies guest RAM while the VM runs (snapshot/ram.py write_ram_precopy), then,
while what was written meanwhile shrinks, copies that again, still running, then pauses it and
copies what was written since: the pause is that last pass, not the whole RAM. Two kinds of
writer, two logs:

- the vCPUs: KVM's dirty log of each RAM memory slot. A VM has one where its config says
  vm.track_dirty_pages, for its whole life: the slots are made logged (Machine._build_vm), as
  Firecracker's track_dirty_pages does. Turning logging on for the copy alone, as QEMU does
  for a migration, would take KVM_SET_USER_MEMORY_REGION after the monitor confined itself,
  whose filter allows no memory-slot set-up once the VM is built (monitor.policy). Logging
  costs the guest a write fault per page after each read of the log, and on hardware KVM
  maps its RAM with 4 KiB pages only: so it is the operator's choice, off by default, and
  a VM without it copies all its RAM in the pause, as before;
- the device processes: each marks the pages it writes in its live bitmap, the first half of
  its dirty log memfd (devprocs/virtio/guestram.py, DESIGN "Device writes to guest memory"),
  before the data lands. A live bitmap is cleared only where no mark can race the clear: by
  the device itself, on its thread, between requests, as each pass begins (the coordinator's
  harvest_dirty request), and by the monitor while every device is quiesced (take(), in the
  pause). The monitor's clear racing a device's read-modify-write could lose a mark, or a
  page whose request marked before the clear and landed after the copy read it. So the
  device moves its marks into the memfd's second half, the harvest, as it clears them, and
  the monitor reads and clears that, but only once the device has answered, or is quiesced:
  the device writes its harvest at no other time. Each pass then copies what a device wrote
  since the pass before, as KVM's log gives it for the vCPUs, not all it wrote since the
  first: a guest reading its disk during the copy made every later pass, and the pause,
  copy the whole of what it had read so far. A device that does not answer keeps its marks
  until it does, or until the pause: more to copy then, never less.

The monitor itself writes no guest RAM once the VM runs (loaders and restore come before).
"""

from __future__ import annotations

import mmap
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from splitvmm.monitor.layout import PAGE_SIZE
from splitvmm.native.mem import Region
from splitvmm.protocol.dirtybits import bitmap_size, page_runs


class DirtyLogVm(Protocol):
    """The VM's dirty log (native/kvm.py VmFd)."""

    def get_dirty_log(self, slot: int, size: int) -> bytes: ...


class DeviceLog:
    """A device's dirty log memfd, mapped shared and writable: its live bitmap, then the
    harvest (FdKind.DIRTY_LOG), each half of it."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map, self._half = mapping, len(mapping) // 2

    def live(self, clear: bool) -> int:
        """The device's marks since it last harvested them; cleared here only while it is
        quiesced (the module docstring)."""
        return self._take(0, clear)

    def harvest(self) -> int:
        """The marks the device has harvested, cleared: only once it has answered, or is
        quiesced (the module docstring)."""
        return self._take(self._half, clear=True)

    def _take(self, start: int, clear: bool) -> int:
        end = start + self._half
        marks = int.from_bytes(self._map[start:end], "little")
        if clear and marks:
            self._map[start:end] = bytes(self._half)
        return marks


class DirtyTracker:
    """Pages of the RAM memfd written since start(), by the vCPUs and the devices, as runs of
    (offset, length)."""

    def __init__(
        self,
        vm: DirtyLogVm,
        slots: Sequence[Region],
        device_logs: Mapping[str, mmap.mmap],
        ram_size: int,
    ) -> None:
        """`slots`: the RAM memory slots, made logged, slot number = index (Machine._build_vm);
        `device_logs`: each device's dirty log memfd by the device's name, mapped shared and
        writable."""
        self._vm, self._slots = vm, list(slots)
        self._devices = {name: DeviceLog(mapping) for name, mapping in device_logs.items()}
        self._pages, self._bitmap_size = ram_size // PAGE_SIZE, bitmap_size(ram_size)
        self._pending = 0  # pages written that no pass has copied since: a bitmap

    def start(self, harvested: Collection[str]) -> None:
        """KVM's logs begin again: the vCPUs' writes count from now, and those of the devices
        named in `harvested`, which have just answered harvest_dirty, from their answers: what
        they wrote before is in the first pass. (Another device's marks stay: the module
        docstring.)"""
        for number, region in enumerate(self._slots):
            self._vm.get_dirty_log(number, region.size)
        self._harvested(harvested)
        self._pending = 0

    def written(self, harvested: Collection[str]) -> list[tuple[int, int]]:
        """The VM running, between two passes of a copy: the runs of pages written since
        start() or copying(), by the vCPUs (KVM's logs, read, so begun again) and the devices
        named in `harvested`, which have just answered harvest_dirty (their harvests, read
        and cleared). Kept until copying(): the pause copies them where no pass does."""
        self._pending |= self._vcpu_log() | self._harvested(harvested)
        return self._runs(self._pending)

    def copying(self) -> None:
        """What written() said is being copied now: the writes count from its reads."""
        self._pending = 0

    def take(self) -> list[tuple[int, int]]:
        """(offset, length) in the RAM memfd of each run of pages written since start() or
        copying(), in order: by the vCPUs, and by the devices as their harvests and live
        bitmaps hold them (a device that has not answered since start() keeps its marks from
        before); KVM's logs begin again, and every device's bitmaps are cleared. Only with
        every vCPU parked and every device quiesced (the module docstring)."""
        dirty = self._pending | self._vcpu_log()
        for device_log in self._devices.values():
            dirty |= device_log.harvest() | device_log.live(clear=True)
        self._pending = 0
        return self._runs(dirty)

    def _vcpu_log(self) -> int:
        dirty = 0
        for number, region in enumerate(self._slots):
            log = self._vm.get_dirty_log(number, region.size)
            dirty |= int.from_bytes(log, "little") << (region.offset // PAGE_SIZE)
        return dirty

    def _harvested(self, names: Collection[str]) -> int:
        dirty = 0
        for name in names:
            device_log = self._devices.get(name)
            if device_log is not None:  # (a device without guest RAM has no log)
                dirty |= device_log.harvest()
        return dirty

    def _runs(self, dirty: int) -> list[tuple[int, int]]:
        dirty &= (1 << self._pages) - 1  # a device bitmap's whole last page maps no RAM
        bitmap = dirty.to_bytes(self._bitmap_size, "little")
        return [(page * PAGE_SIZE, pages * PAGE_SIZE) for page, pages in page_runs(bitmap)]
