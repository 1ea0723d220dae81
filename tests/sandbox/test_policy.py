"""The policy parser and compiler (sandbox/policy.py): no subprocess, no sandbox."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitvmm.native.seccomp import pyseccomp as seccomp
from splitvmm.protocol.models import MODELS
from splitvmm.sandbox import policy
from splitvmm.sandbox.policy import Cmp, PolicyError, Rule

ALL_ONES = (1 << 64) - 1


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parse_rule_when_1_allows_unconditionally() -> None:
    assert policy.parse_rule("read: 1", "f:1") == Rule("read", "f:1")


def test_parse_rule_when_return_gives_the_errno() -> None:
    assert policy.parse_rule("openat: return ENOENT", "f:1").errno == errno.ENOENT


def test_parse_rule_when_or_of_equalities_gives_each_comparison() -> None:
    rule = policy.parse_rule("fcntl: arg1 == F_GETFL || arg1 == 4", "f:1")

    assert rule.any_of == ((Cmp(1, ALL_ONES, policy.CONSTANTS["F_GETFL"]),), (Cmp(1, ALL_ONES, 4),))


def test_parse_rule_when_and_of_comparisons_gives_one_conjunction_per_alternative() -> None:
    rule = policy.parse_rule("sendto: arg3 & MSG_OOB == 0 && arg4 == 0 || arg0 == 7", "f:1")

    oob = policy.CONSTANTS["MSG_OOB"]
    assert rule.any_of == ((Cmp(3, oob, 0), Cmp(4, ALL_ONES, 0)), (Cmp(0, ALL_ONES, 7),))


def test_parse_rule_when_masked_gives_mask_and_value() -> None:
    rule = policy.parse_rule("mmap: arg2 & PROT_EXEC|PROT_WRITE == 0", "f:1")

    assert rule.any_of == ((Cmp(2, mmap.PROT_EXEC | mmap.PROT_WRITE, 0),),)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("read", "expected `syscall: 1`"),
        ("not_a_syscall: 1", "not a x86_64 system call"),
        ("socketcall: 1", "not a x86_64 system call"),
        ("openat: return ENOTANERRNO", "unknown errno"),
        ("ioctl: arg1 == KVM_RUN", "unknown constant 'KVM_RUN'"),
        ("ioctl: arg7 == 1", "expected `argN == VALUE`"),
        ("ioctl: arg1 > 1", "expected `argN == VALUE`"),
        ("mmap: arg2 & 4 == 5", "can never hold"),
        ("mmap: arg2 == 0x10000000000000000", "does not fit in 64 bits"),
        ("sendto: arg3 == 0 && arg3 == 1", "compares one argument twice"),
        ("sendto: arg3 == 0 &&", "expected `argN == VALUE`"),
        # C reads 010 as 8, Python's int() refuses it: it raised ValueError, no file or line
        ("madvise: arg2 == 04", "has a leading zero"),
        ("mmap: arg2 & 04 == 0", "has a leading zero"),
        ("fcntl: arg1 == 010", "has a leading zero"),
        # int() refuses a decimal of over 4300 digits: ValueError, no file or line either
        ("mmap: arg2 == 1" + "0" * 5000, "does not fit in 64 bits"),
    ],
)
def test_parse_rule_when_malformed_names_file_and_line(line: str, message: str) -> None:
    with pytest.raises(PolicyError, match=r"^f\.policy:7: ") as info:
        policy.parse_rule(line, "f.policy:7")

    assert message in str(info.value)


def test_parse_file_when_including_merges_rules_in_order(tmp_path: Path) -> None:
    _file(tmp_path, "common_device.policy", "read: 1\nwrite: 1  # why\n")
    top = _file(
        tmp_path, "x_device.policy", "# top\n@include common_device.policy\nwrite: return EPERM\n"
    )

    parsed = policy.parse_file(top)

    assert sorted(parsed.rules) == ["read", "write"]
    assert parsed.rules["write"] == Rule("write", f"{top}:3", errno=errno.EPERM)


def test_parse_file_when_a_rule_repeats_in_one_file_fails_at_the_repeat(tmp_path: Path) -> None:
    path = _file(tmp_path, "x.policy", "read: 1\n\nread: 1\n")

    with pytest.raises(PolicyError, match=rf"^{path}:3: read is already defined"):
        policy.parse_file(path)


def test_parse_file_when_include_is_missing_names_the_including_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "x.policy", "@include nowhere.policy\n")

    with pytest.raises(PolicyError, match=rf"^{path}:1: cannot read .*nowhere.policy"):
        policy.parse_file(path)


def test_parse_file_not_utf8_is_a_policy_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "x.policy"
    path.write_bytes(b"read: 1\n\xff\xfe\n")

    with pytest.raises(PolicyError, match=rf"^{path}: {path} is not UTF-8 text"):
        policy.parse_file(path)


def test_parse_file_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "x.policy"
    os.mkfifo(path)

    with pytest.raises(PolicyError, match=rf"^{path}: {path} is not a regular file"):
        policy.parse_file(path)


def test_parse_file_when_include_leaves_the_directory_fails(tmp_path: Path) -> None:
    path = _file(tmp_path, "x.policy", "@include ../etc/x.policy\n")

    with pytest.raises(PolicyError, match=rf"^{path}:1: expected `@include NAME.policy`"):
        policy.parse_file(path)


def test_parse_file_when_includes_cycle_fails(tmp_path: Path) -> None:
    _file(tmp_path, "a.policy", "@include b.policy\n")
    _file(tmp_path, "b.policy", "@include a.policy\n")

    with pytest.raises(PolicyError, match="@include cycle through a.policy"):
        policy.parse_file(tmp_path / "a.policy")


def test_parse_file_when_given_run_time_constants_uses_them(tmp_path: Path) -> None:
    path = _file(tmp_path, "w.policy", "kill: arg0 == SELF_PID\n")

    parsed = policy.parse_file(path, {**policy.CONSTANTS, "SELF_PID": 42})

    assert parsed.rules["kill"].any_of == ((Cmp(0, ALL_ONES, 42),),)


def test_compile_filter_when_policy_parses_exports_bpf(tmp_path: Path) -> None:
    path = _file(
        tmp_path, "x.policy", "read: 1\nmmap: arg2 & PROT_EXEC == 0\nopenat: return ENOENT\n"
    )
    out = tmp_path / "filter.bpf"

    with out.open("wb") as f:
        policy.compile_filter(policy.parse_file(path)).export_bpf(f)

    assert out.stat().st_size > 0 and out.stat().st_size % 8 == 0  # struct sock_filter[]


def test_parse_file_takes_a_str_path_as_well(tmp_path: Path) -> None:
    _file(tmp_path, "common.policy", "read: 1\n")
    top = _file(tmp_path, "x.policy", "@include common.policy\nwrite: 1\n")

    parsed = policy.parse_file(str(top))

    assert parsed.files == [str(top), str(tmp_path / "common.policy")]
    assert parsed.rules["read"].where == f"{tmp_path / 'common.policy'}:1"


def test_warden_policy_names_the_given_pid_as_self_pid() -> None:
    parsed = policy.load_warden_policy(4242)

    assert parsed.rules["kill"].any_of == ((Cmp(0, ALL_ONES, 4242),),)
    assert parsed.files[0] == f"{policy.default_policy_dir()}/warden.policy"


def test_policy_dir_is_the_checkouts_unless_the_environment_names_one(monkeypatch) -> None:
    checkout = Path(__file__).resolve().parents[2]
    monkeypatch.delenv("SPLITVMM_POLICY_DIR", raising=False)
    assert policy.default_policy_dir() == str(checkout / "policies" / policy.ARCH)
    monkeypatch.setenv("SPLITVMM_POLICY_DIR", "/elsewhere")
    assert policy.default_policy_dir() == "/elsewhere"


def test_compile_filter_defaults_to_kill_process_and_tsync() -> None:
    filt = policy.compile_filter(policy.Policy({}, []))

    assert filt.get_attr(seccomp.Attr.ACT_DEFAULT) == seccomp.KILL_PROCESS
    assert filt.get_attr(seccomp.Attr.CTL_TSYNC) == 1
    # A syscall of another ABI (i386's int 0x80, x32) kills the process too, not the thread
    assert filt.get_attr(seccomp.Attr.ACT_BADARCH) == seccomp.KILL_PROCESS


# The one ioctl a device may make: virtio-net sets its TAP's offloads when the guest's
# features are accepted (the request number means nothing to any other fd it holds).
DEVICE_IOCTLS = {"virtio-net": ((Cmp(1, (1 << 64) - 1, policy.CONSTANTS["TUNSETOFFLOAD"]),),)}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_shipped_device_policies_hold_no_ioctl_and_no_successful_open(model: str) -> None:
    parsed = policy.load_model_policy(model)

    ioctl = parsed.rules.get("ioctl")
    assert (ioctl.any_of if ioctl else None) == DEVICE_IOCTLS.get(model)
    assert parsed.rules["openat"].errno == errno.ENOENT
    assert parsed.rules["open"].errno == errno.ENOENT
    assert {"socket", "connect", "execve", "clone", "clone3", "fork"}.isdisjoint(parsed.rules)


# Never allowed to a device, in any form: each reaches past the fds it holds (a socket, a
# process, another process, a namespace), makes memory its rlimits do not count or code the
# filter cannot see, or undoes an argument rule of common_device.policy (sendmsg and recvmsg
# take the address and MSG_OOB that sendto's and recvfrom's rules refuse; personality's
# READ_IMPLIES_EXEC makes every readable mapping executable, past mmap's PROT_EXEC rule). Most
# of them fail beneath seccomp too (the PID namespace, no capabilities), which is why the
# escape attempts alone would not notice one let through; a `return ERRNO` rule is fine.
NEVER_ALLOWED_TO_A_DEVICE = frozenset(
    """socket socketpair connect bind listen accept accept4 sendmsg recvmsg sendmmsg recvmmsg
    execve execveat clone clone3 fork vfork ptrace process_vm_readv process_vm_writev kill tkill
    tgkill rt_sigqueueinfo rt_tgsigqueueinfo pidfd_open pidfd_getfd pidfd_send_signal unshare
    setns mount pivot_root fsopen fsconfig fsmount fspick move_mount open_tree mount_setattr
    open_by_handle_at memfd_create userfaultfd io_uring_setup io_setup bpf perf_event_open
    keyctl add_key request_key personality prctl seccomp""".split()
)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_shipped_device_policies_allow_nothing_that_reaches_out(model: str) -> None:
    parsed = policy.load_model_policy(model)

    allowed = {name for name, rule in parsed.rules.items() if not rule.errno}

    assert sorted(allowed & NEVER_ALLOWED_TO_A_DEVICE) == []


def _device_under_its_own_filter(tmp_path, model, serve, frames=(), setup=lambda: None):
    """Fork a "device" that calls setup(), connects its channel (devprocs/channel.py) to a
    libzmq PAIR socket (the monitor's end here, as `policy audit`'s), says "connected", waits
    for "go", loads `model`'s seccomp filter and calls serve(channel), then exits 0. The
    monitor's end sends "go" and `frames`, and collects what the device sends until it ends:
    (messages, how it ended: an exit status or the killing signal)."""
    import signal
    import time

    import zmq

    from splitvmm.devprocs.channel import Channel
    from splitvmm.native import confine
    from splitvmm.protocol import control

    endpoint = f"ipc://{tmp_path}/device.sock"
    filt = policy.compile_filter(policy.load_model_policy(model))
    ctx = zmq.Context()
    monitor = ctx.socket(zmq.PAIR)
    monitor.bind(endpoint)  # before the fork: the device connects at once
    pid = os.fork()
    if pid == 0:  # the device: connected, then sandboxed (no ZeroMQ of its own)
        try:
            setup()
            sock = Channel.connect(endpoint, control.MAX_CONTROL, timeout_s=10)
            sock.send(b"connected")
            sock.recv()  # the monitor's go
            confine.set_no_new_privs()
            filt.load()
            serve(sock)
            os._exit(0)
        finally:
            os._exit(99)
    ended, said = (0, 0), []
    try:
        if monitor.poll(10_000):
            said.append(monitor.recv())
        for frame in (b"go", *frames):
            monitor.send(frame)
        deadline = time.monotonic() + 10
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            while monitor.poll(10):
                said.append(monitor.recv())
    finally:
        if ended[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        while monitor.poll(0):
            said.append(monitor.recv())
        monitor.close(linger=0)
        ctx.term()
    assert ended[0] == pid, "the device did not end within 10 s"
    status = ended[1]
    return said, (
        os.WEXITSTATUS(status) if os.WIFEXITED(status) else signal.Signals(os.WTERMSIG(status))
    )


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_device_that_refuses_to_start_exits_2_under_its_own_filter(tmp_path, model) -> None:
    """runtime._refuse inside the device's seccomp filter: its words reach the monitor and
    the process exits 2."""
    from splitvmm.devprocs import runtime

    def refuse(sock) -> None:
        runtime.REFUSAL_WAIT_MS = 200  # nobody ends us here, as a monitor would
        runtime._refuse(sock, "options rejected: a test")

    said, ended = _device_under_its_own_filter(tmp_path, model, refuse)

    assert said[0] == b"connected"
    assert b"options rejected: a test" in said[1]  # its first words after connecting
    assert ended == 2


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_device_takes_the_largest_frame_its_channel_accepts_under_its_own_filter(
    tmp_path, model
) -> None:
    """The channel's reader grows its buffer as a frame comes (protocol/zmtp.py); past
    glibc's mmap threshold that growth tries an mremap, which the filter once killed
    (SIGSYS) for a frame over ~200 KiB, and now refuses (glibc copies instead). The
    threshold is set to glibc's starting 128 KiB: earlier frees in this process would raise
    it, and a device's history is not the test's. Whether the block is mmapped still depends
    on the forked heap: the realloc_mmapped probe (test_probes.py) is the exact check."""
    import ctypes

    from splitvmm.protocol import control

    def take_one(sock) -> None:
        frame = sock.recv()
        sock.send(b"got %d" % len(frame))
        sock.flush()

    libc = ctypes.CDLL(None)
    said, ended = _device_under_its_own_filter(
        tmp_path,
        model,
        take_one,
        frames=(b"\x10" + b" " * (control.MAX_CONTROL - 1),),
        setup=lambda: libc.mallopt(-3, 128 << 10),  # M_MMAP_THRESHOLD
    )

    assert (said, ended) == ([b"connected", b"got %d" % control.MAX_CONTROL], 0)


@pytest.mark.parametrize(
    ("flag", "ended"),
    [("SYNC_FILE_RANGE_WAIT_BEFORE", 0), ("SYNC_FILE_RANGE_WRITE", signal.SIGSYS)],
    ids=["wait for writes under way", "start writes"],
)
def test_virtio_blk_filter_lets_a_restarted_device_ask_its_disk_errors_only(
    tmp_path, flag: str, ended: object
) -> None:
    """A restarted virtio-blk process asks its disk-errors fd for a failed write-back with
    sync_file_range(SYNC_FILE_RANGE_WAIT_BEFORE) (devprocs/virtio_blk.py): allowed; the
    call's other uses start writes, which a device has no need of."""
    from splitvmm.native import files

    image = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(image, b"\x01" * 4096)

    def ask(sock) -> None:
        files.lib.sv_sync_file_range(image, 0, 0, getattr(files, flag))
        sock.send(b"asked")
        sock.flush()

    try:
        said, how = _device_under_its_own_filter(tmp_path, "virtio-blk", ask)
    finally:
        os.close(image)

    assert (said, how) == ([b"connected", b"asked"] if ended == 0 else [b"connected"], ended)


