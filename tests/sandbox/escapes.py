"""Escape attempts, each run by a test hook inside a real sandboxed device process.

This module travels by value in the hook's pickle (cloudpickle), so it imports
nothing from tests/; the modules it names travel by reference and are imported
when the hook is unpickled, before the sandbox (no import works inside).
Each attempt returns what it got, or raises OSError (the hook reports the
errno); a forbidden syscall never returns (SIGSYS kills the process).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

from splitvmm.native import confine
from splitvmm.native.seccomp import pyseccomp

PTRACE_ATTACH = 16  # <sys/ptrace.h>; Python's stdlib has no ptrace constants
BPF_PROG_LOAD = 5  # <linux/bpf.h> enum bpf_cmd
SETNS_ANY = 0  # setns(2) nstype 0: any kind of namespace
ALLOCATION = 1 << 30  # well past a device's address-space limit, well within the host's RAM

Attempt = Callable[[dict[str, int], dict[str, int]], object]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): the loaded libc, no file opened


def _check(ret: int) -> int:
    if ret < 0:
        raise OSError(ctypes.get_errno(), "libc call failed")
    return ret


def _syscall(name: str, *args: object) -> int:
    """syscall(2) with every int argument as a C long: libc's syscall() is variadic, and a
    plain Python int goes as a 32-bit int, whose upper half is garbage where it goes on the
    stack (the sixth argument: process_vm_readv's flags would be refused, EINVAL)."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    longs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(_libc().syscall(ctypes.c_long(nr), *longs))


def _sockaddr_in(host: str, port: int) -> bytes:
    """struct sockaddr_in, whole: 16 bytes (a shorter one is refused, EINVAL)."""
    addr = struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(host)
    return addr.ljust(16, b"\0")


def _sockaddr_un(path: str) -> bytes:
    return struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0"


def open_etc_passwd(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return _syscall("open", b"/etc/passwd", os.O_RDONLY)


def openat_etc_passwd(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return os.open("/etc/passwd", os.O_RDONLY)


def read_proc_self_environ(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return os.open("/proc/self/environ", os.O_RDONLY)


def list_root(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return os.listdir("/")


def creat_file(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return _check(_libc().creat(b"/pwned", 0o600))


def mkdir_dir(fds: dict[str, int], ctx: dict[str, int]) -> object:
    os.mkdir("/pwned")
    return "made /pwned"


def unlink_channel(fds: dict[str, int], ctx: dict[str, int]) -> object:
    os.unlink("/channel")
    return "unlinked /channel"


def socket_inet(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).fileno()


def connect_unix_path(fds: dict[str, int], ctx: dict[str, int]) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("/channel")
        return "connected to /channel"


# The sockets below were made by the suite in the host's network namespace (test_escape.py
# handed_fds), as a device's inherited output socket is: only seccomp keeps the device from
# reaching the host's network with them.
def connect_held_fd_to_loopback(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The host's loopback (a UDP connect needs no listener)."""
    addr = _sockaddr_in("127.0.0.1", 22)
    return _check(_libc().connect(fds["inet"], addr, len(addr)))


def connect_held_fd_to_unix_path(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The channel's socket, by its path in the empty root: the device's one named socket."""
    addr = _sockaddr_un("/channel")
    return _check(_libc().connect(fds["unix"], addr, len(addr)))


def connect_held_fd_to_abstract_address(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """A host abstract UNIX socket (then send() needs no address: sendto's rule lets it go)."""
    addr = struct.pack("=H", socket.AF_UNIX) + HOST_ABSTRACT_SOCKET % ctx["suite_pid"]
    return _check(_libc().connect(fds["dgram"], addr, len(addr)))


def bind_held_fd(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """A name in the host's abstract UNIX namespace, which a host service may be about to take."""
    addr = struct.pack("=H", socket.AF_UNIX) + SQUATTED_ABSTRACT_SOCKET % ctx["monitor_pid"]
    return _check(_libc().bind(fds["dgram"], addr, len(addr)))


# An abstract UNIX socket of the host's that the escape suite binds (test_escape.py
# handed_fds): one the device could reach through a socket made outside its namespaces. One
# per pytest process (its pid): abstract names are the host's, and two runs of the suite at
# once (two checkouts) met EADDRINUSE.
HOST_ABSTRACT_SOCKET = b"\0splitvmm-escape-victim-%d"
SQUATTED_ABSTRACT_SOCKET = b"\0splitvmm-escape-squat-%d"  # one per test: the sleeper's pid


def sendto_abstract_address(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """A datagram to a host abstract UNIX socket through a socket made outside the device's
    network namespace (as an inherited stdout may be): no file-system rule covers abstract
    names, and the device's own network namespace does not cover that socket."""
    addr = struct.pack("=H", socket.AF_UNIX) + HOST_ABSTRACT_SOCKET % ctx["suite_pid"]
    return _check(_libc().sendto(fds["dgram"], b"out", 3, 0, addr, len(addr)))


def send_out_of_band(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """AF_UNIX out-of-band data, the way in of a sandbox escape (CVE-2025-38236)."""
    return _check(_libc().sendto(fds["stream"], b"!", 1, socket.MSG_OOB, None, 0))


def receive_out_of_band(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The other half of it: the handed stream socket has an out-of-band byte waiting."""
    buf = ctypes.create_string_buffer(1)
    return _check(_libc().recvfrom(fds["stream"], buf, 1, socket.MSG_OOB, None, None))


def execve_shell(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return os.execv("/bin/sh", ["sh", "-c", "true"])


def fork_process(fds: dict[str, int], ctx: dict[str, int]) -> object:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


def clone_thread(fds: dict[str, int], ctx: dict[str, int]) -> object:
    thread = threading.Thread(target=lambda: None)
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread": clone failed, EAGAIN (RLIMIT_NPROC)
        raise OSError(errno.EAGAIN, "can't start new thread") from None
    thread.join()
    return "thread ran"


def ptrace_attach_monitor(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return _check(_libc().ptrace(PTRACE_ATTACH, ctx["monitor_pid"], None, None))


def kill_monitor(fds: dict[str, int], ctx: dict[str, int]) -> object:
    os.kill(ctx["monitor_pid"], signal.SIGKILL)
    return "signalled"


def process_vm_readv_monitor(fds: dict[str, int], ctx: dict[str, int]) -> object:
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_size_t * 2)(ctypes.addressof(buf), 8)  # struct iovec {base, len}
    remote = (ctypes.c_size_t * 2)(ctx["monitor_address"], 8)  # mapped in the monitor
    pid = ctx["monitor_pid"]
    return _syscall("process_vm_readv", pid, local, 1, remote, 1, 0)


def mount_tmpfs(fds: dict[str, int], ctx: dict[str, int]) -> object:
    return _check(_libc().mount(b"none", b"/", b"tmpfs", 0, None))


def unshare_userns(fds: dict[str, int], ctx: dict[str, int]) -> object:
    confine.unshare(confine.CLONE_NEWUSER)
    return "in a new user namespace"


def setns_any(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The host's network namespace, through an fd of it the suite hands over."""
    return _check(_libc().setns(fds["netns"], SETNS_ANY))


BPF_PROG_TYPE_SOCKET_FILTER = 1  # <linux/bpf.h>: what an unprivileged process may load
BPF_ATTR_SIZE = 128  # the fields of union bpf_attr a load names, and zeroes after them


def bpf_prog_load(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """A socket filter of two instructions (r0 = 0; exit): the verifier takes it."""
    insns = (ctypes.c_uint64 * 2)(0xB7, 0x95)  # BPF_ALU64|BPF_MOV|BPF_K r0, 0; BPF_JMP|BPF_EXIT
    license = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack(
        "=IIQQ", BPF_PROG_TYPE_SOCKET_FILTER, 2, ctypes.addressof(insns), ctypes.addressof(license)
    )
    buf = ctypes.create_string_buffer(attr, BPF_ATTR_SIZE)
    return _syscall("bpf", BPF_PROG_LOAD, buf, BPF_ATTR_SIZE)


def io_uring_setup(fds: dict[str, int], ctx: dict[str, int]) -> object:
    params = ctypes.create_string_buffer(120)  # sizeof(struct io_uring_params), zeroed
    return _syscall("io_uring_setup", 8, params)


def io_setup_context(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """An AIO context takes events from fs.aio-max-nr, which the whole host shares: a device
    that could make them could starve every other process's AIO. virtio-blk's, for a direct
    image, is made before seccomp; its policy allows io_submit and io_getevents only."""
    handle = ctypes.c_ulong(0)
    return _syscall("io_setup", 8, ctypes.byref(handle))


def ioctl_kvm_on_every_fd(fds: dict[str, int], ctx: dict[str, int]) -> object:
    answers = {}
    for fd in range(65):  # the handed /dev/kvm fd (where the host has one) among them
        try:
            answers[fd] = fcntl.ioctl(fd, ctx["KVM_GET_API_VERSION"])
        except OSError as e:
            answers[fd] = -(e.errno or 0)
    if all(v < 0 for v in answers.values()):
        raise OSError(errno.ENOTTY, "every fd refused KVM_GET_API_VERSION")
    return answers


# The fd role (DeviceSpec.fds) each attempt on a held file attacks: what the model really holds,
# as the monitor makes it. A model that holds none skips the attempt (test_escape.py): on a file
# the suite made instead (a memfd it sealed itself), the kernel refuses it with no sandbox.
HELD = {
    "ftruncate_sealed_memfd": "ram",
    "write_past_end_of_disk": "disk",
    "allocate_past_end_of_disk": "disk",
    "truncate_output_file": "out",
    "allocate_past_end_of_output": "out",
}


def ftruncate_sealed_memfd(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """Guest RAM shrunk under the monitor's mapping, which would SIGBUS: its seals refuse it."""
    os.ftruncate(fds["ram"], 0)
    return "shrunk"


def truncate_output_file(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The operator's log emptied (O_APPEND, which bounds every write, does not bound this)."""
    os.ftruncate(fds["out"], 0)
    return "emptied"


def reopen_readonly_fd_for_writing(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The file behind a read-only fd (a read-only disk image), opened again for writing
    through /proc/self/fd, as its owner may. A write on the fd itself is the kernel's to
    refuse (EBADF) with no sandbox at all, so it tested nothing of ours."""
    fd = os.open(f"/proc/self/fd/{fds['readonly']}", os.O_WRONLY)
    try:
        return os.write(fd, b"pwned")
    finally:
        os.close(fd)


# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE = 0x01, 0x10


PAST_THE_END = 1 << 30  # past any stand-in file (fstat is no device's to call)


def write_past_end_of_disk(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """Grow the image, filling the host's file system: the file-size rlimit is its size. (No
    other file a device holds grows so: its memfds are sealed, an output appends.)"""
    return os.pwrite(fds["disk"], b"x", PAST_THE_END)


def _allocate_past_end(fd: int, mode: int) -> object:
    """Blocks past the end that no listing shows (KEEP_SIZE is not bound by the rlimit)."""
    at, length = ctypes.c_longlong(PAST_THE_END), ctypes.c_longlong(1 << 28)
    return _check(_libc().fallocate(fd, mode, at, length))


def allocate_past_end_of_disk(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """ZERO_RANGE, which virtio-blk's policy allows without KEEP_SIZE only."""
    return _allocate_past_end(fds["disk"], FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)


def allocate_past_end_of_output(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """The same past the end of a log, which no file-size limit bounds (a plain allocation:
    every file system that allocates takes it, tmpfs too)."""
    return _allocate_past_end(fds["out"], FALLOC_FL_KEEP_SIZE)


def write_within_a_page_of_a_small_disk(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """One byte at the end of the first page, past a disk image smaller than a page."""
    return os.pwrite(fds["disk"], b"x", mmap.PAGESIZE - 1)


def zero_a_page_of_a_small_disk(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """ZERO_RANGE over the first page: grows an image smaller than a page to a page."""
    at, length = ctypes.c_longlong(0), ctypes.c_longlong(mmap.PAGESIZE)
    return _check(_libc().fallocate(fds["disk"], FALLOC_FL_ZERO_RANGE, at, length))


# Attempts on a virtio-blk image smaller than a page (test_escape.py), where the sealed
# progress page, a page long, set the file-size limit
SMALL_DISK_ATTEMPTS: dict[str, Attempt] = {
    fn.__name__: fn for fn in (write_within_a_page_of_a_small_disk, zero_a_page_of_a_small_disk)
}


def mmap_exec(fds: dict[str, int], ctx: dict[str, int]) -> object:
    prot = mmap.PROT_READ | mmap.PROT_EXEC
    return len(mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE, prot=prot))


def mprotect_exec(fds: dict[str, int], ctx: dict[str, int]) -> object:
    buf = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return _check(_libc().mprotect(ctypes.c_void_p(addr), mmap.PAGESIZE, mmap.PROT_EXEC))


def setuid_root(fds: dict[str, int], ctx: dict[str, int]) -> object:
    os.setuid(0)
    return "uid 0"


def allocate_past_address_space(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """1 GiB, zero-filled (so every page is touched): beyond the device's RLIMIT_AS."""
    try:
        return len(bytearray(ALLOCATION))
    except MemoryError:
        raise OSError(errno.ENOMEM, "MemoryError") from None


def allocate_in_place_of_guest_ram(fds: dict[str, int], ctx: dict[str, int]) -> object:
    """Unmap every shared mapping the device made before its sandbox (a virtio device's guest
    RAM and dirty log: munmap is allowed), then allocate 1 GiB in the address space freed:
    RLIMIT_AS counts guest RAM, so it must not be what bounds the device's own memory."""
    import gc

    libc = _libc()
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    for obj in gc.get_objects():
        if isinstance(obj, mmap.mmap) and not obj.closed and len(obj) >= 1 << 20:
            with contextlib.suppress(TypeError):  # a read-only mapping: not guest RAM
                address = ctypes.addressof(ctypes.c_char.from_buffer(obj))
                _check(libc.munmap(address, len(obj)))
    return allocate_past_address_space(fds, ctx)


ATTEMPTS: dict[str, Attempt] = {
    fn.__name__: fn
    for fn in (
        open_etc_passwd,
        openat_etc_passwd,
        read_proc_self_environ,
        list_root,
        creat_file,
        mkdir_dir,
        unlink_channel,
        socket_inet,
        connect_unix_path,
        connect_held_fd_to_loopback,
        connect_held_fd_to_unix_path,
        connect_held_fd_to_abstract_address,
        bind_held_fd,
        sendto_abstract_address,
        send_out_of_band,
        receive_out_of_band,
        execve_shell,
        fork_process,
        clone_thread,
        ptrace_attach_monitor,
        kill_monitor,
        process_vm_readv_monitor,
        mount_tmpfs,
        unshare_userns,
        setns_any,
        bpf_prog_load,
        io_uring_setup,
        io_setup_context,
        ioctl_kvm_on_every_fd,
        ftruncate_sealed_memfd,
        truncate_output_file,
        reopen_readonly_fd_for_writing,
        write_past_end_of_disk,
        allocate_past_end_of_disk,
        allocate_past_end_of_output,
        mmap_exec,
        mprotect_exec,
        setuid_root,
        allocate_past_address_space,
        allocate_in_place_of_guest_ram,
    )
}


# -- what the policy allows, narrowed by arguments: allowed forms return, others kill ------------
FUTEX_REQUEUE_PRIVATE = 3 | 128  # <linux/futex.h>: FUTEX_REQUEUE | FUTEX_PRIVATE_FLAG
PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _futex(op: int) -> object:
    word = ctypes.c_uint32(0)
    return _syscall("futex", ctypes.byref(word), op, 1, None, None, 0)


def _madvise(advice: int) -> object:
    buf = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return _check(_libc().madvise(ctypes.c_void_p(addr), mmap.PAGESIZE, advice))


MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2  # <linux/mman.h>


def _mremap(flags: int) -> object:
    """Grow a private anonymous page to two, as glibc's realloc tries to (MREMAP_MAYMOVE), or
    onto an address of our choosing (MREMAP_FIXED: it would replace whatever is mapped there);
    any page so grown, one of the [stack] included (which RLIMIT_DATA does not count)."""
    libc = _libc()
    libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long]
    libc.mremap.argtypes = [ctypes.c_void_p, *[ctypes.c_size_t] * 2, ctypes.c_int]
    page = mmap.PAGESIZE
    rw, private = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    old, target = (libc.mmap(None, 2 * page, rw, private, -1, 0) for _ in range(2))
    if flags & MREMAP_FIXED:
        libc.mremap.argtypes.append(ctypes.c_void_p)
        new = libc.mremap(old, page, 2 * page, flags, target)
    else:
        new = libc.mremap(old, page, 2 * page, flags)
    if new is None or new == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mremap failed")
    return 2 * page


def _realloc_mmapped() -> object:
    """What a buffer grown past glibc's mmap threshold gets: realloc of a block malloc
    mmapped (the threshold fixed at its start value, 128 KiB, so this block is one), which
    glibc tries with mremap first."""
    libc = _libc()
    libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    block = libc.malloc(256 << 10)
    ctypes.memset(block, 0x5A, 256 << 10)
    grown = libc.realloc(block, 1 << 20)
    if grown is None or ctypes.string_at(grown + (256 << 10) - 1, 1) != b"\x5a":
        raise OSError(errno.ENOMEM, "realloc failed")
    return 1 << 20


PROBES: dict[str, Callable[[dict[str, int]], object]] = {
    "mmap_read_write": lambda ctx: len(mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)),
    "madvise_dontneed": lambda ctx: _madvise(mmap.MADV_DONTNEED),
    "futex_wake_private": lambda ctx: _futex(ctx["FUTEX_WAKE_PRIVATE"]),
    "clock_gettime_syscall": lambda ctx: _syscall(
        "clock_gettime", time.CLOCK_MONOTONIC, ctypes.create_string_buffer(16)
    ),
    "getpid": lambda ctx: os.getpid(),
    "realloc_mmapped": lambda ctx: _realloc_mmapped(),
    "mremap_maymove": lambda ctx: _mremap(MREMAP_MAYMOVE),
    "mremap_fixed": lambda ctx: _mremap(MREMAP_MAYMOVE | MREMAP_FIXED),
    "poll_nothing": lambda ctx: _syscall("poll", None, 0, 0),
    # what a ZeroMQ thread does when it starts (it may start after the filter is loaded)
    "sigmask_block_nothing": lambda ctx: signal.pthread_sigmask(signal.SIG_BLOCK, []),
    "sched_getscheduler": lambda ctx: os.sched_getscheduler(0),
    "sched_setscheduler_other": lambda ctx: os.sched_setscheduler(
        0, os.SCHED_OTHER, os.sched_param(0)
    ),
    "prctl_set_name": lambda ctx: _check(_libc().prctl(ctx["PR_SET_NAME"], b"probe", 0, 0, 0)),
    # forbidden forms of allowed calls
    "sched_setscheduler_fifo": lambda ctx: os.sched_setscheduler(
        0, os.SCHED_FIFO, os.sched_param(1)
    ),
    "prctl_set_dumpable": lambda ctx: _check(_libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)),
    "madvise_free": lambda ctx: _madvise(mmap.MADV_FREE),
    "mmap_shared_anonymous": lambda ctx: len(mmap.mmap(-1, 1 << 20)),
    "futex_requeue": lambda ctx: _futex(FUTEX_REQUEUE_PRIVATE),
    "getppid": lambda ctx: os.getppid(),
}


def run_probe(name: str, ctx: dict[str, int], fds: dict[str, int]) -> dict[str, object]:
    """The hook for PROBES: like run_attempt."""
    return _report(lambda: PROBES[name](ctx))


def run_attempt(name: str, ctx: dict[str, int], fds: dict[str, int]) -> dict[str, object]:
    """The hook: {"outcome": "ENOENT"...} when the attempt failed, "succeeded" when it did not."""
    return _report(lambda: {**ATTEMPTS, **SMALL_DISK_ATTEMPTS}[name](fds, ctx))


def _report(call: Callable[[], object]) -> dict[str, object]:
    try:
        got = call()
    except OSError as e:
        return {"outcome": errno.errorcode.get(e.errno or 0, str(e.errno)), "detail": str(e)}
    return {"outcome": "succeeded", "detail": repr(got)[:200]}
