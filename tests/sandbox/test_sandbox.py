"""A running sandboxed device, seen from outside: /proc status, namespaces, its warden."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import struct
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from splitvmm.devprocs.runtime import RUNTIME_ADDRESS_SPACE
from splitvmm.devprocs.serial import Lsr, Reg
from splitvmm.native import confine
from splitvmm.sandbox import device as sandbox_device
from splitvmm.sandbox.device import MAX_STACK
from tests.sandbox import harness
from tests.sandbox.forked import in_a_child
from tests.sandbox.harness import SandboxedDevice

pytestmark = pytest.mark.sandbox
# A device is not dumpable (no core file with guest data): reading its fds, root and
# namespaces from /proc takes CAP_SYS_PTRACE over it, even for the same uid.
needs_ptrace_read = pytest.mark.skipif(
    os.geteuid() != 0, reason="reading a non-dumpable process's /proc/PID/{fd,ns,root} needs root"
)
NAMESPACES = ("user", "mnt", "net", "ipc", "uts", "pid")


def _status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    lines = Path(path).read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _confinement(status: dict[str, str]) -> tuple[str, ...]:
    keys = ("Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")
    return tuple(status[k] for k in keys)


CONFINED = ("2", "1") + ("0000000000000000",) * 5


def test_device_status_when_serving_is_seccomp_nnp_no_caps(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    tasks = [int(t) for t in os.listdir(f"/proc/{dev.device_pid()}/task")]

    assert tasks == [dev.device_pid()]  # one thread: its channel is read by it (channel.py)
    assert _confinement(_status(dev.device_pid(), tasks[0])) == CONFINED


@needs_ptrace_read
def test_device_namespaces_when_serving_differ_from_ours(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    theirs = {ns: os.readlink(f"/proc/{dev.device_pid()}/ns/{ns}") for ns in NAMESPACES}
    ours = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES}

    assert [ns for ns in NAMESPACES if theirs[ns] == ours[ns]] == []


def test_device_when_serving_is_pid_1_of_its_namespace(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    nspid = _status(dev.device_pid())["NSpid"].split()

    assert nspid[-1] == "1"


@needs_ptrace_read
def test_device_root_when_serving_is_empty_tmpfs(spawn: Callable[..., SandboxedDevice]) -> None:
    dev = spawn()
    dev.wait_ready()

    root = Path(f"/proc/{dev.device_pid()}/root")

    assert sorted(os.listdir(root)) == ["channel"]
    assert "ro" in Path(f"/proc/{dev.device_pid()}/mountinfo").read_text().split("\n")[0]


def _limits(pid: int) -> dict[str, list[str]]:
    text = Path(f"/proc/{pid}/limits").read_text()
    return {line[:26].strip(): line[26:].split()[:2] for line in text.splitlines()[1:]}


@needs_ptrace_read
def test_device_rlimits_when_serving_forbid_processes_fds_cores_files(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn(stderr_to_file=False)  # no writable regular file: stdio and out are not
    dev.wait_ready()

    limits = _limits(dev.device_pid())
    held = max(int(fd) for fd in os.listdir(f"/proc/{dev.device_pid()}/fd"))

    assert limits["Max processes"] == ["0", "0"]
    assert limits["Max open files"] == [str(held + 1)] * 2
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max file size"] == ["0", "0"]


@needs_ptrace_read
def test_device_stack_when_spawned_without_a_stack_limit_is_capped(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """`ulimit -s unlimited`: the stack, which RLIMIT_DATA does not count, would have no
    bound but RLIMIT_AS, and a device may unmap guest RAM to make room under that."""
    before = resource.getrlimit(resource.RLIMIT_STACK)
    resource.setrlimit(resource.RLIMIT_STACK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        dev = spawn()  # inherits ours
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, before)
    dev.wait_ready()

    assert _limits(dev.device_pid())["Max stack size"] == [str(MAX_STACK)] * 2


def test_device_rlimits_when_stderr_is_a_file_let_it_grow(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn(stderr_to_file=True)  # RLIMIT_FSIZE 0 would silence its error messages
    dev.wait_ready()

    assert _limits(dev.device_pid())["Max file size"] == ["unlimited"] * 2


# The device run under a hard limit of the operator's (`ulimit -f`, `ulimit -d`; systemd's
# LimitFSIZE=, LimitDATA=): argv[1] names it, argv[2] is its value.
UNDER_LIMIT = (
    "import resource, runpy, sys; "
    "limit = getattr(resource, sys.argv[1]); value = int(sys.argv[2]); "
    "resource.setrlimit(limit, (value, value)); "
    "sys.argv[1:] = []; runpy.run_module('splitvmm.devprocs', run_name='__main__')"
)


@pytest.mark.parametrize(
    ("limit", "value", "shown"),
    [("RLIMIT_FSIZE", 1 << 30, "Max file size"), ("RLIMIT_DATA", 200 << 20, "Max data size")],
    ids=["ulimit-f", "ulimit-d"],
)
def test_device_under_a_lower_hard_limit_starts_and_keeps_it(
    spawn: Callable[..., SandboxedDevice],
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
    value: int,
    shown: str,
) -> None:
    """A hard limit below what the sandbox sets (unlimited file size with a file that grows,
    here its stderr; RUNTIME_ADDRESS_SPACE of data) cannot be raised from the device's user
    namespace, root or not: the device and its warden failed ("cannot set rlimits: not
    allowed to raise maximum limit"), and so did every VM under that limit. The lower one is
    kept: it confines the device more."""
    command = (sys.executable, "-c", UNDER_LIMIT, limit, str(value))
    monkeypatch.setattr(harness, "DEVICE_COMMAND", command)
    dev = spawn(stderr_to_file=True)
    dev.wait_ready()

    assert _limits(dev.device_pid())[shown] == [str(value)] * 2


@needs_ptrace_read
def test_warden_status_when_serving_is_confined_and_holds_stderr_and_pipe_only(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()
    # The warden loads its filter after its exec, which runs beside the device's own start:
    # on a loaded host the device may be READY first (the warden reads nothing meanwhile).
    deadline = time.monotonic() + 10
    while _status(dev.proc.pid)["Seccomp"] != "2" and time.monotonic() < deadline:
        time.sleep(0.01)

    fds = _fds(dev.proc.pid)

    assert _confinement(_status(dev.proc.pid)) == CONFINED
    assert sorted(fds) == [2, max(fds)] and fds[2] == str(dev.stderr_path)  # its failure line
    assert fds[max(fds)].startswith("pipe:")  # the device's liveness pipe


def _fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


@needs_ptrace_read
def test_device_stdin_stdout_when_serving_are_dev_null_and_stderr_is_ours(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    fds = _fds(dev.device_pid())

    assert (fds[0], fds[1], fds[2]) == (os.devnull, os.devnull, str(dev.stderr_path))


@needs_ptrace_read
def test_device_stderr_on_a_terminal_is_write_only_when_serving(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """Run from a terminal, stderr is the operator's terminal, open read-write: a device
    could read what they type (a password at the guest's prompt). It keeps the terminal to
    write to, and nothing to read with."""
    ours, terminal = os.openpty()
    try:
        dev = spawn(stderr_fd=terminal)
        dev.wait_ready()
        pid = dev.device_pid()
        with open(f"/proc/{pid}/fdinfo/2") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        assert (flags & os.O_ACCMODE, os.readlink(f"/proc/{pid}/fd/2")) == (
            os.O_WRONLY,
            os.ttyname(terminal),
        )
    finally:
        os.close(ours)
        os.close(terminal)


@needs_ptrace_read
def test_device_output_stdio_when_serving_is_an_fd_above_2(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn(out=1)  # output = "stdio": the monitor hands over its own fd 1
    dev.wait_ready()

    fds = _fds(dev.device_pid())
    ours = os.readlink("/proc/self/fd/1")

    assert fds[1] == os.devnull
    assert [fd for fd, target in fds.items() if target == ours and fd > 2] != []


@pytest.fixture(params=["device", "warden"])
def serving_pid(request: pytest.FixtureRequest, spawn: Callable[..., SandboxedDevice]) -> int:
    """The pid of a ready device, or of its warden."""
    dev = spawn()
    dev.wait_ready()
    return dev.device_pid() if request.param == "device" else dev.proc.pid


@needs_ptrace_read
def test_device_environ_when_serving_is_empty(serving_pid: int) -> None:
    assert Path(f"/proc/{serving_pid}/environ").read_bytes() == b""


@needs_ptrace_read
def test_device_address_space_when_serving_is_limited(serving_pid: int) -> None:
    assert _limits(serving_pid)["Max address space"] == [str(RUNTIME_ADDRESS_SPACE)] * 2


def test_device_when_sandboxed_serves_uart_accesses(spawn: Callable[..., SandboxedDevice]) -> None:
    dev = spawn()
    dev.wait_ready()

    dev.write(Reg.RX_TX, b"A")
    dev.sync()
    lsr = dev.read(Reg.LSR)[0]

    assert dev.output() == b"A"
    assert lsr & Lsr.THRE


def test_warden_when_device_is_killed_dies_of_the_same_signal(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    os.kill(dev.device_pid(), signal.SIGKILL)

    assert dev.wait_exit() == -signal.SIGKILL


def test_device_when_serving_leads_its_own_session(spawn: Callable[..., SandboxedDevice]) -> None:
    dev = spawn()
    dev.wait_ready()

    # /proc/PID/stat fields 5 and 6 (after the parenthesised name): pgrp and session
    pgrp, session = (
        Path(f"/proc/{dev.device_pid()}/stat").read_text().rsplit(")", 1)[1].split()[2:4]
    )

    assert int(pgrp) == int(session) == dev.device_pid()  # kill(0) reaches only itself
    assert os.getpgid(0) != int(pgrp)


def test_warden_when_device_exits_exits_with_its_status(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    dev = spawn()
    dev.wait_ready()

    dev.sock.send(b"\xff" * 3)  # a malformed frame: ProtocolError, traceback, exit 1

    assert dev.wait_exit() == 1
    assert "ProtocolError" in dev.stderr()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_device_when_warden_is_signalled_dies(
    sig: signal.Signals, spawn: Callable[..., SandboxedDevice]
) -> None:
    dev = spawn()
    dev.wait_ready()
    device = dev.device_pid()

    dev.proc.send_signal(sig)

    assert dev.wait_exit() == -sig
    deadline = time.monotonic() + 5
    while Path(f"/proc/{device}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(f"/proc/{device}").exists()


def test_device_whose_monitor_end_closes_exits_at_once_saying_so(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """Its monitor failed it or is gone: the device reads its channel's end and exits, status 1,
    under its own filter (devprocs/channel.py ChannelClosed), where with libzmq it waited to be
    killed."""
    dev = spawn()
    dev.wait_ready()
    dev.sock.close(linger=0)

    assert dev.wait_exit(10) == 1
    assert "device serial0: the monitor closed the channel" in dev.stderr()


def test_device_that_ends_between_its_sandbox_and_ready_exits_with_its_own_status(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """Its channel's socket is closed on every way out (devprocs/runtime.py run()), not left to
    the interpreter's exit, whose unclosed-socket warning asks getsockname: the filter killed
    such a device with SIGSYS instead of the status it ended with."""
    dev = spawn(hook=lambda fds: sys.exit(3))

    assert dev.wait_exit(10) == 3


# The device on a host that refuses one of its layers: argv[1] names the call, which fails
# with EPERM (user namespaces off for unprivileged users: Ubuntu's AppArmor restriction,
# Debian's kernel.unprivileged_userns_clone = 0).
REFUSED_LAYER = textwrap.dedent(
    """
    import errno, importlib, os, runpy, sys
    module, name = sys.argv[1].rsplit(".", 1)
    def refuse(*args):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    setattr(importlib.import_module(module), name, refuse)
    sys.argv[1:] = []
    runpy.run_module("splitvmm.devprocs", run_name="__main__")
    """
)


@pytest.mark.parametrize(
    ("call", "why"),
    [
        ("splitvmm.native.confine.unshare", "cannot create the device's namespaces"),
        ("os.fork", "cannot fork the device's warden"),
        ("splitvmm.native.landlock.restrict_self_deny_all", "cannot enter Landlock"),
    ],
    ids=["namespaces", "warden", "landlock"],
)
def test_device_whose_sandbox_the_host_refuses_says_why_in_one_line(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch, call: str, why: str
) -> None:
    """Before its warden's fork (namespaces), at it (a limit on processes) and after it
    (Landlock): the reason, named, in one line that the launcher relays as the device's, and
    exit status 1 (the monitor's "exited with status 1 before it was ready"); not a traceback
    of the device's code."""
    monkeypatch.setattr(harness, "DEVICE_COMMAND", (sys.executable, "-c", REFUSED_LAYER, call))
    dev = spawn(stderr_to_file=True)

    assert dev.wait_exit(10) == 1
    assert dev.stderr() == f"device serial0: {why}: [Errno 1] Operation not permitted\n"


PR_GET_SECUREBITS = 27  # <linux/prctl.h>


def test_device_securebits_when_serving_are_set_and_locked(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """uid 0 of its user namespace gains no capability on exec, keeps none through a setuid
    and raises no ambient one, for good: /proc status shows no securebits, so the device
    reads them itself (seccomp in audit mode lets its prctl through, logged)."""

    def securebits(fds: dict[str, int]) -> dict[str, object]:  # pickled by value
        return {"securebits": confine.prctl(PR_GET_SECUREBITS)}

    dev = spawn(hook=securebits, seccomp="log")

    assert dev.hook_result() == {"securebits": confine.SECUREBITS_LOCKED}


# -- a device run as another host user (config.py vm.device_uid) -------------------------------
NOBODY = (65534, 65534)  # no file of the suite's is this user's
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root starts a process as another user"
)


@needs_root
def test_device_run_as_another_user_is_that_user_on_the_host_and_serves(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """The device and its warden are that user, with no supplementary group and no
    capability; root in the device's user namespace is that user outside, and only it."""
    dev = spawn(user=NOBODY)
    dev.wait_ready()
    dev.write(Reg.SCR, b"\x5a")

    for pid in (dev.proc.pid, dev.device_pid()):  # the warden, the device
        status = _status(pid)
        assert status["Uid"].split() == [str(NOBODY[0])] * 4
        assert status["Gid"].split() == [str(NOBODY[1])] * 4
        assert status["Groups"] == ""
    assert _confinement(_status(dev.device_pid())) == CONFINED
    assert Path(f"/proc/{dev.device_pid()}/uid_map").read_text().split() == ["0", "65534", "1"]
    assert Path(f"/proc/{dev.device_pid()}/gid_map").read_text().split() == ["0", "65534", "1"]
    assert dev.read(Reg.SCR) == b"\x5a"


@needs_root
def test_device_run_as_another_user_has_the_same_empty_root(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """It cannot search the runtime dir's parents: its empty root is made by fd alone."""
    dev = spawn(user=NOBODY)
    dev.wait_ready()

    assert sorted(os.listdir(f"/proc/{dev.device_pid()}/root")) == ["channel"]


# A device whose starter holds no capability (root's uid, or a user's, with none left).
NO_CAPABILITY = (
    "import runpy; from splitvmm.native import confine; confine.drop_capabilities(); "
    "runpy.run_module('splitvmm.devprocs', run_name='__main__')"
)


def test_device_of_its_starters_own_user_switches_nothing(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's monitor may name its own ids as vm.device_uid: its devices must not try to
    switch (setgroups takes CAP_SETGID, which a user lacks), and serve as ever."""
    never_become = (
        "import runpy, sys; from splitvmm.sandbox import device; "
        "device._become = lambda *ids: sys.exit(f'became {ids}'); "
        "runpy.run_module('splitvmm.devprocs', run_name='__main__')"
    )
    monkeypatch.setattr(harness, "DEVICE_COMMAND", (sys.executable, "-I", "-c", never_become))
    dev = spawn(user=(os.geteuid(), os.getegid()))
    dev.wait_ready()

    assert dev.read(Reg.SCR) == b"\x00"


@needs_root
def test_device_that_may_not_become_the_user_says_why_in_one_line(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started by a process that holds no CAP_SETUID (a launcher not run as root): the
    launcher refuses first (sandbox/launcher_server.py), and the device itself names it."""
    monkeypatch.setattr(harness, "DEVICE_COMMAND", (sys.executable, "-I", "-c", NO_CAPABILITY))
    dev = spawn(user=NOBODY, stderr_to_file=True)

    assert dev.wait_exit(10) == 1
    assert dev.stderr() == (
        "device serial0: cannot run as uid 65534, gid 65534: Operation not permitted "
        "(only a launcher run as root may)\n"
    )


# Runs the device with its model's first load (before its sandbox) reporting the capabilities
# it holds then, on stderr.
CAPS_AT_SETUP = textwrap.dedent(
    """
    import runpy, sys
    from splitvmm.devprocs import runtime
    load = runtime.load_model
    def first_load(model):
        runtime.load_model = load
        caps = [line for line in open("/proc/self/status") if line.startswith("CapEff")]
        sys.stderr.write(caps[0])
        return load(model)
    runtime.load_model = first_load
    runpy.run_module("splitvmm.devprocs", run_name="__main__")
    """
)


@needs_root
@pytest.mark.parametrize("user", [None, NOBODY], ids=["own-user", "another-user"])
def test_device_holds_cap_setuid_setgid_kill_before_its_sandbox_only_to_become_its_user(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch, user: object
) -> None:
    """A root launcher keeps them for devices run as another user (launcher_start.py); a
    device of its own user gives them up before its model sets up (devprocs/runtime.py run)."""
    monkeypatch.setattr(harness, "DEVICE_COMMAND", (sys.executable, "-I", "-c", CAPS_AT_SETUP))
    dev = spawn(user=user, stderr_to_file=True)
    dev.wait_ready()

    effective = int(dev.stderr().splitlines()[0].split()[1], 16)
    held = [
        effective >> cap & 1 for cap in (confine.CAP_SETUID, confine.CAP_SETGID, confine.CAP_KILL)
    ]
    assert held == ([1, 1, 1] if user else [0, 0, 0])


def _opened_as(uid: int, gid: int, paths: list[str]) -> object:
    """What a process of host user `uid` gets opening each of `paths` (the errno's name)."""

    def open_each() -> object:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        got = []
        for path in paths:
            try:
                os.close(os.open(path, os.O_RDONLY))
                got.append("opened")
            except OSError as e:
                got.append(errno.errorcode[e.errno])
        return got

    return in_a_child(open_each)


@needs_root
def test_device_run_as_another_user_and_its_warden_are_out_of_that_users_reach(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    """Their user namespace is that user's, so its host processes hold every capability in
    it: only being not dumpable, with their memory the host's, keeps them out. The warden,
    exec'd inside it, is so only because its program is not readable by that user (0711:
    sandbox/device.py _refuse_a_warden_we_may_read); a review read and ptraced it when it
    was 0755."""
    dev = spawn(user=NOBODY)
    dev.wait_ready()
    pids = [dev.proc.pid, dev.device_pid()]

    got = _opened_as(
        *NOBODY, [f"/proc/{pid}/{what}" for pid in pids for what in ("mem", "environ")]
    )

    assert got == ["EACCES"] * 4


def with_warden(program: Path) -> tuple[str, ...]:
    """A device command whose warden's program is `program`."""
    command = textwrap.dedent(
        f"""
        import runpy
        from splitvmm.sandbox import device
        device.WARDEN = {str(program)!r}
        runpy.run_module("splitvmm.devprocs", run_name="__main__")
        """
    )
    return (sys.executable, "-I", "-c", command)


UNDEFINED_ID = 0xFFFFFFFF  # an ACL entry's id where it names no one (<linux/posix_acl_xattr.h>)


def _acl_lets_read(path: Path, uid: int) -> None:
    """Mode 0711 plus an ACL entry user:`uid`:r-x (what `setfacl -m u:UID:rx PATH` writes)."""
    entries = [(0x01, 7, UNDEFINED_ID), (0x02, 5, uid), (0x04, 1, UNDEFINED_ID),
               (0x10, 5, UNDEFINED_ID), (0x20, 1, UNDEFINED_ID)]  # fmt: skip
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", blob)


@needs_root
@pytest.mark.parametrize("how", ["mode-0755", "acl"])
def test_device_for_another_user_refuses_a_warden_that_user_may_read(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    """The kernel's own read check, not the mode bits: an ACL let the user read a 0711 one
    (0751 shown), and the device started, its warden's /proc/PID/mem open to the user."""
    readable = tmp_path / "warden"
    shutil.copy(sandbox_device.WARDEN, readable)
    readable.chmod(0o755 if how == "mode-0755" else 0o711)
    if how == "acl":
        _acl_lets_read(readable, NOBODY[0])
    tmp_path.chmod(0o755)
    monkeypatch.setattr(harness, "DEVICE_COMMAND", with_warden(readable))
    dev = spawn(user=NOBODY, stderr_to_file=True)

    assert dev.wait_exit(10) == 1
    assert dev.stderr() == (
        f"device serial0: the device warden {readable} may be read by uid 65534, which its "
        "devices run as: a process of that user could take the warden over "
        f"(chmod 0711 {readable}: the build leaves it so, a wheel's install does not)\n"
    )


@needs_root
def test_device_for_another_user_refuses_a_warden_that_is_no_regular_file(
    spawn: Callable[..., SandboxedDevice], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Asked without opening it: an open of a FIFO that user may read blocked the device."""
    fifo = tmp_path / "warden"
    os.mkfifo(fifo, 0o644)
    tmp_path.chmod(0o755)
    monkeypatch.setattr(harness, "DEVICE_COMMAND", with_warden(fifo))
    dev = spawn(user=NOBODY, stderr_to_file=True)

    assert dev.wait_exit(10) == 1
    assert dev.stderr() == f"device serial0: the device warden {fifo} is not a regular file\n"
