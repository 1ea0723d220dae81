"""The fds a device process holds, made by the monitor from its model's fd roles (FdKind).

The monitor knows how to make each kind -- an irqfd, an output stream, a view of guest RAM,
a dirty bitmap, a progress page, an ioeventfd, a disk image, a TAP -- never what a model does
with it. Every fd made here is the monitor's: a device's processes get copies at each spawn
(a restarted process gets the same ones: the irqfds and ioeventfds stay registered with KVM
across a crash), and the machine closes them at tear-down.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from splitvmm import hostpath
from splitvmm.config import DeviceSection
from splitvmm.errors import ConfigError
from splitvmm.monitor.layout import PAGE_SIZE
from splitvmm.monitor.memory import SEALS, GuestMemory
from splitvmm.native import files, tun
from splitvmm.native.eventfd import EventFd
from splitvmm.protocol.dirtybits import dirty_log_size
from splitvmm.protocol.models import (
    DIRECT_IO_ALIGN,
    PROGRESS_MAX_VECTORS,
    PROGRESS_MSIX_ENABLED_BYTE,
    PROGRESS_VECTORS_AT,
    FdKind,
    FdRole,
    ModelDescriptor,
    PciFunction,
    PortWindow,
    unix_output_path,
)
from splitvmm.record import Struct, field

log = logging.getLogger("splitvmm.devicefds")

STDOUT = 1


class Closable(Protocol):
    def close(self) -> None: ...


class IrqFds(Protocol):
    """The VM's irqfd registration (native/kvm.py VmFd)."""

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None: ...


class HeldIrqfds:
    """Irqfd registrations held, then made in their order by release(): a restore's, until
    the saved irqchip is set (restore.apply). KVM_IRQFD injects what its eventfd counts
    already, so an edge a device sends as it restores (one the save may have missed: the
    rtc's, the 8250's) lands in the restored IOAPIC, not in the one apply then overwrites."""

    def __init__(self, vm: IrqFds) -> None:
        self._vm = vm
        self._held: list[tuple[int, int, int | None]] = []

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        self._held.append((eventfd, gsi, resample_fd))

    def release(self) -> None:
        held, self._held = self._held, []
        for eventfd, gsi, resample_fd in held:
            self._vm.register_irqfd(eventfd, gsi, resample_fd)


class PciInterrupts(Struct, frozen=True):
    """Where a PCI function's interrupts go: its INTx GSI (None: no INTx), and the GSI of
    each of its MSI-X vectors."""

    intx_gsi: int | None
    msix_gsis: tuple[int, ...]