# A process under the monitor's own filter (monitor.policy, as Confinement compiles it), with
# a connected UNIX stream pair made beforehand, as the monitor's channels and control clients
# are; it runs `statement` and exits 5.
UNDER_MONITOR_FILTER = """
import ctypes, fcntl, mmap, os, socket, sys
from splitvmm.monitor.confinement import MONITOR_POLICY, policy_constants
from splitvmm.native.kvm import IOCTL_NUMBERS
libc = ctypes.CDLL(None)
from splitvmm.native import confine
from splitvmm.sandbox import policy
ours, theirs = socket.socketpair()
rules = policy.parse_file(policy.policy_file(MONITOR_POLICY), policy_constants(ours.fileno()))
filt = policy.compile_filter(rules)
confine.set_no_new_privs()
filt.load()
exec(sys.argv[1])
os._exit(5)
"""


def _under_monitor_filter(statement: str) -> int:
    argv = [sys.executable, "-c", UNDER_MONITOR_FILTER, statement]
    return subprocess.run(
        argv, cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=30
    ).returncode


def test_monitor_filter_control_plain_send_and_receive_are_allowed() -> None:
    assert _under_monitor_filter("ours.send(b'x'); theirs.recv(1)") == 5


def test_monitor_filter_lets_the_running_monitor_turn_pit_reinjection_off() -> None:
    """Done once the vCPUs run (monitor/machine.py _pit_reinject_off), under this filter: on
    a socket the ioctl fails (ENOTTY) instead of killing the process."""
    statement = (
        "try:\n"
        "    fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_REINJECT_CONTROL'], bytes(16))\n"
        "except OSError:\n"
        "    pass"
    )
    assert _under_monitor_filter(statement) == 5


