"""cffi builder (API, out-of-line) for the process-confinement syscalls of the sandbox.

One section per header (INCLUDES/TYPES/FUNCTIONS, combined below, as cryptography
does): namespaces and mounts (<sched.h>, <sys/mount.h>), capabilities and
securebits (<linux/capability.h>, <linux/securebits.h>), prctl, Landlock
(<linux/landlock.h>) and seccomp user notification (<linux/seccomp.h>, read by
`splitvmm policy audit`), fallocate(2) with a mode (<linux/falloc.h>), open file
description locks (<fcntl.h>: a disk image's lock as QEMU takes it), the TUN/TAP driver's
ioctls (<linux/if_tun.h>: the monitor opens a virtio-net device's TAP, the device sets its
offloads), and Linux's native AIO (<linux/aio_abi.h>: a virtio-blk device's requests on an
O_DIRECT image), and the one mmap(2) flag Python's mmap module lacks (<sys/mman.h>: a
device's policy refuses stack mappings). Every constant, struct layout and syscall number
comes from the headers; syscalls that glibc does not wrap (pivot_root, capset,
capget, landlock_*, pidfd_getfd) get a fixed-signature C wrapper so nobody calls the
variadic syscall(2) from Python.
"""

from __future__ import annotations

from cffi import FFI

# -- <sched.h>, <sys/mount.h>, <unistd.h>: namespaces and the empty root ---------------------
NS_INCLUDES = "#include <sched.h>\n#include <sys/mount.h>\n#include <sys/syscall.h>\n"
NS_TYPES = "".join(
    f"static const unsigned long {name};\n"
    for name in """
    CLONE_NEWUSER CLONE_NEWNS CLONE_NEWNET CLONE_NEWIPC CLONE_NEWUTS CLONE_NEWPID CLONE_THREAD
    MS_RDONLY MS_NOSUID MS_NODEV MS_NOEXEC MS_REMOUNT MS_BIND MS_REC MS_PRIVATE
    MNT_DETACH FSOPEN_CLOEXEC FSCONFIG_SET_STRING FSCONFIG_CMD_CREATE FSMOUNT_CLOEXEC
    MOUNT_ATTR_NOSUID MOUNT_ATTR_NODEV MOUNT_ATTR_NOEXEC MOVE_MOUNT_F_EMPTY_PATH
    MOVE_MOUNT_T_EMPTY_PATH
    """.split()
)
NS_FUNCTIONS = """
int unshare(int flags);
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int sv_pivot_root(const char *new_root, const char *put_old);
int sv_fsopen(const char *fs, unsigned int flags);
int sv_fsconfig(int fd, unsigned int cmd, const char *key, const char *value, int aux);
int sv_fsmount(int fd, unsigned int flags, unsigned int attrs);
int sv_move_mount(int from_fd, const char *from_path, int to_fd, const char *to_path,
                  unsigned int flags);
"""
NS_SOURCE = """
static int sv_pivot_root(const char *new_root, const char *put_old)
{ return (int)syscall(SYS_pivot_root, new_root, put_old); }
static int sv_fsopen(const char *fs, unsigned int flags)
{ return (int)syscall(SYS_fsopen, fs, flags); }
static int sv_fsconfig(int fd, unsigned int cmd, const char *key, const char *value, int aux)
{ return (int)syscall(SYS_fsconfig, fd, cmd, key, value, aux); }
static int sv_fsmount(int fd, unsigned int flags, unsigned int attrs)
{ return (int)syscall(SYS_fsmount, fd, flags, attrs); }
static int sv_move_mount(int from_fd, const char *from_path, int to_fd, const char *to_path,
                         unsigned int flags)
{ return (int)syscall(SYS_move_mount, from_fd, from_path, to_fd, to_path, flags); }
"""