class DeviceFds(Struct):
    """Makes the fds of one device; whatever it opens goes into `owned`, for the caller to
    close (also when a later role fails)."""

    vm: IrqFds
    mem: GuestMemory
    owned: list[Closable]
    pci: PciInterrupts | None = None
    notify: dict[int, int] = field(default_factory=dict)  # queue -> its ioeventfd's eventfd
    _intx: tuple[EventFd, EventFd] | None = None  # (irqfd, resample fd), made together
    tap_offloads: bool | None = None  # whether its TAP takes offloads (tun.open_tap), if any
    # The interface its TAP is: the option's name, or the one the kernel chose for a pattern
    # such as "tap%d", which the operator learns from `ctl devices` (Machine._device)
    tap_name: str | None = None
    # A writable disk image opened again, read-only, for the monitor's own write-back of it
    # (Machine.write_back_images): a new open file description, whose write-back errors are
    # its own (errseq), so that syncing it leaves the device's to report to the guest.
    write_back_fd: int | None = None
    # Each disk it was handed, by the option naming it: the file its DISK_ERRORS role opens
    # again
    disks: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # (fd, path, key)
    # Its dirty log (two bitmaps: FdKind.DIRTY_LOG), mapped: a live snapshot reads and clears
    # them (monitor/dirtylog.py)
    dirty_log: mmap.mmap | None = None
    # The output files that opening them created (the machine's list: kept when a later role
    # fails)
    created: list[CreatedFile] = field(default_factory=list)

    def make(self, dev: DeviceSection, model: ModelDescriptor) -> dict[str, int]:
        """Role name -> fd, for every role of the model."""
        return {role.name: self._make(dev, model, role) for role in model.fds}

    def _make(self, dev: DeviceSection, model: ModelDescriptor, role: FdRole) -> int:
        makers: dict[FdKind, Callable[[], int]] = {
            FdKind.IRQ: lambda: self._isa_irq(model, role),
            FdKind.OUTPUT: lambda: open_output(dev, role.option, self.owned, self.created),
            FdKind.GUEST_RAM: self._guest_ram,
            FdKind.DIRTY_LOG: lambda: self._dirty_log(dev.name),
            FdKind.PROGRESS: lambda: self._sealed_memfd(f"{dev.name}-progress", PAGE_SIZE),
            FdKind.NOTIFY: lambda: self._notify(model, role),
            FdKind.MSIX: lambda: self._msix(model, role),
            FdKind.INTX: lambda: self._intx_pair(model, role)[0].fd,
            FdKind.INTX_RESAMPLE: lambda: self._intx_pair(model, role)[1].fd,
            FdKind.DISK: lambda: self._disk(dev, role),
            FdKind.DISK_ERRORS: lambda: self._disk_errors(model, role),
            FdKind.TAP: lambda: self._tap(dev, role),
        }
        return makers[role.kind]()

    def _eventfd(self) -> EventFd:
        fd = EventFd()
        self.owned.append(fd)
        return fd

    def _isa_irq(self, model: ModelDescriptor, role: FdRole) -> int:
        line = model.transport.irq if isinstance(model.transport, PortWindow) else None
        if line is None:
            raise ConfigError(f"model {model.name}: fd role {role.name} needs an irq line")
        irq = self._eventfd()
        self.vm.register_irqfd(irq.fd, line)
        return irq.fd

    def _own(self, fd: int) -> int:
        self.owned.append(FdCloser(fd))
        return fd

    def _guest_ram(self) -> int:
        """The RAM memfd, opened anew: the device's own file offset, so that nothing it does
        with it moves the offset the monitor's snapshot code uses (snapshot/ram.py). The
        seals belong to the memfd, not the fd: the device cannot resize it either."""
        return self._own(os.open(f"/proc/self/fd/{self.mem.fd}", os.O_RDWR | os.O_CLOEXEC))

    def _dirty_log(self, name: str) -> int:
        """A memfd of two bitmaps, one bit per 4 KiB page of the RAM memfd each (the device's
        marks, then their harvest: FdKind.DIRTY_LOG); sealed like guest RAM: the monitor reads
        it while the device writes it."""
        size = dirty_log_size(self.mem.size)
        fd = self._sealed_memfd(f"{name}-dirty", size)
        self.dirty_log = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.owned.append(self.dirty_log)
        return fd

    def _sealed_memfd(self, name: str, size: int) -> int:
        """A zeroed memfd of `size` bytes that no process can resize (a device's processes
        map it, and a mapping past a shrunk end would fault)."""
        fd = self._own(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd

    def _pci(self, model: ModelDescriptor, role: FdRole) -> tuple[PciFunction, PciInterrupts]:
        if not isinstance(model.transport, PciFunction) or self.pci is None:
            raise ConfigError(f"model {model.name}: fd role {role.name} needs a PCI function")
        return model.transport, self.pci

    def _notify(self, model: ModelDescriptor, role: FdRole) -> int:
        """An eventfd the PCI function's decode registers on queue `index`'s notify address
        (pci/function.py), whenever its BAR decodes."""
        function, _ = self._pci(model, role)
        if function.notify is None or not 0 <= role.index < function.notify.queues:
            raise ConfigError(f"model {model.name}: fd role {role.name} names no queue")
        fd = self._eventfd().fd
        self.notify[role.index] = fd
        return fd

    def _msix(self, model: ModelDescriptor, role: FdRole) -> int:
        """An irqfd on the GSI of MSI-X vector `index` (no route until the device asks)."""
        _, pci = self._pci(model, role)
        if not 0 <= role.index < len(pci.msix_gsis):
            raise ConfigError(f"model {model.name}: fd role {role.name} names no MSI-X vector")
        irq = self._eventfd()
        self.vm.register_irqfd(irq.fd, pci.msix_gsis[role.index])
        return irq.fd

    def _intx_pair(self, model: ModelDescriptor, role: FdRole) -> tuple[EventFd, EventFd]:
        """INTx: a level irqfd and its resample fd (KVM lowers the line at the guest's EOI
        and signals the resample fd; the device raises it again if it still has cause)."""
        _, pci = self._pci(model, role)
        if pci.intx_gsi is None:
            raise ConfigError(f"model {model.name}: fd role {role.name} needs INTx")
        if self._intx is None:
            irq, resample = self._eventfd(), self._eventfd()
            self.vm.register_irqfd(irq.fd, pci.intx_gsi, resample_fd=resample.fd)
            self._intx = irq, resample
        return self._intx

    def _disk(self, dev: DeviceSection, role: FdRole) -> int:
        """The regular file the option names, read-only if the readonly option says so, and
        with O_DIRECT if the direct option does (checked here: see check_direct_io), holding
        at least the role's min_size bytes."""
        readonly = bool(dev.options.get(role.readonly_option, False))
        direct = bool(role.direct_option and dev.options.get(role.direct_option, False))
        access = hostpath.Access.READ if readonly else hostpath.Access.READ_WRITE
        path, key = str(dev.options[role.option]), f"device {dev.name!r}.{role.option}"
        fd = self._own(
            hostpath.open_host_file(path, key, access, flags=os.O_DIRECT if direct else 0)
        )
        size = os.fstat(fd).st_size
        if size < role.min_size:  # the device refuses it too, but cannot name the key
            raise hostpath.HostFileError(
                key, path, f"is {size} bytes: a {dev.model} disk needs at least {role.min_size}"
            )
        lock_disk(fd, path, key, readonly)
        if direct:
            check_direct_io(fd, path, f"device {dev.name!r}.{role.direct_option}")
        if not readonly:
            self.write_back_fd = self._own(_open_again(fd, path, key, "to be written back"))
        self.disks[role.option] = fd, path, key
        return fd

    def _disk_errors(self, model: ModelDescriptor, role: FdRole) -> int:
        """The file of the model's DISK role with the same option, opened again read-only
        (FdKind.DISK_ERRORS): a description of its own, which hears of every write-back
        error of the file from now on, whichever process's sync takes it first."""
        if role.option not in self.disks:
            raise ConfigError(f"model {model.name}: fd role {role.name} has no disk before it")
        fd, path, key = self.disks[role.option]
        return self._own(_open_again(fd, path, key, "for its write-back errors"))

    def _tap(self, dev: DeviceSection, role: FdRole) -> int:
        """The TAP the option names, made if missing (which needs CAP_NET_ADMIN), else the
        existing one (a persistent TAP its owner made for us); opened here, before the
        monitor confines itself. Only a TAP the monitor made goes away with the fd."""
        name, key = str(dev.options[role.option]), f"device {dev.name!r}.{role.option}"
        try:
            fd, self.tap_name, self.tap_offloads = tun.open_tap(name)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.EINVAL:  # tun's answer for a name it will not take as a TAP
                why = "an interface of that name exists and is not a TAP, or the kernel takes "
                why += "no interface of that name (TUNSETIFF: Invalid argument)"
            raise ConfigError(f"{key}: cannot open TAP {name!r}: {why}") from None
        return self._own(fd)


def _open_again(fd: int, path: str, key: str, why: str) -> int:
    """The very file `fd` is, whatever its path names now, opened again read-only: a new open
    file description, with write-back errors of its own to report (errseq)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        reason = f"cannot be opened again {why}: {e.strerror}"
        raise hostpath.HostFileError(key, path, reason) from None


def lock_disk(fd: int, path: str, key: str, readonly: bool) -> None:
    """Lock the image for this VM's life, as QEMU and crosvm do: a read-write VM alone, or
    any number of read-only ones, so two VMs never write one image (each through its own
    page cache view, journal and allocator: a corrupt file system) and none reads an image
    another writes. Two locks, both on the open file description, which the device processes
    share and which ends with the last fd of it, when the VM does (a crashed device's
    restart keeps it; the monitor's own write-back description holds none and closing it
    drops nothing): flock(2), which keeps other splitvmm VMs off, and QEMU's lock bytes
    (lock_as_qemu), which flock does not conflict with on Linux. A refused fd keeps what it
    took until its caller closes it. A file system without locks (ENOLCK, EOPNOTSUPP: some
    network file systems) is used unlocked, with a warning."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        use = "open read-write" if readonly else "open"
        raise ConfigError(
            f"{key}: {path} is {use} in another VM (it holds the image's lock; or another "
            "device of this VM, by another path; or a process of a VM that has just ended): "
            f"{ONE_WRITER}"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            raise ConfigError(f"{key}: cannot lock {path}: {e.strerror or e}") from None
        log.warning("%s: %s cannot be locked (%s): nothing keeps another VM off it", key, path,
                    e.strerror)  # fmt: skip
    lock_as_qemu(fd, path, key, readonly)


ONE_WRITER = "a disk image is written by one VM at a time, and read by none while one writes it"


class BlkPerm(enum.IntFlag):
    """QEMU's block permissions (include/block/block-common.h BLK_PERM_*). QEMU's file-posix
    driver holds permission bit n on an image by a shared OFD lock on byte
    RAW_LOCK_PERM_BASE + n, and denies it to others (does not share it) by one on byte
    RAW_LOCK_SHARED_BASE + n (block/file-posix.c); each user then tests the bytes the others'
    locks would put in its way."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


RAW_LOCK_PERM_BASE = 100  # libvirt's lock is byte 0; QEMU keeps clear of it
RAW_LOCK_SHARED_BASE = 200
# What we deny others, read-write or not: a QEMU virtio-blk drive denies WRITE alone
# (hw/block/block.c blkconf_apply_backend_options; /proc/locks shows bytes 100-101 and 201
# for `-drive if=virtio`, 100 and 201 with readonly=on), and shares RESIZE, as its device
# tells the guest of a new size; ours takes the image's size once, at start, and cannot.
QEMU_UNSHARED = BlkPerm.WRITE | BlkPerm.RESIZE


def _lock_byte(base: int, perm: BlkPerm) -> int:
    return base + perm.bit_length() - 1


def lock_as_qemu(fd: int, path: str, key: str, readonly: bool) -> None:
    """Take the lock bytes a QEMU VM takes for a virtio-blk drive on the image (BlkPerm),
    then refuse the image if another program's bytes are in the way: taken first and tested
    after, as QEMU does, so that two starting at once see each other (and both stop) rather
    than neither. ConfigError naming the byte; no OFD locks here (EINVAL: a kernel before
    3.15), or none on the file system: unlocked, with a warning."""
    held = BlkPerm.CONSISTENT_READ if readonly else BlkPerm.CONSISTENT_READ | BlkPerm.WRITE
    try:
        for perm in held:
            files.ofd_read_lock(fd, _lock_byte(RAW_LOCK_PERM_BASE, perm), 1)
        for perm in QEMU_UNSHARED:
            files.ofd_read_lock(fd, _lock_byte(RAW_LOCK_SHARED_BASE, perm), 1)
        conflict = _qemu_conflict(fd, held)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):  # a write lock on a byte: not QEMU's way
            conflict = "holds a write lock on QEMU's lock bytes"
        elif e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            log.warning("%s: %s cannot be locked as QEMU locks it (%s): nothing keeps a QEMU "
                        "off it", key, path, e.strerror)  # fmt: skip
            return
        else:
            raise ConfigError(f"{key}: cannot lock {path}: {e.strerror or e}") from None
    if conflict is not None:
        raise ConfigError(
            f"{key}: {path} is open in another program, which {conflict}: {ONE_WRITER}"
        )


def _qemu_conflict(fd: int, held: BlkPerm) -> str | None:
    """What another program's QEMU lock bytes deny us, as QEMU's raw_check_lock_bytes looks:
    a permission we hold that another does not share, or one we do not share that another
    holds. None: nothing."""
    for perm in held:
        byte = _lock_byte(RAW_LOCK_SHARED_BASE, perm)
        if files.ofd_locked_by_another(fd, byte, 1):
            return f'shares no "{_perm_name(perm)}" of it (QEMU\'s lock byte {byte})'
    for perm in QEMU_UNSHARED:
        byte = _lock_byte(RAW_LOCK_PERM_BASE, perm)
        if files.ofd_locked_by_another(fd, byte, 1):
            return f'holds it with "{_perm_name(perm)}" permission (QEMU\'s lock byte {byte})'
    return None


def _perm_name(perm: BlkPerm) -> str:
    """QEMU's name of a permission (bdrv_perm_names), as its own refusals say it."""
    return str(perm.name).lower().replace("_", " ")


def check_direct_io(fd: int, path: str, key: str) -> None:
    """A disk opened with O_DIRECT must take whole DIRECT_IO_ALIGN blocks: its size a whole
    number of them (a device writes a partial last block as a whole one, which would grow
    the file), and a block read at offset 0 (a file system whose blocks are larger refuses
    it, EINVAL, and would refuse the guest's every request)."""
    size = os.fstat(fd).st_size
    if size % DIRECT_IO_ALIGN:
        raise ConfigError(
            f"{key}: {path} is {size} bytes, not a multiple of {DIRECT_IO_ALIGN}, as direct "
            "I/O needs (resize it, or leave direct out)"
        )
    block = mmap.mmap(-1, DIRECT_IO_ALIGN)  # page-aligned, as O_DIRECT wants memory
    try:
        os.preadv(fd, [block], 0)
    except OSError as e:
        raise ConfigError(
            f"{key}: {path} refused a direct read of {DIRECT_IO_ALIGN} bytes: {e.strerror}"
        ) from None
    finally:
        block.close()


def raise_interrupts(model: ModelDescriptor, fds: dict[str, int]) -> int:
    """Signal the MSI-X vectors of a device left dead (on_crash = "leave"), so that a driver
    waiting for an interrupt looks at the device and finds it failed (virtio: its status
    reads all-ones, NEEDS_RESET among them; the ISR's configuration-change bit set): each
    vector whose message the device could send when it died, as its progress page says
    (protocol/models.py PROGRESS_VECTORS_AT, read with pread: the monitor maps nothing a
    device writes). One masked, or with MSI-X off or Bus Master Enable clear, is not: PCI
    3.0 6.8.2.9 forbids its message, and the dead device can set no pending bit. Nor one
    whose current message was never routed: its GSI still holds an older message. A vector
    without a route raises nothing; a spurious interrupt costs a driver one look. Its INTx,
    a level, is held by the monitor instead (pci/intx.py). The number of fds signalled."""
    vectors = [role for role in model.fds if role.kind is FdKind.MSIX and role.name in fds]
    progress = _progress_fd(model, fds)
    if not vectors or progress is None:
        return 0
    may_fire = os.pread(progress, PROGRESS_MAX_VECTORS, PROGRESS_VECTORS_AT)
    signalled = 0
    for role in vectors:
        k = role.index  # msix<k>: vector k
        if k < len(may_fire) and may_fire[k] == 1:
            os.eventfd_write(fds[role.name], 1)
            signalled += 1
    return signalled


def msix_was_enabled(model: ModelDescriptor, fds: dict[str, int]) -> bool:
    """Whether a dead PCI device's MSI-X Enable was set, as its progress page says
    (protocol/models.py PROGRESS_MSIX_ENABLED_BYTE, read with pread); False without a page."""
    progress = _progress_fd(model, fds)
    return progress is not None and os.pread(progress, 1, PROGRESS_MSIX_ENABLED_BYTE) == b"\x01"


def _progress_fd(model: ModelDescriptor, fds: dict[str, int]) -> int | None:
    """The device's progress page (FdKind.PROGRESS), if its model has one and it was made."""
    return next(
        (fds[r.name] for r in model.fds if r.kind is FdKind.PROGRESS and r.name in fds), None
    )


def open_output(
    dev: DeviceSection,
    option: str,
    owned: list[Closable],
    created: list[CreatedFile] | None = None,
) -> int:
    """An output stream's fd: stdout (a description of our own of it where it may be opened
    anew: a root launcher's devices could not, for the terminal of a user who ran `sudo` in
    it, and made the one the operator's shell shares non-blocking; BlockingAsItWas
    otherwise), a UNIX socket, or a file (created 0600, and then named in `created`), FIFO
    or character device, each opened through hostpath: no symlink, and no hang."""
    output, key = str(dev.options[option]), f"device {dev.name!r}.{option}"
    if output == "stdio":
        _appending_if_file(STDOUT)
        own = files.nonblocking_description(STDOUT)
        if own is not None:
            owned.append(FdCloser(own))
            return own
        owned.append(BlockingAsItWas(STDOUT))
        return STDOUT
    path = unix_output_path(output)
    if path is not None:
        sock = hostpath.connect_unix(path, key)
        owned.append(sock)
        return sock.fileno()
    fd, made, holder = _open_output_file(output, key)
    if holder is not None:
        owned.append(FdCloser(holder))  # the VM's shared lock on the file, for its life
    if made and created is not None:
        created.append(CreatedFile(output, fd, holder))
        owned.append(created[-1])
        return fd
    if created is not None and (first := _made_by_this_vm(fd, created)) is not None:
        # Another of this VM's devices writes it too: its description and its lock, so that
        # this VM holds one lock on the file, which its removal can make exclusive
        os.close(fd)
        if holder is not None:
            owned.pop()
            os.close(holder)
        fd = os.dup(first.fd)
    owned.append(FdCloser(fd))
    return fd


def _made_by_this_vm(fd: int, created: list[CreatedFile]) -> CreatedFile | None:
    """The CreatedFile of `created` that is the file open as `fd`, if any."""
    held = os.fstat(fd)
    for made in created:
        other = os.fstat(made.fd)
        if (other.st_dev, other.st_ino) == (held.st_dev, held.st_ino):
            return made
    return None


# Output files: every VM that writes one holds a shared lock on it while it runs, and a VM that
# made one and never ran removes it only under an exclusive one (CreatedFile): so a failed
# start never removes a file that another VM, which names it too, still writes. OFD locks on
# one byte far past any data (F_OFD_SETLK, as QEMU locks its images: files.ofd_read_lock),
# not flock: a VM's disk images are flocked whole (lock_disk), and an output that is the VM's
# own disk by another path must reach refuse_outputs_on_disks (monitor/slot.py) to be refused
# by name, not fail the disk's lock. A shared lock needs a description open for reading, and
# a device's output is write-only: the monitor holds a read-only one of its own for the lock.
OUTPUT_LOCK_BYTE = 1 << 62  # QEMU's lock bytes are 100-203, libvirt's 0
OUTPUT_LOCK_OPENS = 3  # opens to lock: each retried after a removal between open and lock
OUTPUT_LOCK_TRIES = 50  # 1 ms apart: a removal holds its exclusive lock for a stat and an unlink


def _open_output_file(output: str, key: str) -> tuple[int, bool, int | None]:
    """The output file's fd, whether this open made it, and the read-only description that
    holds its shared lock (None: unlocked, _share_output). A file that a removal took away
    between our open and our lock is opened again: made anew, then, and ours."""
    for _ in range(OUTPUT_LOCK_OPENS):
        fd, made = hostpath.open_output_file(output, key)
        holder = None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a terminal: nobody removes it
                return fd, made, None
            holder = _share_output(fd, output, key)
            if hostpath.same_file(fd, output):
                return fd, made, holder
        except BaseException:
            os.close(fd)
            if holder is not None:
                os.close(holder)
            raise
        os.close(fd)
        if holder is not None:
            os.close(holder)
    raise hostpath.HostFileError(
        key, output, f"was removed each of the {OUTPUT_LOCK_OPENS} times it was opened and locked"
    )


def _share_output(fd: int, path: str, key: str) -> int | None:
    """A read-only description of the output file open as `fd`, holding a shared lock on
    OUTPUT_LOCK_BYTE; None where it cannot: a file we may not read, a lock another process
    holds for longer than a removal takes (not a VM's), a file system without locks. The
    output is then written unlocked, as before, and never removed by this VM (CreatedFile),
    which cannot know who else writes it."""
    try:  # the same file, not whatever the path names now
        holder = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        log.debug("%s: %s cannot be opened to lock it: %s", key, path, e.strerror)
        return None
    for _ in range(OUTPUT_LOCK_TRIES):
        try:
            files.ofd_read_lock(holder, OUTPUT_LOCK_BYTE, 1)
            return holder
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # EINVAL, ENOLCK, EOPNOTSUPP
                log.debug("%s: %s cannot be locked: %s", key, path, e.strerror)
                break
            time.sleep(0.001)
    else:
        log.debug("%s: %s is locked by another process: written unlocked", key, path)
    os.close(holder)
    return None


def _appending_if_file(fd: int) -> None:
    """A regular file behind `fd` (a shell's `> log`) made O_APPEND, for every writer of its
    description: the device is handed this description, and pwrite(2) through one without
    O_APPEND writes anywhere in the file, so a compromised device could rewrite the
    operator's log, or extend it sparsely to a terabyte. With O_APPEND, Linux appends
    whatever offset pwrite names (pwrite(2) BUGS), and every write lands at the end, as the
    shell's sequential writes did. (A file named as the output is opened O_APPEND already.)"""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_APPEND:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)


class BlockingAsItWas:
    """Puts O_NONBLOCK back as it was on a description the operator's shell shares (stdout),
    at tear-down, once the devices have ended: a device that cannot open that terminal or
    pipe anew for a description of its own (another user's terminal, after `su` in it) makes
    this one non-blocking instead (fdline.py), and the shell's commands after the VM then
    got EAGAIN writing to their terminal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._nonblocking = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK

    def close(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK | self._nonblocking)


class FdCloser:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class CreatedFile(FdCloser):
    """An output file that `up` created, and its fd. A VM that never ran (its kernel refused,
    a disk missing, a stop signal during the build: each found after the outputs were
    opened) removes it again in Machine.close(), so a failed start leaves no empty log
    behind; a file that was there before, or that holds a byte, or that is another file by
    now, or that another VM has open (its shared lock: _open_output_file), stays; and so does
    one this VM could not lock (`holder` None), as it cannot tell who else writes it. Before
    its fd closes: while it is open, no new file can get its inode.

    What is left: a VM that opened the file while another process held it locked for over
    OUTPUT_LOCK_TRIES ms writes it unlocked, and one that made it and locked it after that
    lock went removes it on a failed start even so."""

    def __init__(self, path: str, fd: int, holder: int | None) -> None:
        super().__init__(fd)
        self.path = path
        self.holder = holder  # the read-only description holding our shared lock (owned)

    def remove_if_unused(self) -> None:
        """Only before the monitor's filter is on: it allows no lock (Machine.close)."""
        if self.holder is None:
            log.debug("left %s in place: it could not be locked", self.path)
            return
        try:
            # Exclusive, on the output's own description (open for writing, as F_WRLCK
            # wants), once our shared one is gone: refused while another VM holds its own.
            # Held until our close, so a VM that opens the file meanwhile waits for its
            # lock, then finds it gone and makes it anew.
            files.ofd_unlock(self.holder, OUTPUT_LOCK_BYTE, 1)
            files.ofd_write_lock(self.fd, OUTPUT_LOCK_BYTE, 1)
        except OSError as e:
            why = "another VM has it open" if e.errno in (errno.EAGAIN, errno.EACCES) else e
            log.debug("left %s in place: %s", self.path, why)
            return
        try:
            if hostpath.same_file(self.fd, self.path) and os.fstat(self.fd).st_size == 0:
                os.unlink(self.path)
        except OSError as e:  # its directory's permissions, Landlock: kept
            log.debug("left %s in place: %s", self.path, e.strerror)
