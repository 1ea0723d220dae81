"""A device's fds by kind (monitor/devicefds.py), for a virtio-blk-shaped descriptor, with a
VM that records its irqfds: guest RAM, the dirty bitmap, notify, MSI-X, INTx, the disk."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.config import DeviceSection
from splitvmm.errors import ConfigError
from splitvmm.hostpath import HostFileError
from splitvmm.monitor import devicefds
from splitvmm.monitor.devicefds import (
    Closable,
    DeviceFds,
    HeldIrqfds,
    PciInterrupts,
    lock_disk,
)
from splitvmm.monitor.memory import SEALS, GuestMemory
from splitvmm.native import files
from splitvmm.protocol.models import (
    SERIAL,
    VIRTIO_BLK,
    VIRTIO_NET,
    FdKind,
    FdRole,
    ModelDescriptor,
)

MIB = 1 << 20


class IrqVm:
    def __init__(self) -> None:
        self.irqfds: list[tuple[int, int, int | None]] = []  # (eventfd, gsi, resample fd)

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        self.irqfds.append((eventfd, gsi, resample_fd))


@pytest.fixture
def owned() -> Iterator[list[Closable]]:
    things: list[Closable] = []
    yield things
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory(64 * MIB)
    yield memory
    memory.close()


def blk(path: Path, readonly: bool = False) -> DeviceSection:
    return DeviceSection("blk0", "virtio-blk", options={"path": str(path), "readonly": readonly})


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    return image


def make(
    mem: GuestMemory, owned: list[Closable], dev: DeviceSection
) -> tuple[dict[str, int], IrqVm, DeviceFds]:
    vm = IrqVm()
    maker = DeviceFds(vm, mem, owned, PciInterrupts(intx_gsi=17, msix_gsis=(24, 25)))
    return maker.make(dev, VIRTIO_BLK), vm, maker


def test_device_fds_virtio_blk_gets_every_role(mem, owned, disk) -> None:
    fds, _, _ = make(mem, owned, blk(disk))
    assert sorted(fds) == sorted(role.name for role in VIRTIO_BLK.fds)


def test_device_fds_msix_irqfds_on_their_gsis_and_intx_with_resample(mem, owned, disk) -> None:
    fds, vm, _ = make(mem, owned, blk(disk))
    assert vm.irqfds == [
        (fds["msix0"], 24, None),
        (fds["msix1"], 25, None),
        (fds["intx"], 17, fds["intx_resample"]),
    ]


def test_held_irqfds_reach_the_vm_only_at_release_in_their_order(mem, owned, disk) -> None:
    """A restore's (monitor/machine.py build): registered once the saved irqchip is set."""
    vm = IrqVm()
    held = HeldIrqfds(vm)
    fds = DeviceFds(held, mem, owned, PciInterrupts(intx_gsi=17, msix_gsis=(24, 25))).make(
        blk(disk), VIRTIO_BLK
    )
    assert vm.irqfds == []
    held.release()
    held.release()  # once: nothing is held any more
    assert vm.irqfds == [
        (fds["msix0"], 24, None),
        (fds["msix1"], 25, None),
        (fds["intx"], 17, fds["intx_resample"]),
    ]


def test_device_fds_notify_eventfd_is_recorded_by_queue(mem, owned, disk) -> None:
    fds, _, maker = make(mem, owned, blk(disk))
    assert maker.notify == {0: fds["notify0"]}


def test_device_fds_dirty_log_is_sized_and_sealed(mem, owned, disk) -> None:
    fds, _, _ = make(mem, owned, blk(disk))
    seals = fcntl.fcntl(fds["dirty"], fcntl.F_GET_SEALS)
    assert (
        os.fstat(fds["dirty"]).st_size,
        seals & fcntl.F_SEAL_SHRINK,
        seals & fcntl.F_SEAL_GROW,
    ) == (
        2 * 4096,  # the device's marks and their harvest, a page of bits each
        fcntl.F_SEAL_SHRINK,
        fcntl.F_SEAL_GROW,
    )


@pytest.mark.parametrize("role", ["dirty", "progress"])
def test_device_fds_shared_pages_are_sealed_as_guest_ram_is(mem, owned, disk, role) -> None:
    """The dirty bitmap and the progress page: a device's processes map them (a restarted
    one too), so no process may resize them, nor add or drop a seal (F_SEAL_SEAL)."""
    fds, _, _ = make(mem, owned, blk(disk))
    seals = fcntl.fcntl(fds[role], fcntl.F_GET_SEALS)
    size = {"dirty": 2 * 4096, "progress": 4096}[role]
    assert (os.fstat(fds[role]).st_size, seals & SEALS) == (size, SEALS)