# -- <linux/capability.h>, <linux/securebits.h>, <sys/prctl.h> ---------------------------------
CAPS_INCLUDES = (
    "#include <linux/capability.h>\n#include <linux/securebits.h>\n#include <sys/prctl.h>\n"
    "#include <sys/fsuid.h>\n"
)
CAPS_TYPES = """
typedef unsigned int __u32;
typedef struct __user_cap_header_struct { __u32 version; int pid; } *cap_user_header_t;
typedef struct __user_cap_data_struct { __u32 effective; __u32 permitted; __u32 inheritable; }
    *cap_user_data_t;
static const int _LINUX_CAPABILITY_VERSION_3;
static const int _LINUX_CAPABILITY_U32S_3;
""" + "".join(
    f"static const int {name};\n"
    for name in """
    PR_SET_NO_NEW_PRIVS PR_CAPBSET_DROP PR_CAPBSET_READ PR_CAP_AMBIENT PR_CAP_AMBIENT_CLEAR_ALL
    PR_SET_DUMPABLE PR_SET_SECUREBITS PR_GET_SECUREBITS PR_SET_PDEATHSIG PR_SET_NAME
    PR_SET_CHILD_SUBREAPER CAP_SETPCAP CAP_SETFCAP CAP_SYS_ADMIN CAP_SETUID
    CAP_SETGID CAP_KILL
    SECBIT_NOROOT SECBIT_NOROOT_LOCKED SECBIT_NO_SETUID_FIXUP SECBIT_NO_SETUID_FIXUP_LOCKED
    SECBIT_KEEP_CAPS_LOCKED SECBIT_NO_CAP_AMBIENT_RAISE SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
    """.split()
)
CAPS_FUNCTIONS = """
int sv_capget(cap_user_header_t header, cap_user_data_t data);
int sv_capset(cap_user_header_t header, cap_user_data_t data);
int sv_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
             unsigned long arg5);
int sv_setfsuid(unsigned int uid);
"""
CAPS_SOURCE = """
static int sv_capget(cap_user_header_t header, cap_user_data_t data)
{ return (int)syscall(SYS_capget, header, data); }
static int sv_capset(cap_user_header_t header, cap_user_data_t data)
{ return (int)syscall(SYS_capset, header, data); }
static int sv_prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
                    unsigned long arg5)
{ return prctl(option, arg2, arg3, arg4, arg5); }
static int sv_setfsuid(unsigned int uid)
{ return setfsuid(uid); }
"""

# -- <linux/landlock.h> -------------------------------------------------------------------------
LANDLOCK_INCLUDES = "#include <linux/landlock.h>\n"
# The access rights a kernel newer than the build host's header may know. The
# values are fixed kernel ABI (include/uapi/linux/landlock.h, ABI 3 and 5); the
# #ifndef keeps the header's own definition wherever it has one. Which of them
# the running kernel accepts is probed at run time (landlock.py), never assumed.
LANDLOCK_SOURCE = """
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif
#ifndef LANDLOCK_ACCESS_FS_IOCTL_DEV
#define LANDLOCK_ACCESS_FS_IOCTL_DEV (1ULL << 15)
#endif
static int sv_landlock_create_ruleset(const struct landlock_ruleset_attr *attr, size_t size,
                                      __u32 flags)
{ return (int)syscall(SYS_landlock_create_ruleset, attr, size, flags); }
static int sv_landlock_restrict_self(int ruleset_fd, __u32 flags)
{ return (int)syscall(SYS_landlock_restrict_self, ruleset_fd, flags); }
static int sv_landlock_add_rule(int ruleset_fd, int rule_type, const void *attr, __u32 flags)
{ return (int)syscall(SYS_landlock_add_rule, ruleset_fd, rule_type, attr, flags); }
"""
LANDLOCK_TYPES = """
typedef unsigned long long __u64;
struct landlock_ruleset_attr { __u64 handled_access_fs; ...; };
struct landlock_path_beneath_attr { __u64 allowed_access; int parent_fd; ...; };
static const int LANDLOCK_RULE_PATH_BENEATH;
""" + "".join(
    f"static const unsigned long long {name};\n"
    for name in """
    LANDLOCK_CREATE_RULESET_VERSION
    LANDLOCK_ACCESS_FS_EXECUTE LANDLOCK_ACCESS_FS_WRITE_FILE LANDLOCK_ACCESS_FS_READ_FILE
    LANDLOCK_ACCESS_FS_READ_DIR LANDLOCK_ACCESS_FS_REMOVE_DIR LANDLOCK_ACCESS_FS_REMOVE_FILE
    LANDLOCK_ACCESS_FS_MAKE_CHAR LANDLOCK_ACCESS_FS_MAKE_DIR LANDLOCK_ACCESS_FS_MAKE_REG
    LANDLOCK_ACCESS_FS_MAKE_SOCK LANDLOCK_ACCESS_FS_MAKE_FIFO LANDLOCK_ACCESS_FS_MAKE_BLOCK
    LANDLOCK_ACCESS_FS_MAKE_SYM LANDLOCK_ACCESS_FS_REFER LANDLOCK_ACCESS_FS_TRUNCATE
    LANDLOCK_ACCESS_FS_IOCTL_DEV
    """.split()
)
LANDLOCK_FUNCTIONS = """
int sv_landlock_create_ruleset(const struct landlock_ruleset_attr *attr, size_t size,
                               __u32 flags);
int sv_landlock_restrict_self(int ruleset_fd, __u32 flags);
int sv_landlock_add_rule(int ruleset_fd, int rule_type, const void *attr, __u32 flags);
"""

