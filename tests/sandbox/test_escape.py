"""The escape suite: each attempt runs as a test hook inside a real sandboxed device, per model.

A forbidden syscall kills the process, which ends the hook, so every attempt
gets a fresh device. With the policy enforced, each must fail (an errno) or
kill (SIGSYS). Each attempt runs a second time with seccomp letting everything
through (its "trace" mode, every call allowed by a listener here), to test the
layers beneath it: namespaces, empty root, rlimits, capabilities, Landlock.
Those must stop every attempt on the host's files, the monitor, mounts and
namespaces, and the sealed or read-only fds; the others (a socket in an empty
network namespace, executable memory, a thread, the length of a device's log...)
have seccomp as their only barrier, which the table shows. An attempt on a file
attacks the model's own (escapes.HELD); a model that holds none is not given it. The
outcomes go into a table printed by the last test (pytest -s, or the file under
the session's tmp dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle  # type: ignore[import-untyped]
import pytest

from splitvmm import hostpath
from splitvmm.cli.policy import Trace, traced
from splitvmm.monitor.memory import SEALS
from splitvmm.native.kvm import IOCTL_NUMBERS
from splitvmm.protocol.dirtybits import dirty_log_size
from splitvmm.protocol.models import MODELS as DESCRIPTORS
from tests.sandbox import escapes
from tests.sandbox.harness import SandboxedDevice

pytestmark = pytest.mark.sandbox
# Every model with a descriptor runs the suite in its own sandbox: no hand-kept list.
MODELS = sorted(DESCRIPTORS)

# What the layers beneath seccomp must stop on their own (an errno, since nothing kills).
STOPPED_WITHOUT_SECCOMP = {
    "open_etc_passwd",
    "openat_etc_passwd",
    "read_proc_self_environ",
    "list_root",
    "creat_file",
    "mkdir_dir",
    "unlink_channel",
    "execve_shell",
    "ptrace_attach_monitor",
    "kill_monitor",
    "process_vm_readv_monitor",
    "mount_tmpfs",
    "unshare_userns",
    "setns_any",
    "ftruncate_sealed_memfd",
    "reopen_readonly_fd_for_writing",
    "write_past_end_of_disk",
    "allocate_past_address_space",
}

# A socket filter is the kernel's to refuse an unprivileged process (the sysctl), not the
# sandbox's: where the host allows it, only seccomp stops a device's BPF.
if Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip() != "0":
    STOPPED_WITHOUT_SECCOMP.add("bpf_prog_load")

# Outcomes of this session's attempts: (model, attempt, seccomp) -> outcome.
RESULTS: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _escapes_by_value() -> Iterator[None]:
    # The hook carries the attempt's code: the device never imports tests/.
    cloudpickle.register_pickle_by_value(escapes)
    yield
    cloudpickle.unregister_pickle_by_value(escapes)


@pytest.fixture
def handed_fds(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Extra fds the device holds: a read-only file, /dev/kvm where it exists, our network
    namespace, and sockets made here, outside its namespaces: an unbound datagram socket (a
    host abstract socket listens for it), an unconnected stream and UDP socket, one end of a
    stream pair with out-of-band data waiting. (No memfd: the attempts on files take the
    model's own, escapes.HELD.)"""
    victim_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    victim_socket.bind(escapes.HOST_ABSTRACT_SOCKET % os.getpid())
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stream, peer = socket.socketpair()
    peer.send(b"!", socket.MSG_OOB)
    victim = tmp_path / "readonly.txt"
    victim.write_bytes(b"original")
    fds = {"readonly": os.open(victim, os.O_RDONLY | os.O_CLOEXEC)}
    fds["netns"] = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fds["kvm"] = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        pass  # no KVM here: the ioctl attempt still sweeps fds 0..64
    sockets = {"dgram": dgram, "unix": unix, "inet": inet, "stream": stream}
    yield {**fds, **{name: sock.fileno() for name, sock in sockets.items()}}
    for fd in fds.values():
        os.close(fd)
    for sock in (victim_socket, *sockets.values(), peer):
        sock.close()
    assert victim.read_bytes() == b"original"


def attempt_context(sleeper: subprocess.Popen[bytes]) -> dict[str, int]:
    """What an attempt knows of the stand-in monitor: its pid, an address mapped in it."""
    with open(f"/proc/{sleeper.pid}/maps") as maps:
        first = int(maps.readline().split("-")[0], 16)
    return {
        "monitor_pid": sleeper.pid,
        "monitor_address": first,
        "suite_pid": os.getpid(),  # the host abstract socket's name (handed_fds)
        "KVM_GET_API_VERSION": IOCTL_NUMBERS["KVM_GET_API_VERSION"],
    }