def test_device_fds_every_fd_made_is_close_on_exec(mem, owned, disk) -> None:
    """The monitor's fds reach a device only as it hands them over, never by inheritance."""
    fds, _, maker = make(mem, owned, blk(disk))
    made = {**fds, "write_back": maker.write_back_fd}
    inherited = {name for name, fd in made.items() if not fcntl.fcntl(fd, fcntl.F_GETFD)}
    assert inherited == set()


def test_device_fds_serial_irq_is_an_irqfd_on_its_isa_line(mem, owned, tmp_path) -> None:
    vm = IrqVm()
    dev = DeviceSection("serial0", "serial", options={"output": str(tmp_path / "out")})
    fds = DeviceFds(vm, mem, owned).make(dev, SERIAL)
    assert vm.irqfds == [(fds["irq"], 4, None)]


def test_device_fds_guest_ram_is_the_memfd_with_its_own_file_offset(mem, owned, disk) -> None:
    fds, _, _ = make(mem, owned, blk(disk))
    os.lseek(fds["ram"], 8192, os.SEEK_SET)
    same = os.fstat(fds["ram"]).st_ino == os.fstat(mem.fd).st_ino
    assert (same, os.lseek(mem.fd, 0, os.SEEK_CUR)) == (True, 0)


@pytest.mark.parametrize("readonly", [False, True])
def test_device_fds_writable_disk_gets_the_monitors_own_description_for_its_write_back(
    mem, owned, disk, readonly
) -> None:
    """The monitor syncs a writable image itself (a snapshot's commit, the teardown), on an
    open file description of its own: an fdatasync on the device's would take the write-back
    error (errseq) that the device must report at the guest's next FLUSH."""
    fds, _, maker = make(mem, owned, blk(disk, readonly))

    if readonly:
        assert maker.write_back_fd is None
        return
    assert maker.write_back_fd is not None
    ours, theirs = os.fstat(maker.write_back_fd), os.fstat(fds["disk"])
    assert (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)
    flags = fcntl.fcntl(maker.write_back_fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == os.O_RDONLY
    os.lseek(fds["disk"], 4096, os.SEEK_SET)  # another description: its own offset
    assert os.lseek(maker.write_back_fd, 0, os.SEEK_CUR) == 0
    os.fdatasync(maker.write_back_fd)


@pytest.mark.parametrize("readonly", [False, True])
def test_device_fds_disk_errors_is_the_disks_file_in_a_read_only_description_of_its_own(
    mem, owned, disk, readonly
) -> None:
    """What a restarted virtio-blk process asks for a write-back failure its predecessor's
    fdatasync took (devprocs/virtio_blk.py): a description neither the device's disk nor the
    monitor's write-back shares, so no sync of theirs takes what it is to hear."""
    fds, _, maker = make(mem, owned, blk(disk, readonly))

    errors, theirs = os.fstat(fds["disk-errors"]), os.fstat(fds["disk"])
    assert (errors.st_dev, errors.st_ino) == (theirs.st_dev, theirs.st_ino)
    assert fcntl.fcntl(fds["disk-errors"], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    others = [fds["disk"]] + ([] if maker.write_back_fd is None else [maker.write_back_fd])
    for other in others:  # another description: its own offset
        os.lseek(other, 4096, os.SEEK_SET)
    assert os.lseek(fds["disk-errors"], 0, os.SEEK_CUR) == 0


def test_device_fds_disk_errors_role_without_its_disk_is_refused(mem, owned, disk) -> None:
    role = FdRole("disk-errors", FdKind.DISK_ERRORS, option="path")
    alone = ModelDescriptor("alone", VIRTIO_BLK.transport, fds=(role,))
    with pytest.raises(ConfigError, match="model alone: fd role disk-errors has no disk before"):
        DeviceFds(IrqVm(), mem, owned).make(blk(disk), alone)


@pytest.mark.parametrize(("readonly", "mode"), [(True, os.O_RDONLY), (False, os.O_RDWR)])
def test_device_fds_disk_opens_as_readonly_option_says(mem, owned, disk, readonly, mode) -> None:
    fds, _, _ = make(mem, owned, blk(disk, readonly))
    assert fcntl.fcntl(fds["disk"], fcntl.F_GETFL) & os.O_ACCMODE == mode


def direct(path: Path) -> DeviceSection:
    return DeviceSection("blk0", "virtio-blk", options={"path": str(path), "direct": True})


def made_or_skipped(mem: GuestMemory, owned: list[Closable], dev: DeviceSection) -> dict[str, int]:
    """The device's fds; a skip where the tests' file system has no direct I/O."""
    try:
        fds, _, _ = make(mem, owned, dev)
    except HostFileError as e:
        if not dev.options.get("direct") or "without direct I/O" not in str(e):
            raise  # any other failure to open the disk is the test's
        pytest.skip(f"no direct I/O where the tests run: {e}")
    return fds


def refused_direct(mem: GuestMemory, owned: list[Closable], disk: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        made_or_skipped(mem, owned, direct(disk))


@pytest.mark.parametrize("on", [True, False])
def test_device_fds_disk_opens_with_o_direct_as_direct_option_says(mem, owned, disk, on) -> None:
    fds = made_or_skipped(mem, owned, direct(disk) if on else blk(disk))
    assert bool(fcntl.fcntl(fds["disk"], fcntl.F_GETFL) & os.O_DIRECT) is on


def test_device_fds_direct_disk_of_a_partial_block_is_refused_naming_the_option(
    mem, owned, disk
) -> None:
    """A device writes a direct image's partial last block whole, which would grow it."""
    disk.write_bytes(bytes(4096 + 512))
    refused_direct(mem, owned, disk, r"'blk0'.direct: .*4608 bytes, not a multiple")


def test_device_fds_direct_disk_whose_first_block_a_direct_read_refuses(
    mem, owned, disk, monkeypatch
) -> None:
    """A file system whose direct I/O wants larger blocks than 4 KiB refuses every request."""
    real = os.preadv

    def refuse(fd: int, buffers: list[object], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "preadv", refuse)
    refused_direct(mem, owned, disk, r"'blk0'.direct: .*refused a direct read")


def test_device_fds_direct_disk_on_a_file_system_without_it_is_refused(
    mem, owned, disk, monkeypatch
) -> None:
    real = os.open

    def no_direct(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(HostFileError, match=r"device 'blk0'.path: .*without direct I/O"):
        make(mem, owned, direct(disk))


def test_device_fds_disk_symlink_is_refused_naming_device_and_option(mem, owned, disk) -> None:
    link = disk.with_name("link.img")
    link.symlink_to(disk)
    with pytest.raises(HostFileError, match=r"device 'blk0'.path: .*link.img is a symlink"):
        make(mem, owned, blk(link))


def test_device_fds_disk_of_less_than_a_sector_is_refused_naming_device_and_option(
    mem, owned, disk
) -> None:
    """Before the device starts (which refuses it too, but knows no config key)."""
    disk.write_bytes(bytes(511))
    with pytest.raises(
        HostFileError, match=r"device 'blk0'.path: .*disk.img is 511 bytes: a virtio-blk disk"
    ):
        make(mem, owned, blk(disk))


def test_device_fds_pci_model_without_its_interrupts_is_refused(mem, owned, disk) -> None:
    maker = DeviceFds(IrqVm(), mem, owned)  # no PciInterrupts given
    with pytest.raises(ConfigError, match="model virtio-blk: fd role notify0 needs a PCI function"):
        maker.make(blk(disk), VIRTIO_BLK)


@pytest.mark.parametrize(
    ("role", "why"),
    [
        (FdRole("notify1", FdKind.NOTIFY, index=1), "fd role notify1 names no queue"),
        (FdRole("msix2", FdKind.MSIX, index=2), "fd role msix2 names no MSI-X vector"),
    ],
)
def test_device_fds_role_past_the_functions_queues_or_vectors_is_refused(
    mem, owned, role, why
) -> None:
    model = ModelDescriptor("odd", VIRTIO_BLK.transport, fds=(role,))
    maker = DeviceFds(IrqVm(), mem, owned, PciInterrupts(intx_gsi=17, msix_gsis=(24, 25)))
    with pytest.raises(ConfigError, match=f"model odd: {why}"):
        maker.make(DeviceSection("odd0", "virtio-blk"), model)


def test_device_fds_intx_of_a_function_without_intx_is_refused(mem, owned, disk) -> None:
    maker = DeviceFds(IrqVm(), mem, owned, PciInterrupts(intx_gsi=None, msix_gsis=(24, 25)))
    with pytest.raises(ConfigError, match="model virtio-blk: fd role intx needs INTx"):
        maker.make(blk(disk), VIRTIO_BLK)


def test_device_fds_disk_a_vm_writes_is_refused_to_a_second_vm(mem, owned, disk) -> None:
    """Through DeviceFds, as Machine opens it: the image locked for the first VM's life."""
    make(mem, owned, blk(disk))
    with pytest.raises(ConfigError, match=r"device 'blk0'.path: .*disk.img is open in another VM"):
        make(mem, owned, blk(disk))


def test_device_fds_pci_role_on_a_port_window_model_is_refused(mem, owned) -> None:
    model = ModelDescriptor("odd", SERIAL.transport, fds=(FdRole("notify0", FdKind.NOTIFY),))
    maker = DeviceFds(IrqVm(), mem, owned)
    with pytest.raises(ConfigError, match="model odd: fd role notify0 needs a PCI function"):
        maker.make(DeviceSection("odd0", "odd"), model)


def left_blk(may_fire: bytes) -> set[str]:
    """A dead virtio-blk's fds, its progress page saying `may_fire` per vector; the fds
    raise_interrupts() signalled."""
    from splitvmm.monitor.devicefds import raise_interrupts
    from splitvmm.protocol.models import MODELS, PROGRESS_VECTORS_AT, FdKind

    model = MODELS["virtio-blk"]
    fds = {
        r.name: os.eventfd(0, os.EFD_NONBLOCK) for r in model.fds if r.kind is not FdKind.PROGRESS
    }
    fds["progress"] = os.memfd_create("progress")
    try:
        os.ftruncate(fds["progress"], 4096)
        os.pwrite(fds["progress"], may_fire, PROGRESS_VECTORS_AT)
        count = raise_interrupts(model, fds)
        signalled = {name for name, fd in fds.items() if name != "progress" and _pending(fd)}
        assert count == len(signalled)
        return signalled
    finally:
        for fd in fds.values():
            os.close(fd)


def test_raise_interrupts_signals_the_vectors_a_left_device_could_send() -> None:
    """on_crash = leave: each MSI-X vector whose message the device could send when it died
    is signalled once, nothing else (its INTx is the monitor's to hold: pci/intx.py)."""
    assert left_blk(b"\x01\x01") == {"msix0", "msix1"}  # the queue's, the configuration's


def test_raise_interrupts_leaves_a_masked_vector_alone() -> None:
    """PCI 3.0 6.8.2.9: a masked vector's message is not sent (nor one with MSI-X off, the
    function masked or Bus Master Enable clear: the page says 0 for each)."""
    assert left_blk(b"\x00\x01") == {"msix1"}
    assert left_blk(b"\x00\x00") == set()


def test_raise_interrupts_of_a_port_device_signals_nothing() -> None:
    from splitvmm.monitor.devicefds import raise_interrupts
    from splitvmm.protocol.models import MODELS

    assert raise_interrupts(MODELS["serial"], {"irq": -1, "out": -1}) == 0


def _pending(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this host")
def test_device_fds_tap_named_after_an_interface_that_is_no_tap_says_so(mem, owned) -> None:
    """`lo` exists and is not a TAP: tun says EINVAL, which alone read as a bad argument."""
    dev = DeviceSection("net0", "virtio-net", options={"tap": "lo", "mac": "52:54:00:12:34:56"})
    maker = DeviceFds(IrqVm(), mem, owned, PciInterrupts(intx_gsi=17, msix_gsis=(24, 25, 26)))

    with pytest.raises(ConfigError, match="net0'.tap: cannot open TAP 'lo': an interface of that"):
        maker.make(dev, VIRTIO_NET)


def open_image(path, readonly: bool = False) -> int:
    """The image as another VM's monitor holds it: an open file description of its own."""
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


@pytest.mark.parametrize(
    ("first_readonly", "second_readonly", "refused"),
    [
        (False, False, "is open in another VM"),
        (False, True, "is open read-write in another VM"),  # it writes: nobody reads
        (True, False, "is open in another VM"),  # it reads: nobody writes
        (True, True, None),  # many readers of an image nobody writes
    ],
)
def test_a_disk_image_is_written_by_one_vm_at_a_time(
    tmp_path, first_readonly, second_readonly, refused
):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    first, second = open_image(image, first_readonly), open_image(image, second_readonly)
    try:
        lock_disk(first, str(image), "device 'disk0'.path", first_readonly)
        if refused is None:
            lock_disk(second, str(image), "device 'disk1'.path", second_readonly)
        else:
            with pytest.raises(ConfigError, match=f"device 'disk1'.path: .* {refused}"):
                lock_disk(second, str(image), "device 'disk1'.path", second_readonly)
    finally:
        os.close(first)
        os.close(second)


def test_a_disk_images_lock_ends_with_its_vm(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    first = open_image(image)
    lock_disk(first, str(image), "device 'disk0'.path", False)
    os.close(first)  # the VM's last fd of it: the VM ended
    second = open_image(image)
    try:
        lock_disk(second, str(image), "device 'disk0'.path", False)
    finally:
        os.close(second)


# struct flock on x86-64 Linux (l_type, l_whence, l_start, l_len, l_pid, padding): packed
# here, not through splitvmm's own wrapper, so that the probe does not share its bugs.
FLOCK = struct.Struct("@hhqqi4x")
QEMU_BYTES = (*range(100, 104), *range(200, 204))  # QEMU's perm and shared-perm lock bytes


def lock_bytes_seen_by_another(image) -> dict[int, int]:
    """Byte -> lock type, of every QEMU lock byte another open file description finds held:
    F_OFD_GETLK asking for a write lock on it, as QEMU's raw_check_lock_bytes asks."""
    probe = os.open(image, os.O_RDONLY)
    try:
        found = {
            byte: FLOCK.unpack(
                fcntl.fcntl(
                    probe, fcntl.F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
                )
            )[0]
            for byte in QEMU_BYTES
        }
    finally:
        os.close(probe)
    return {byte: kind for byte, kind in found.items() if kind != fcntl.F_UNLCK}


def hold_as_qemu(image, lock_bytes: tuple[int, ...]) -> int:
    """An open file description of the image holding shared OFD locks on `lock_bytes`, as a
    QEMU process holds its image."""
    fd = os.open(image, os.O_RDWR)
    for byte in lock_bytes:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    return fd


@pytest.mark.parametrize(
    ("readonly", "held"),
    [
        # consistent read and write held; write and resize shared with nobody
        (False, {100: fcntl.F_RDLCK, 101: fcntl.F_RDLCK, 201: fcntl.F_RDLCK, 203: fcntl.F_RDLCK}),
        # consistent read held; write and resize shared with nobody
        (True, {100: fcntl.F_RDLCK, 201: fcntl.F_RDLCK, 203: fcntl.F_RDLCK}),
    ],
)
def test_lock_disk_takes_the_lock_bytes_qemu_takes_for_a_virtio_drive(tmp_path, readonly, held):
    """QEMU's file-posix driver locks byte 100 + n to hold permission n (0 consistent read,
    1 write, 2 write unchanged, 3 resize) and byte 200 + n to share it with nobody; for
    `-drive if=virtio` /proc/locks shows 100-101 and 201 (readonly=on: 100 and 201). Ours
    adds 203: our virtio-blk cannot follow a resize. All shared locks, as QEMU's are."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    fd = open_image(image, readonly)
    try:
        lock_disk(fd, str(image), "device 'disk0'.path", readonly)
        seen = lock_bytes_seen_by_another(image)
    finally:
        os.close(fd)
    assert seen == held


# How lock_disk names a QEMU in its way: a read-write drive denies write to others (byte 201),
# and holds it (byte 101).
SHARES_NO_WRITE = 'shares no "write" of it \\(QEMU\'s lock byte 201\\)'
HOLDS_WRITE = 'holds it with "write" permission \\(QEMU\'s lock byte 101\\)'


@pytest.mark.parametrize(
    ("qemu_bytes", "readonly", "refused"),
    [
        pytest.param((100, 101, 201), False, SHARES_NO_WRITE, id="qemu-vm-rw,ours-rw"),
        pytest.param((100, 101, 201), True, HOLDS_WRITE, id="qemu-vm-rw,ours-ro"),
        pytest.param((100, 201), False, SHARES_NO_WRITE, id="qemu-vm-ro,ours-rw"),
        pytest.param((100, 201), True, None, id="qemu-vm-ro,ours-ro"),  # readers only
        pytest.param((100, 101), False, HOLDS_WRITE, id="qemu-io-rw,ours-rw"),  # shares all
        pytest.param((100,), False, None, id="qemu-io-ro,ours-rw"),  # reads, shares all
    ],
)
def test_lock_disk_refuses_an_image_qemus_lock_bytes_deny_it(
    tmp_path, qemu_bytes, readonly, refused
):
    """flock(2) and QEMU's OFD byte locks do not conflict on Linux: lock_disk tests QEMU's
    bytes as QEMU does, and a QEMU (or qemu-io) holding the image refuses splitvmm."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    qemu, ours = hold_as_qemu(image, qemu_bytes), open_image(image, readonly)
    try:
        if refused is None:
            lock_disk(ours, str(image), "device 'disk0'.path", readonly)
        else:
            with pytest.raises(
                ConfigError,
                match=f"device 'disk0'.path: {re.escape(str(image))} is open in another program, "
                f"which {refused}: a disk image is written by one VM at a time",
            ):
                lock_disk(ours, str(image), "device 'disk0'.path", readonly)
    finally:
        os.close(qemu)
        os.close(ours)


def test_lock_disk_qemu_bytes_outlive_other_descriptions_and_go_with_their_own(tmp_path):
    """OFD locks belong to the open file description, not the process: the monitor opening
    and closing another description of the image (its write-back fd) drops none of them, as
    that close would drop a process's F_SETLK locks; a device process's copy of the
    description keeps them after the monitor's fd is closed; the last fd ends them."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    fd = open_image(image)
    lock_disk(fd, str(image), "device 'disk0'.path", False)
    os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))  # as DeviceFds opens write_back_fd
    device_copy = os.dup(fd)  # what a device process holds: the same description
    os.close(fd)
    while_the_device_lives = set(lock_bytes_seen_by_another(image))
    os.close(device_copy)
    assert (while_the_device_lives, lock_bytes_seen_by_another(image)) == ({100, 101, 201, 203}, {})


def test_lock_disk_refuses_an_image_another_program_write_locks_a_qemu_byte_of(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    other, ours = os.open(image, os.O_RDWR), open_image(image)
    fcntl.fcntl(other, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 100, 1, 0))
    try:
        with pytest.raises(ConfigError, match="which holds a write lock on QEMU's lock bytes"):
            lock_disk(ours, str(image), "device 'disk0'.path", False)
    finally:
        os.close(other)
        os.close(ours)


@pytest.mark.parametrize(
    ("module", "call"), [("fcntl", "flock"), ("files", "ofd_read_lock")], ids=["flock", "ofd"]
)
def test_lock_disk_lock_failing_for_another_reason_is_refused(tmp_path, monkeypatch, module, call):
    """Only a file system without locks is used unlocked; any other failure fails closed."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))

    def broken(*args: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(getattr(devicefds, module), call, broken)
    fd = open_image(image)
    try:
        with pytest.raises(ConfigError, match=r"cannot lock .*: Input/output error"):
            lock_disk(fd, str(image), "device 'disk0'.path", False)
    finally:
        os.close(fd)


def test_lock_disk_without_ofd_locks_warns_and_runs_unlocked(tmp_path, monkeypatch, caplog):
    """A file system (or a kernel before 3.15) without OFD locks: as flock's fallback, the
    image is used with a warning that nothing keeps a QEMU off it."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))

    def no_ofd_locks(fd: int, start: int, length: int) -> None:
        raise OSError(errno.ENOLCK, f"F_OFD_SETLK(F_RDLCK, {start}, {length}): No locks available")

    monkeypatch.setattr(devicefds.files, "ofd_read_lock", no_ofd_locks)
    fd = open_image(image)
    try:
        lock_disk(fd, str(image), "device 'disk0'.path", False)
    finally:
        os.close(fd)
    assert (
        f"device 'disk0'.path: {image} cannot be locked as QEMU locks it "
        "(F_OFD_SETLK(F_RDLCK, 100, 1): No locks available): nothing keeps a QEMU off it"
    ) in caplog.text


def test_stdio_output_on_a_regular_file_is_made_appending(tmp_path, monkeypatch):
    """`splitvmm up vm.toml > log`: the device holds the shell's description of `log`, and
    through one without O_APPEND its pwrite(2) lands anywhere: a compromised device could
    rewrite what the operator's log already holds, or make it a sparse terabyte. Appending,
    Linux puts every pwrite at the end."""
    log = tmp_path / "log"
    log.write_bytes(b"kept\n")
    fd = os.open(log, os.O_WRONLY)
    monkeypatch.setattr(devicefds, "STDOUT", fd)
    try:
        dev = DeviceSection("serial0", "serial", "stop", {"output": "stdio"})
        assert devicefds.open_output(dev, "output", []) == fd
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        os.pwrite(fd, b"forged", 0)
        os.pwrite(fd, b"!", 1 << 40)
    finally:
        os.close(fd)
    assert log.read_bytes() == b"kept\nforged!"


def test_an_output_file_opened_is_named_as_created_only_when_it_was_not_there(tmp_path):
    new, old = tmp_path / "new.log", tmp_path / "old.log"
    old.write_bytes(b"")
    created: list[devicefds.CreatedFile] = []
    owned: list[devicefds.Closable] = []
    try:
        for path in (new, old):
            dev = DeviceSection("serial0", "serial", "stop", {"output": str(path)})
            devicefds.open_output(dev, "output", owned, created)
    finally:
        for c in owned:
            c.close()
    assert [c.path for c in created] == [str(new)]


@pytest.mark.parametrize("then", ["written", "replaced", "gone"])
def test_a_created_output_is_removed_only_while_it_is_that_empty_file(tmp_path, then):
    """A VM that never ran removes the output file it created (Machine.close), but never a
    byte of output, nor a file that took its name since."""
    path = tmp_path / "serial.log"
    dev = DeviceSection("serial0", "serial", "stop", {"output": str(path)})
    created: list[devicefds.CreatedFile] = []
    owned: list[devicefds.Closable] = []
    devicefds.open_output(dev, "output", owned, created)
    if then == "written":
        path.write_bytes(b"x")
    elif then == "replaced":
        path.unlink()
        path.write_bytes(b"")
    else:
        path.unlink()

    created[0].remove_if_unused()  # and a missing file is no error
    for c in reversed(owned):
        c.close()
    assert path.exists() is (then != "gone")


class OutputsOfOneVm:
    """What Machine keeps of one VM's outputs (its closables and its created files), for tests
    of two VMs that name one file."""

    def __init__(self) -> None:
        self.owned: list[devicefds.Closable] = []
        self.created: list[devicefds.CreatedFile] = []

    def open(self, path: Path, name: str = "serial0") -> int:
        dev = DeviceSection(name, "serial", "stop", {"output": str(path)})
        return devicefds.open_output(dev, "output", self.owned, self.created)

    def fail_start(self) -> None:
        """Machine.close() of a VM that never ran."""
        for created in self.created:
            created.remove_if_unused()
        self.close()

    def close(self) -> None:
        for c in self.owned:
            c.close()
        self.owned.clear()


def test_a_failed_start_keeps_an_output_file_another_vm_has_open(tmp_path):
    """Two VMs name one output file; the one that made it fails before its vCPUs ran, after
    the other opened it. The file stays: removed, it took the running VM's output with it."""
    path = tmp_path / "shared.log"
    failing, running = OutputsOfOneVm(), OutputsOfOneVm()
    failing.open(path)
    assert [c.path for c in failing.created] == [str(path)]
    fd = running.open(path)
    assert running.created == []
    try:
        failing.fail_start()
        assert path.exists()
        os.write(fd, b"the running VM's output\n")
        assert path.read_bytes() == b"the running VM's output\n"
    finally:
        running.close()
    # Once nobody else holds it, a failed start removes what it made, as before
    failing = OutputsOfOneVm()
    failing.open(tmp_path / "alone.log")
    failing.fail_start()
    assert not (tmp_path / "alone.log").exists()


@pytest.mark.parametrize("refusal", [errno.EBADF, errno.ENOLCK, errno.EINVAL])
def test_a_failed_start_keeps_an_output_file_it_could_not_lock(tmp_path, monkeypatch, refusal):
    """A file system that refuses the shared lock (ENOLCK; NFSv4 refused a shared flock on a
    write-only fd, EBADF, and granted an exclusive one; a kernel without OFD locks, EINVAL)
    had every VM write the file unlocked, and the maker's failed start could take the
    exclusive lock and remove what another VM wrote. A VM that holds no shared lock removes
    nothing."""

    def refused(fd: int, start: int, length: int) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(devicefds.files, "ofd_read_lock", refused)
    path = tmp_path / "shared.log"
    failing, running = OutputsOfOneVm(), OutputsOfOneVm()
    failing.open(path)
    fd = running.open(path)
    try:
        failing.fail_start()
        os.write(fd, b"the running VM's output\n")
        assert path.read_bytes() == b"the running VM's output\n"
    finally:
        running.close()


def test_a_failed_start_removes_the_output_file_two_of_its_devices_name(tmp_path):
    """One VM's two devices with one output file share one description: the VM's own second
    open does not keep the file it made from its failed start's removal."""
    path = tmp_path / "both.log"
    vm = OutputsOfOneVm()
    first, second = vm.open(path, "serial0"), vm.open(path, "serial1")
    assert first != second and os.fstat(first).st_ino == os.fstat(second).st_ino
    assert len(vm.created) == 1
    vm.fail_start()
    assert not path.exists()


def test_an_output_removed_between_its_open_and_its_lock_is_made_anew(tmp_path, monkeypatch):
    """Another VM's failed start removed the file after our open found it and before our
    lock: the open is made again, and the file we write is the one the path names."""
    path = tmp_path / "serial.log"
    path.write_bytes(b"")
    real_lock = files.ofd_read_lock
    removals = []

    def removed_first(fd: int, start: int, length: int) -> None:
        if not removals:
            removals.append(fd)
            path.unlink()  # as the other VM's CreatedFile.remove_if_unused
        real_lock(fd, start, length)

    monkeypatch.setattr(devicefds.files, "ofd_read_lock", removed_first)
    vm = OutputsOfOneVm()
    fd = vm.open(path)
    try:
        assert removals and path.exists()
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert [c.path for c in vm.created] == [str(path)]  # made by this open: ours
    finally:
        vm.close()


def test_an_output_another_program_holds_locked_is_written_unlocked_and_kept(tmp_path, monkeypatch):
    """An exclusive lock on the output's lock byte that something other than a VM holds does
    not stop `up`: the file is written unlocked. And the VM that made it cannot know who
    else writes it, so its failed start keeps it."""
    monkeypatch.setattr(devicefds, "OUTPUT_LOCK_TRIES", 2)
    path = tmp_path / "serial.log"
    real = devicefds.hostpath.open_output_file
    others: list[int] = []

    def locked_by_another(output: str, key: str) -> tuple[int, bool]:
        opened = real(output, key)
        others.append(os.open(output, os.O_WRONLY))
        files.ofd_write_lock(others[-1], devicefds.OUTPUT_LOCK_BYTE, 1)
        return opened

    monkeypatch.setattr(devicefds.hostpath, "open_output_file", locked_by_another)
    vm = OutputsOfOneVm()
    try:
        fd = vm.open(path)
        assert [c.path for c in vm.created] == [str(path)]
        os.write(fd, b"")
        for other in others:
            os.close(other)  # the lock is gone before the failed start
        others.clear()
        vm.fail_start()
        assert path.exists()
    finally:
        vm.close()
        for other in others:
            os.close(other)


def test_an_output_that_is_the_vms_disk_by_another_path_leaves_the_disk_lock_to_the_disk(
    tmp_path,
):
    """Outputs are locked on one byte (OFD), not with flock, which a disk image holds whole
    (lock_disk): an output that is the VM's own disk by another path must reach
    refuse_outputs_on_disks, which says so by name; with a flock on the output, the disk's
    lock failed first, saying another VM had the image."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vm = OutputsOfOneVm()
    vm.open(tmp_path / "disk.img")
    fd = os.open(disk, os.O_RDWR)
    try:
        devicefds.lock_disk(fd, str(disk), "device 'blk0'.path", readonly=False)
    finally:
        os.close(fd)
        vm.close()


def test_a_created_output_the_monitor_may_not_remove_is_kept_without_error(tmp_path, monkeypatch):
    """A monitor that may not unlink (its directory's permissions; Landlock): Machine.close
    goes on."""
    path = tmp_path / "serial.log"
    dev = DeviceSection("serial0", "serial", "stop", {"output": str(path)})
    created: list[devicefds.CreatedFile] = []
    owned: list[devicefds.Closable] = []
    devicefds.open_output(dev, "output", owned, created)

    def denied(target: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(devicefds.os, "unlink", denied)
    created[0].remove_if_unused()
    monkeypatch.undo()
    for c in reversed(owned):
        c.close()
    assert path.exists()