# -- <linux/seccomp.h>: user notification, read by the policy auditor ---------------------------
SECCOMP_INCLUDES = "#include <linux/seccomp.h>\n#include <sys/ioctl.h>\n"
SECCOMP_TYPES = """
typedef int __s32; typedef long long __s64;
struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; };
struct seccomp_notif { __u64 id; __u32 pid; __u32 flags; struct seccomp_data data; };
struct seccomp_notif_resp { __u64 id; __s64 val; __s32 error; __u32 flags; };
static const unsigned long SECCOMP_IOCTL_NOTIF_RECV;
static const unsigned long SECCOMP_IOCTL_NOTIF_SEND;
static const unsigned long SECCOMP_USER_NOTIF_FLAG_CONTINUE;
"""
SECCOMP_FUNCTIONS = """
int sv_ioctl_ptr(int fd, unsigned long request, void *arg);
int sv_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
"""
SECCOMP_SOURCE = """
static int sv_ioctl_ptr(int fd, unsigned long request, void *arg)
{ return ioctl(fd, request, arg); }
static int sv_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
{ return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, flags); }
"""

# -- <linux/futex.h>: the futex operations glibc's mutexes and condition variables use ----------
FUTEX_INCLUDES = "#include <linux/futex.h>\n"
FUTEX_TYPES = "".join(
    f"static const int {name};\n"
    for name in """
    FUTEX_WAIT_PRIVATE FUTEX_WAKE_PRIVATE FUTEX_WAIT_BITSET_PRIVATE FUTEX_WAKE_BITSET_PRIVATE
    FUTEX_CLOCK_REALTIME FUTEX_WAIT_BITSET FUTEX_WAKE
    """.split()
)

# -- <fcntl.h>, <linux/falloc.h>: a virtio-blk device's discard and write-zeroes ----------------
# (os.posix_fallocate takes no mode: punching a hole or zeroing a range needs fallocate(2)),
# and sync_file_range(2), which os lacks: a snapshot's RAM file starts to reach the disk as it
# is written (snapshot/writer.py), and a restarted virtio-blk device asks a disk image for a
# write-back error without starting any writes (devprocs/virtio_blk.py)
FALLOC_INCLUDES = "#include <fcntl.h>\n#include <linux/falloc.h>\n"
FALLOC_TYPES = "".join(
    f"static const int {name};\n"
    for name in """
    FALLOC_FL_KEEP_SIZE FALLOC_FL_PUNCH_HOLE FALLOC_FL_ZERO_RANGE SYNC_FILE_RANGE_WRITE
    SYNC_FILE_RANGE_WAIT_BEFORE
    """.split()
)
FALLOC_FUNCTIONS = """
int sv_fallocate(int fd, int mode, long long offset, long long len);
int sv_sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags);
"""
FALLOC_SOURCE = """
static int sv_fallocate(int fd, int mode, long long offset, long long len)
{ return fallocate(fd, mode, (off_t)offset, (off_t)len); }
static int sv_sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags)
{ return sync_file_range(fd, (off_t)offset, (off_t)nbytes, flags); }
"""

# -- <fcntl.h>: open file description locks on a disk image (the monitor's QEMU-style lock) ---
# fcntl(2) takes a struct flock, whose layout the header gives: the C wrappers fill it. l_pid
# stays 0, as F_OFD_* requires. sv_ofd_getlk gives the type of a lock another description
# holds in the way of `type` on the range (F_UNLCK where none is), -1 with errno on error.
OFD_INCLUDES = "#include <fcntl.h>\n"
OFD_FUNCTIONS = """
int sv_ofd_setlk(int fd, int type, long long start, long long len);
int sv_ofd_getlk(int fd, int type, long long start, long long len);
"""
OFD_SOURCE = """
static int sv_ofd_setlk(int fd, int type, long long start, long long len)
{
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
    return fcntl(fd, F_OFD_SETLK, &fl);
}
static int sv_ofd_getlk(int fd, int type, long long start, long long len)
{
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
    return fcntl(fd, F_OFD_GETLK, &fl) < 0 ? -1 : fl.l_type;
}
"""