def _outcome(dev: SandboxedDevice) -> str:
    result = dev.hook_result()
    if result is not None:
        return str(result.get("outcome", result))
    status = dev.wait_exit()
    return f"killed ({signal.Signals(-status).name})" if status < 0 else f"exited {status}"


# Attempts on the file-size limit: it binds a device whose stderr is no regular file (a
# terminal, a pipe, journald's socket: sandbox/device.py _file_size_limit), so these run with
# a pipe as stderr, the others with the harness's file.
STDERR_ON_A_PIPE = {"write_past_end_of_disk", "allocate_past_end_of_disk"}


def _holds(model: str, attempt: str) -> bool:
    """Whether `model` holds the fd that `attempt` attacks (escapes.HELD), if it attacks one."""
    role = escapes.HELD.get(attempt)
    return role is None or role in {r.name for r in DESCRIPTORS[model].fds}


# Every attempt on every model, but an attempt on a file the model does not hold (rtc has no
# output, only virtio-blk a disk): on a file the suite made instead, the kernel refused it
# with no sandbox at all, which proved nothing.
CASES = [(a, m) for a in sorted(escapes.ATTEMPTS) for m in MODELS if _holds(m, a)]


def _output_file(stack: contextlib.ExitStack) -> int:
    """A device's output named as a file, opened as the monitor opens one (O_APPEND): a log,
    which the harness's pipe (or a virtio stand-in's eventfd) is not."""
    logs = stack.enter_context(tempfile.TemporaryDirectory())
    fd = hostpath.open_host_file(os.path.join(logs, "out.log"), "output", hostpath.Access.APPEND)
    stack.callback(os.close, fd)
    os.write(fd, b"the operator's log\n")
    return fd


def _attempt(
    spawn: Callable[..., SandboxedDevice],
    model: str,
    attempt: str,
    ctx: dict[str, int],
    extra_fds: dict[str, int] | None = None,
    **kw: object,
) -> str:
    hook = functools.partial(escapes.run_attempt, attempt, ctx)
    role = escapes.HELD.get(attempt)
    fds = dict(extra_fds or {})
    with contextlib.ExitStack() as stack:
        if attempt in STDERR_ON_A_PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            stack.callback(os.close, r)
            stack.callback(os.close, w)
            kw["stderr_fd"] = w
        if role == "out":
            fds["out"] = _output_file(stack)
        dev = spawn(model=model, hook=hook, extra_fds=fds, **kw)
        if kw.get("seccomp") != "trace":
            return _outcome(dev)
        with traced(dev.proc.pid, Trace(), errnos={}):  # every syscall allowed
            return _outcome(dev)


@pytest.mark.parametrize(("attempt", "model"), CASES)
def test_sandbox_escape_attempt_fails_or_kills(
    attempt: str,
    model: str,
    spawn: Callable[..., SandboxedDevice],
    sleeper: subprocess.Popen[bytes],
    handed_fds: dict[str, int],
) -> None:
    ctx = attempt_context(sleeper)

    outcome = _attempt(spawn, model, attempt, ctx, extra_fds=handed_fds)
    RESULTS[model, attempt, "enforced"] = outcome

    assert outcome == "killed (SIGSYS)" or outcome.startswith("E"), outcome
    assert sleeper.poll() is None  # the stand-in monitor survived


@pytest.mark.parametrize(("attempt", "model"), CASES)
def test_sandbox_escape_attempt_without_seccomp_meets_the_other_layers(
    attempt: str,
    model: str,
    spawn: Callable[..., SandboxedDevice],
    sleeper: subprocess.Popen[bytes],
    handed_fds: dict[str, int],
) -> None:
    ctx = attempt_context(sleeper)

    outcome = _attempt(spawn, model, attempt, ctx, extra_fds=handed_fds, seccomp="trace")
    RESULTS[model, attempt, "without seccomp"] = outcome

    if attempt in STOPPED_WITHOUT_SECCOMP:
        assert outcome.startswith("E"), outcome
    assert sleeper.poll() is None


# A device run as another host user (config.py vm.device_uid): every attempt of every model,
# with seccomp enforced and without it. As that user the layers beneath seccomp must stop the
# same attempts (the file system's, the monitor's, the namespaces'), now from outside root.
NOBODY = (65534, 65534)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root starts a process as another user"
)