@pytest.mark.parametrize(
    ("flags", "status"),
    [("files.SYNC_FILE_RANGE_WRITE", 5), ("files.SYNC_FILE_RANGE_WRITE | 4", -signal.SIGSYS)],
    ids=["start the writes", "and wait for them"],
)
def test_monitor_filter_lets_a_suspend_start_its_ram_files_writeback_only(
    flags: str, status: int
) -> None:
    """A suspend's RAM file is written back as it is written (snapshot/writer.py), through
    sync_file_range(SYNC_FILE_RANGE_WRITE); what waits for the disk stays fsync's. (On a
    socket the call fails, ESPIPE, instead of killing the process.)"""
    statement = (
        "from splitvmm.native import files\n"
        f"files.lib.sv_sync_file_range(ours.fileno(), 0, 0, {flags})"
    )
    assert _under_monitor_filter(statement) == status


@pytest.mark.parametrize(
    "statement",
    ["ours.send(b'!', socket.MSG_OOB)", "theirs.send(b'!'); ours.recv(1, socket.MSG_OOB)"],
)
def test_monitor_filter_refuses_out_of_band_data_as_a_devices_does(statement: str) -> None:
    """AF_UNIX MSG_OOB is the kernel code a sandbox escape went through (CVE-2025-38236:
    common_device.policy); the monitor never uses it either."""
    assert _under_monitor_filter(statement) == -signal.SIGSYS