# -- <linux/if.h>, <linux/if_tun.h>: a virtio-net device's TAP -----------------------------------
# The monitor opens /dev/net/tun and attaches it to a TAP by name (TUNSETIFF takes a struct
# ifreq, whose ifr_name/ifr_flags are macros cffi cannot reach: a C wrapper fills it); the
# device changes only its offloads (TUNSETOFFLOAD, an integer argument).
TUN_INCLUDES = "#include <string.h>\n#include <sys/ioctl.h>\n#include <linux/if.h>\n#include <linux/if_tun.h>\n"
TUN_TYPES = "".join(
    f"static const unsigned long {name};\n"
    for name in "TUNSETIFF TUNGETIFF TUNSETVNETHDRSZ TUNGETVNETHDRSZ TUNSETOFFLOAD".split()
) + "".join(
    f"static const int {name};\n"
    for name in """
        IFNAMSIZ IFF_TAP IFF_NO_PI IFF_VNET_HDR TUN_F_CSUM TUN_F_TSO4 TUN_F_TSO6 TUN_F_TSO_ECN
        """.split()
)
TUN_FUNCTIONS = """
int sv_tun_set_iff(int fd, const char *name, int flags, char *attached);
"""
TUN_SOURCE = """
static int sv_tun_set_iff(int fd, const char *name, int flags, char *attached)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = (short)flags;
    int r = ioctl(fd, TUNSETIFF, &ifr);
    if (r == 0)
        memcpy(attached, ifr.ifr_name, IFNAMSIZ);
    return r;
}
"""

# -- <linux/aio_abi.h>: a virtio-blk device's requests on an O_DIRECT image, in flight at once --
# Linux's native AIO (QEMU's aio=native): a request on an O_DIRECT fd is queued to the disk by
# io_submit and completes later, so the guest's requests reach the disk together, where one
# preadv at a time would wait out each. glibc wraps none of the calls.
AIO_INCLUDES = "#include <sys/uio.h>\n#include <linux/aio_abi.h>\n#include <time.h>\n"
AIO_TYPES = """
typedef unsigned short __u16;
typedef unsigned long aio_context_t;
struct iovec { void *iov_base; size_t iov_len; };
struct iocb {
    __u64 aio_data; __u16 aio_lio_opcode; __u32 aio_fildes; __u64 aio_buf; __u64 aio_nbytes;
    long long aio_offset; __u32 aio_flags; __u32 aio_resfd; ...;
};
struct io_event { __u64 data; __u64 obj; long long res; long long res2; };
static const int IOCB_CMD_PREADV;
static const int IOCB_CMD_PWRITEV;
"""
AIO_FUNCTIONS = """
int sv_io_setup(unsigned int nr_events, aio_context_t *ctx);
int sv_io_submit(aio_context_t ctx, long nr, struct iocb **iocbs);
int sv_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event *events,
                    long long timeout_ns);
"""
AIO_SOURCE = """
static int sv_io_setup(unsigned int nr_events, aio_context_t *ctx)
{ return (int)syscall(SYS_io_setup, nr_events, ctx); }
static int sv_io_submit(aio_context_t ctx, long nr, struct iocb **iocbs)
{ return (int)syscall(SYS_io_submit, ctx, nr, iocbs); }
static int sv_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event *events,
                           long long timeout_ns)
{
    struct timespec limit = { timeout_ns / 1000000000, timeout_ns % 1000000000 };
    return (int)syscall(SYS_io_getevents, ctx, min_nr, nr, events,
                        timeout_ns < 0 ? NULL : &limit);
}
"""

# -- <sys/mman.h>: a mapping that grows down as a stack does, which RLIMIT_DATA does not count --
MMAN_INCLUDES = "#include <sys/mman.h>\n"
MMAN_TYPES = "static const int MAP_GROWSDOWN;\n"

SECTIONS = (
    (NS_INCLUDES, NS_TYPES + NS_FUNCTIONS, NS_SOURCE),
    (CAPS_INCLUDES, CAPS_TYPES + CAPS_FUNCTIONS, CAPS_SOURCE),
    (LANDLOCK_INCLUDES, LANDLOCK_TYPES + LANDLOCK_FUNCTIONS, LANDLOCK_SOURCE),
    (SECCOMP_INCLUDES, SECCOMP_TYPES + SECCOMP_FUNCTIONS, SECCOMP_SOURCE),
    (FUTEX_INCLUDES, FUTEX_TYPES, ""),
    (FALLOC_INCLUDES, FALLOC_TYPES + FALLOC_FUNCTIONS, FALLOC_SOURCE),
    (OFD_INCLUDES, OFD_FUNCTIONS, OFD_SOURCE),
    (TUN_INCLUDES, TUN_TYPES + TUN_FUNCTIONS, TUN_SOURCE),
    (AIO_INCLUDES, AIO_TYPES + AIO_FUNCTIONS, AIO_SOURCE),
    (MMAN_INCLUDES, MMAN_TYPES, ""),
)

ffibuilder = FFI()
ffibuilder.cdef("".join(cdef for _, cdef, _ in SECTIONS))
# pyconfig.h (included first by cffi) already defines _GNU_SOURCE, which <sched.h> needs.
ffibuilder.set_source(
    "splitvmm.native._sys",
    "#include <stddef.h>\n#include <unistd.h>\n"
    + "".join(inc for inc, _, _ in SECTIONS)
    + "".join(src for _, _, src in SECTIONS),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