@needs_root
@pytest.mark.parametrize("seccomp", ["kill", "trace"])
@pytest.mark.parametrize(("attempt", "model"), CASES)
def test_sandbox_escape_attempt_as_another_user_fails_or_kills(
    attempt: str,
    model: str,
    seccomp: str,
    spawn: Callable[..., SandboxedDevice],
    sleeper: subprocess.Popen[bytes],
    handed_fds: dict[str, int],
) -> None:
    ctx = attempt_context(sleeper)

    outcome = _attempt(
        spawn, model, attempt, ctx, extra_fds=handed_fds, seccomp=seccomp, user=NOBODY
    )
    RESULTS[f"{model}/nobody", attempt, "enforced" if seccomp == "kill" else "without seccomp"] = (
        outcome
    )

    if seccomp == "kill":
        assert outcome == "killed (SIGSYS)" or outcome.startswith("E"), outcome
    elif attempt in STOPPED_WITHOUT_SECCOMP:
        assert outcome.startswith("E"), outcome
    assert sleeper.poll() is None


# Guest RAM larger than the 1 GiB the attempt allocates, as a VM's is: sparse, nothing touched.
LARGE_RAM = 2 << 30
VIRTIO_MODELS = sorted(m for m, d in DESCRIPTORS.items() if any(r.name == "ram" for r in d.fds))


SMALL_IMAGE = 512  # the least a virtio-blk image may be (protocol/models.py min_size)


@pytest.mark.parametrize("attempt", sorted(escapes.SMALL_DISK_ATTEMPTS))
def test_sandbox_virtio_blk_image_smaller_than_a_page_does_not_grow(
    attempt: str, spawn: Callable[..., SandboxedDevice], tmp_path: Path
) -> None:
    """The file-size limit is the disk image's size: no write makes it larger than the
    guest was told. It was the largest of the image and the progress page (a sealed memfd,
    a page long, which cannot grow anyway), so an image under a page could grow to one."""
    image = tmp_path / "small.img"
    image.write_bytes(bytes(SMALL_IMAGE))
    disk = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    r, w = os.pipe2(os.O_CLOEXEC)  # stderr a pipe: no writable file lifts the limit
    try:
        hook = functools.partial(escapes.run_attempt, attempt, {})
        dev = spawn(model="virtio-blk", hook=hook, extra_fds={"disk": disk}, stderr_fd=w)
        outcome = _outcome(dev)
    finally:
        for fd in (disk, r, w):
            os.close(fd)

    assert outcome in ("EFBIG", "killed (SIGKILL)", "killed (SIGSYS)"), outcome
    assert image.stat().st_size == SMALL_IMAGE


@pytest.mark.parametrize("model", VIRTIO_MODELS)
def test_sandbox_memory_of_a_device_is_bounded_without_its_guest_ram_mapping(
    model: str,
    spawn: Callable[..., SandboxedDevice],
    sleeper: subprocess.Popen[bytes],
    handed_fds: dict[str, int],
) -> None:
    """RLIMIT_AS includes the guest RAM a virtio device maps: a device that unmaps it must
    not get that much memory of its own (the host's, past what the guest was given)."""
    large = {}
    for role, size in (("ram", LARGE_RAM), ("dirty", dirty_log_size(LARGE_RAM))):
        large[role] = os.memfd_create(role, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(large[role], size)
        fcntl.fcntl(large[role], fcntl.F_ADD_SEALS, SEALS)
    try:
        ctx = {"monitor_pid": sleeper.pid}
        attempt = "allocate_in_place_of_guest_ram"
        outcome = _attempt(spawn, model, attempt, ctx, extra_fds={**handed_fds, **large})
    finally:
        for fd in large.values():
            os.close(fd)

    assert outcome == "killed (SIGSYS)" or outcome.startswith("E"), outcome


def test_sandbox_escape_summary_prints_table(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not RESULTS:
        pytest.skip("no escape attempt ran in this session")
    rows = sorted({(m, a) for m, a, _ in RESULTS})
    width = max(len(a) for _, a in rows)
    model_width = max(len("model"), *(len(m) for m, _ in rows))
    lines = [f"{'model':<{model_width}} {'attempt':<{width}}  {'enforced':<16} without seccomp"]
    for m, a in rows:
        enforced = RESULTS.get((m, a, "enforced"), "-")
        without = RESULTS.get((m, a, "without seccomp"), "-")
        lines.append(f"{m:<{model_width}} {a:<{width}}  {enforced:<16} {without}")
    table = "\n".join(lines)
    path = tmp_path_factory.getbasetemp() / "escape-table.txt"
    path.write_text(table + "\n")
    print(f"\n{table}\n(written to {path})")
    assert all(o != "succeeded" for (_, _, mode), o in RESULTS.items() if mode == "enforced")