def test_monitor_filter_launcher_socket_alone_carries_fds() -> None:
    assert _under_monitor_filter("ours.sendmsg([b'x']); theirs.recv(1)") == 5


@pytest.mark.parametrize(
    "statement",
    [
        "theirs.sendmsg([b'x'])",  # fds to a control client
        "ours.send(b'x'); theirs.recvmsg(1)",  # or from one
        "os.fork()",  # clone without CLONE_THREAD
        "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
        "m = mmap.mmap(-1, 4096); "
        "libc.mprotect(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(m))), 4096, 5)",
        "libc.syscall(234, 1, 1, 0)",  # tgkill of another process's thread (signal 0)
        "os.kill(1, 0)",
        "libc.ptrace(3, 1, 0, 0)",  # PTRACE_PEEKUSER
        "libc.prctl(4, 1, 0, 0, 0)",  # PR_SET_DUMPABLE: ptrace by the same user again
        "ours.connect(b'\\0splitvmm-test')",
        "os.memfd_create('x')",
        "os.sched_getaffinity(1)",
        "fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_SET_USER_MEMORY_REGION'], bytes(32))",
        "fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_SET_REGS'], bytes(144))",
        "fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_CREATE_VCPU'], 0)",
        "fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_IRQFD'], bytes(32))",
        "fcntl.ioctl(ours.fileno(), IOCTL_NUMBERS['KVM_SIGNAL_MSI'], bytes(32))",
    ],
    ids=[
        "sendmsg-elsewhere",
        "recvmsg-elsewhere",
        "fork",
        "mmap-exec",
        "mprotect-exec",
        "tgkill-elsewhere",
        "kill",
        "ptrace",
        "prctl",
        "connect",
        "memfd_create",
        "sched_getaffinity-elsewhere",
        "set-user-memory-region",
        "set-regs",
        "create-vcpu",
        "irqfd",
        "signal-msi",
    ],  # fmt: skip
)
def test_monitor_filter_kills_what_the_running_monitor_never_does(statement: str) -> None:
    """monitor.policy's header: no socket, exec, mount, ptrace or new process; fds only
    to and from the launcher; no executable memory; signals only to its own threads; no
    VM or memory-slot set-up once the VM is built."""
    assert _under_monitor_filter(statement) == -signal.SIGSYS


def test_monitor_filter_clone3_fails_with_enosys_for_glibc_to_fall_back_on_clone() -> None:
    """clone3's flags sit in memory, out of seccomp's sight: refused, so that glibc's
    threads come through clone, whose flags the filter checks."""
    statement = (
        "c = ctypes.CDLL(None, use_errno=True); "
        "os._exit(7 if c.syscall(435, 0, 0) == -1 and ctypes.get_errno() == 38 else 8)"
    )
    assert _under_monitor_filter(statement) == 7


def test_parse_file_when_includes_cycle_names_the_including_line(tmp_path: Path) -> None:
    (tmp_path / "a.policy").write_text("read: 1\n@include b.policy\n")
    (tmp_path / "b.policy").write_text("# b\n\n@include a.policy\n")

    with pytest.raises(policy.PolicyError, match=rf"^{tmp_path / 'b.policy'}:3: @include cycle"):
        policy.parse_file(tmp_path / "a.policy")


def test_parse_file_when_includes_nest_too_deep_fails_naming_the_line(tmp_path: Path) -> None:
    """A chain of distinct files, each including the next, is no cycle: 1000 of them raised
    RecursionError, a traceback from `policy check --dir`."""
    for i in range(1000):
        (tmp_path / f"p{i}.policy").write_text(f"@include p{i + 1}.policy\n")
    (tmp_path / "p1000.policy").write_text("read: 1\n")

    with pytest.raises(PolicyError, match=r"p\d+\.policy:1: @include nested more than"):
        policy.parse_file(tmp_path / "p0.policy")
