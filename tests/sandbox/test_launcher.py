"""The launcher (sandbox/launcher.py): what it starts, what it refuses, how it ends.

Real device processes, no VM. The launcher is forked from this test process, which
must have a single thread then (as the monitor has when it forks it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from splitvmm.errors import DeviceFailure
from splitvmm.monitor.channel import DeviceChannel
from splitvmm.native.confine import CAP_KILL, CAP_SETFCAP, CAP_SETGID, CAP_SETUID
from splitvmm.protocol import spec as spec_module
from splitvmm.protocol.spec import DEFERRED, MAX_SPEC, DeviceSpec
from splitvmm.record import replace
from splitvmm.sandbox import launcher as launcher_module
from splitvmm.sandbox import launcher_start
from splitvmm.sandbox import zygote as zygote_module
from splitvmm.sandbox.launcher import (
    CHUNK,
    MAX_MESSAGE,
    READY_TIMEOUT_S,
    LaunchedProcess,
    Launcher,
)
from splitvmm.sandbox.launcher_start import MAX_FDS, STOP_SIGNALS, LauncherError
from splitvmm.sandbox.spawn import readable
from tests.sandbox.harness import REPO
from tests.setpriv import needs_setpriv, under_setpriv

pytestmark = pytest.mark.sandbox
T = TypeVar("T")


@pytest.fixture
def launcher(rundir: Path) -> Iterator[Launcher]:
    launcher = Launcher.start(rundir)
    yield launcher
    launcher.close()


@pytest.fixture
def fds() -> Iterator[dict[str, int]]:
    """A serial device's fds: an eventfd as its irq, a pipe as its output."""
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    yield {"irq": irq, "out": out_w}
    for fd in (irq, out_r, out_w):
        os.close(fd)


def serial_spec(rundir: Path, fds: dict[str, int], **changes: object) -> DeviceSpec:
    spec = DeviceSpec("serial0", "serial", f"ipc://{rundir}/serial0.sock", fds)
    return replace(spec, **changes)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_launcher_spawn_starts_its_own_child_that_says_ready_and_reports_its_end(
    launcher, rundir, fds
):
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)
        parent = parent_of(process.pid)
        process.kill()
        status = process.wait(10)
    finally:
        channel.close()
        process.close()
    assert (parent, status) == (launcher.pid, -signal.SIGKILL)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"seccomp": "log"}, "with seccomp 'kill' and no hook"),
        ({"seccomp": "trace"}, "with seccomp 'kill' and no hook"),
        ({"hook": "gASVAAAAAAAAAAA="}, "with seccomp 'kill' and no hook"),
        ({"model": "nonesuch"}, "device serial0: unknown model 'nonesuch'"),
        ({"channel": "ipc:///tmp/serial0.sock"}, "its channel must be serial0.sock in"),
        ({"name": "../serial0"}, "is not a plain file name"),
        ({"name": ".s", "channel": "ipc://{rundir}/.s.sock"}, "is not a plain file name"),
        # no socket path encodes it: bind() raised UnicodeEncodeError in the launcher
        ({"name": "s\ud800", "channel": "ipc://{rundir}/s\ud800.sock"}, "not a plain file name"),
        # NAME_RE's "$" matches before a last newline: only a whole match is the config's rule
        ({"name": "s\n", "channel": "ipc://{rundir}/s\n.sock"}, "is not a plain file name"),
        ({"fds": {}}, "model serial takes fds ['irq', 'out'], the request names []"),
        ({"transport": ["pci", 1]}, "the spec's transport is not an object"),
    ],
    ids=[
        "seccomp-log",
        "seccomp-trace",
        "hook",
        "model",
        "channel",
        "name",
        "hidden-name",
        "surrogate-name",
        "newline-name",
        "fds",
        "transport",
    ],  # fmt: skip
)
def test_launcher_spec_outside_what_it_starts_is_refused(launcher, rundir, fds, changes, why):
    changes = {k: v.format(rundir=rundir) if k == "channel" else v for k, v in changes.items()}
    with pytest.raises(DeviceFailure, match="launcher|device") as e:
        launcher.spawn(replace(serial_spec(rundir, fds), **changes))
    assert why in str(e.value)


@pytest.mark.parametrize("how", [os.O_PATH, os.O_ACCMODE], ids=["O_PATH", "ioctl-only"])
def test_launcher_refuses_an_fd_not_open_for_io_and_serves_the_next_request(
    launcher, rundir, fds, how
):
    """A monitor may open any path with O_PATH, or a terminal with access mode 3 (ioctls
    only): Landlock checks neither. A device given one as its output could reopen it writable
    before its sandbox. The launcher passes none."""
    master, terminal = os.openpty()
    given = os.open(os.ttyname(terminal), how | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        with pytest.raises(DeviceFailure, match="an fd it was sent is an O_PATH or ioctl-only"):
            launcher.spawn(serial_spec(rundir, {**fds, "out": given}))
    finally:
        for fd in (given, master, terminal):
            os.close(fd)
    process, listener = launcher.spawn(serial_spec(rundir, fds))
    process.kill()  # its listener open till then: serves_a_device()
    assert process.wait(10) == -signal.SIGKILL
    os.close(listener)
    process.close()


def test_launcher_makes_sockets_for_so_many_device_names_and_no_more(rundir, fds, monkeypatch):
    """Each device name leaves its socket in the runtime dir until the monitor removes it: a
    monitor spawning and killing devices under new names must not fill its file system."""
    monkeypatch.setattr(spec_module, "MAX_DEVICES", 2)  # read by the forked launcher
    if "splitvmm.sandbox.launcher_server" in sys.modules:  # imported by an earlier test
        monkeypatch.setattr(sys.modules["splitvmm.sandbox.launcher_server"], "MAX_DEVICES", 2)
    launcher = Launcher.start(rundir)

    def spawn(name: str) -> None:
        spec = serial_spec(rundir, fds, name=name, channel=f"ipc://{rundir}/{name}.sock")
        process, listener = launcher.spawn(spec)
        os.close(listener)
        process.kill()
        process.wait(10)
        process.close()
        (rundir / f"{name}.sock").unlink()  # as the slot does: the next process binds it anew

    try:
        for name in ("a", "b", "a"):  # a name used before takes no new place
            spawn(name)
        with pytest.raises(DeviceFailure, match="sockets for 2 device names were made already"):
            spawn("c")
    finally:
        launcher.close()


def test_launcher_runs_so_many_devices_and_no_more(rundir, fds, monkeypatch):
    """A name used before takes no new socket, but every process counts: a monitor must not
    start one device after another under the same name (a fork bomb from the launcher)."""
    monkeypatch.setattr(spec_module, "MAX_DEVICES", 2)  # read by the forked launcher
    if "splitvmm.sandbox.launcher_server" in sys.modules:  # imported by an earlier test
        monkeypatch.setattr(sys.modules["splitvmm.sandbox.launcher_server"], "MAX_DEVICES", 2)
    launcher = Launcher.start(rundir)
    running: list[tuple[LaunchedProcess, int]] = []
    try:
        for name in ("a", "b"):
            spec = serial_spec(rundir, fds, name=name, channel=f"ipc://{rundir}/{name}.sock")
            running.append(launcher.spawn(spec))  # its listener kept: a device without ends
        (rundir / "a.sock").unlink()  # a's name again: its socket could be made anew
        with pytest.raises(DeviceFailure, match="device a: 2 devices run already"):
            launcher.spawn(serial_spec(rundir, fds, name="a", channel=f"ipc://{rundir}/a.sock"))
    finally:
        for process, listener in running:
            process.kill()
            process.wait(10)
            process.close()
            os.close(listener)
        launcher.close()


def test_launcher_request_over_fd_cap_is_refused_and_next_request_served(launcher, rundir, fds):
    many = {f"fd{i}": fds["irq"] for i in range(MAX_FDS + 1)}
    with pytest.raises(DeviceFailure, match=f"over 4096 bytes or {MAX_FDS} fds"):
        launcher.spawn(serial_spec(rundir, many))
    process, listener = launcher.spawn(serial_spec(rundir, fds))
    process.kill()  # its listener open till then: serves_a_device()
    assert process.wait(10) == -signal.SIGKILL
    os.close(listener)


def test_launcher_spec_near_cap_arrives_whole_in_chunks(launcher, rundir, fds):
    # A saved state nearly as big as a device reads: many SOCK_SEQPACKET messages.
    state = {"model": "serial", "version": 1, "fields": {"pad": "A" * (MAX_SPEC - 4096)}}
    process, listener = launcher.spawn(serial_spec(rundir, fds, state=state))
    process.kill()  # its listener open till then: serves_a_device()
    assert process.wait(10) == -signal.SIGKILL
    os.close(listener)


def test_launcher_spec_over_cap_raises_naming_device_before_sending(launcher, rundir, fds):
    state = {"model": "serial", "version": 1, "fields": {"pad": "A" * MAX_SPEC}}
    with pytest.raises(DeviceFailure, match=f"device serial0: .* over the {MAX_SPEC} a device"):
        launcher.spawn(serial_spec(rundir, fds, state=state))


def _caught(pid: int) -> set[int]:
    """The signals process `pid` has a handler for (/proc: SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))[7:], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def test_launcher_forked_after_the_monitors_stop_handlers_runs_none_of_them(rundir):
    """Machine.build() starts the launcher itself where `up` did not, after it installed its
    stop handlers (Machine._install_stop_handlers): the fork inherits each of them, which
    would run the monitor's stop() on the launcher's copy of the machine (its wake fd long
    closed, or its number another fd's by then), and must take each at its default."""
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in STOP_SIGNALS}
    try:
        launcher = Launcher.start(rundir)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        launcher.check_configured()  # ready: it has set its signals up
        caught = _caught(launcher.pid)
    finally:
        launcher.close()
    assert caught & set(STOP_SIGNALS) == set()


def test_launcher_whose_monitor_left_before_it_was_ready_ends_quietly(capfd):
    """A start that fails early (a bad config or snapshot) closes the launcher's socket
    before it may have said ready: that is no error of the launcher's."""
    sock, pid = launcher_start.fork()
    sock.close()
    _, status = os.waitpid(pid, 0)
    assert (os.waitstatus_to_exitcode(status), capfd.readouterr().err) == (0, "")


def test_launcher_forked_while_the_monitor_holds_its_collector_off_turns_its_own_on(
    monkeypatch,
):
    """The monitor holds the cyclic collector off while it imports (cli/early.py), and the
    launcher forked then runs for the VM's whole life: it must not inherit that."""

    def report(sock_fd: int, monitor: int) -> int:
        os.write(sock_fd, b"on" if gc.isenabled() else b"off")
        return 0

    monkeypatch.setattr(launcher_start, "_launcher_main", report)
    gc.disable()
    try:
        sock, pid = launcher_start.fork()
    finally:
        gc.enable()
    with sock:
        said = sock.recv(16)
    os.waitpid(pid, 0)
    assert said == b"on"


def test_launcher_spec_trickled_a_byte_at_a_time_is_refused_within_one_deadline(
    rundir, monkeypatch
):
    """CHUNK_TIMEOUT_S bounds the whole spec, not each chunk: one byte every 0.2 s kept the
    launcher (which reaps and reports nothing meanwhile) on one request for as long as the
    sender liked."""
    monkeypatch.setattr(launcher_module, "CHUNK_TIMEOUT_S", 0.5)
    if "splitvmm.sandbox.launcher_server" in sys.modules:  # imported by an earlier test
        monkeypatch.setattr(sys.modules["splitvmm.sandbox.launcher_server"], "CHUNK_TIMEOUT_S", 0.5)
    launcher = Launcher.start(rundir)
    try:
        launcher.check_configured()  # it is ready and configured
        sock = launcher._sock
        launcher_start.send(sock, {"op": "spawn", "id": 99, "size": 100})
        sent = 0
        while sent < 100 and not readable(sock.fileno(), 0.2):
            launcher_start.send(sock, b"x")
            sent += 1
        data, _, _ = launcher_start.receive(sock, 4096)
        reply = json.loads(data)
    finally:
        launcher.close()
    assert (reply["op"], reply["id"]) == ("refused", 99)
    assert "the spec stopped at" in reply["message"] and sent < 10


# A launcher's server (sandbox/launcher_server.py) with one "warden" child whose "device"
# outlives it by 0.5 s, as a device in a long system call outlives its killed warden.
OUTLIVED_WARDEN = """
import json, os, socket, time
from splitvmm.native import confine
from splitvmm.sandbox import launcher_server
from splitvmm.sandbox.launcher_start import receive
from splitvmm.sandbox.spawn import ChildProcess, readable
confine.set_child_subreaper()  # as the launcher: the device is reparented to us
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
r, w = os.pipe()
warden = os.fork()
if warden == 0:
    device = os.fork()
    if device == 0:
        time.sleep(0.5)
        os._exit(0)
    os.write(w, device.to_bytes(4, "little"))
    os._exit(0)
device = int.from_bytes(os.read(r, 4), "little")
server = launcher_server._Server(theirs, None)
process = ChildProcess(warden, None)
server.children[process.pidfd] = process
server.poller.register(process.pidfd)
readable(process.pidfd, 10)  # the warden has ended: what wakes the launcher's loop
server._report_end(process.pidfd)
reply = json.loads(receive(ours, 4096)[0])
print(json.dumps({"op": reply["op"], "device_gone": not os.path.exists(f"/proc/{device}")}))
"""


# Two "wardens" whose "devices" outlive them: the first's for 3 s, past ORPHAN_WAIT_S (0.5 s
# here), the second's not at all.
STUCK_ORPHAN = """
import json, os, socket, time
from splitvmm.native import confine
from splitvmm.sandbox import launcher_server
from splitvmm.sandbox.launcher_start import receive
from splitvmm.sandbox.spawn import ChildProcess, readable
launcher_server.ORPHAN_WAIT_S = 0.5
confine.set_child_subreaper()
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
server = launcher_server._Server(theirs, None)
devices, lingering = [], []
for linger in (3.0, 0.0):
    r, w = os.pipe()
    warden = os.fork()
    if warden == 0:
        device = os.fork()
        if device == 0:
            time.sleep(linger)
            os._exit(0)
        os.write(w, device.to_bytes(4, "little"))
        os._exit(0)
    devices.append(int.from_bytes(os.read(r, 4), "little"))
    process = ChildProcess(warden, None)
    server.children[process.pidfd] = process
    server.poller.register(process.pidfd)
    readable(process.pidfd, 10)
    server._report_end(process.pidfd)
    report = json.loads(receive(ours, 4096)[0])
    assert report["op"] == "exited"
    lingering.append(report["lingering"])
print(json.dumps([devices, lingering]))
"""


def test_launcher_device_stuck_past_the_wait_delays_no_other_devices_report():
    """The first report gives up on its device after ORPHAN_WAIT_S and says so, in the
    report too (the monitor restarts no disk device then); the second waits for its own
    device only, and blames no one. Its report says an orphan still runs too: orphans are not
    matched to wardens, and the first one's might be this device's."""
    argv = [sys.executable, "-c", STUCK_ORPHAN]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    (stuck, _), lingering = json.loads(result.stdout)
    assert lingering == [True, True]
    assert result.stderr.count("still run") == 1, result.stderr
    assert f"pids [{stuck}] still run 0.5 s" in result.stderr


def test_launcher_reports_a_device_ended_only_once_it_outlived_its_warden():
    """ "exited" is the monitor's leave to start a replacement on the same disk image: the
    device proper must be gone, not only its warden."""
    argv = [sys.executable, "-c", OUTLIVED_WARDEN]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"op": "exited", "device_gone": True}


def test_launcher_has_no_new_privs_and_its_own_session(launcher):
    status = Path(f"/proc/{launcher.pid}/status").read_text()
    assert ("NoNewPrivs:\t1" in status, os.getsid(launcher.pid)) == (True, launcher.pid)


# A launcher started with the capabilities setpriv gives it (a user given CAP_NET_ADMIN for its
# TAPs: README "made if missing (needs CAP_NET_ADMIN)"; tests/integration/test_confinement.py
# runs the monitor so): the capability sets of the launcher, its zygote, a device's warden and
# the device proper.
USER_CAPS_PROBE = """
import json, os, sys, time
from pathlib import Path
from splitvmm.monitor.channel import DeviceChannel
from splitvmm.protocol.spec import DeviceSpec
from splitvmm.sandbox.launcher import Launcher
from tests.sandbox.test_launcher import capabilities, children_of
def caps(pid):
    return capabilities(pid, ("CapEff", "CapPrm", "CapInh", "CapAmb"))
rundir = sys.argv[1]
launcher = Launcher.start(Path(rundir))
fds = {"irq": os.eventfd(0, os.EFD_CLOEXEC), "out": os.pipe2(os.O_CLOEXEC)[1]}
spec = DeviceSpec("serial0", "serial", f"ipc://{rundir}/serial0.sock", fds)
process, listener = launcher.spawn(spec)
channel = DeviceChannel("serial", spec.channel, listener)
try:
    channel.wait_ready(process)
    (zygote,) = children_of(launcher.pid) - {process.pid}
    (device,) = children_of(process.pid)
    # The warden confines itself beside the device, which may be READY first (a loaded
    # host): its capabilities are read once it has dropped them, or after 10 s as they are.
    deadline = time.monotonic() + 10
    while any(caps(process.pid).values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({name: caps(pid) for name, pid in (("launcher", launcher.pid),
        ("zygote", zygote), ("warden", process.pid), ("device", device))}))
finally:
    process.kill()
    process.wait(10)
    channel.close()
    launcher.close()
"""


CAP_SETS = ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")


def capabilities(pid: int, sets: tuple[str, ...] = CAP_SETS) -> dict[str, int]:
    """The capability `sets` of process `pid`, from its /proc status."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return {k: int(fields[k], 16) for k in sets}


@needs_setpriv
def test_launcher_of_a_user_given_cap_net_admin_and_its_zygote_hold_no_capability():
    """The monitor opens the TAPs itself (monitor/devicefds.py) and drops the capability once
    the VM is built (monitor/confinement.py); the launcher it forked first thing kept it in
    every set for the VM's whole life, and passed it on to every zygote through the ambient
    set: neither needs it, nor any other (a device maps a uid other than 0 into its user
    namespace without one)."""
    setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=+net_admin", "--ambient-caps=+net_admin"]  # fmt: skip
    caps = under_setpriv(setpriv, USER_CAPS_PROBE, 65534, "run")
    none = {"CapEff": 0, "CapPrm": 0, "CapInh": 0, "CapAmb": 0}
    assert caps == dict.fromkeys(("launcher", "zygote", "warden", "device"), none)


@pytest.mark.parametrize(
    ("sysctls", "needed"),
    [
        ({}, False),  # a mainline kernel: any user may make one
        ({"kernel/unprivileged_userns_clone": "1\n"}, False),
        ({"kernel/unprivileged_userns_clone": "0\n"}, True),  # Debian's, switched off
        ({"kernel/apparmor_restrict_unprivileged_userns": "0\n"}, False),
        ({"kernel/apparmor_restrict_unprivileged_userns": "1\n"}, True),  # Ubuntu 23.10+
    ],
    ids=["mainline", "debian-on", "debian-off", "ubuntu-free", "ubuntu-restricted"],
)
def test_root_launcher_keeps_cap_sys_admin_where_only_it_makes_a_user_namespace(
    tmp_path, sysctls, needed
):
    """A root launcher keeps CAP_SETFCAP alone; on a host whose kernel makes user namespaces
    only for CAP_SYS_ADMIN, its devices could not make theirs without it."""
    for name, value in sysctls.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(value)

    assert launcher_start.userns_needs_sys_admin(str(tmp_path)) is needed


def held_by_launcher_and_zygote(launcher: Launcher, spec: DeviceSpec) -> dict[str, dict]:
    """The capabilities of `launcher` and of its zygote, once the device of `spec` is ready."""
    process, listener = launcher.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)
        (zygote,) = children_of(launcher.pid) - {process.pid}
        return {"launcher": capabilities(launcher.pid), "zygote": capabilities(zygote)}
    finally:
        process.kill()
        process.wait(10)
        channel.close()


FOR_ANOTHER_USER = sum(1 << cap for cap in (CAP_SETUID, CAP_SETGID, CAP_KILL))


@pytest.mark.skipif(os.geteuid() != 0, reason="a root launcher's capabilities need root")
def test_root_launcher_and_its_zygote_hold_only_what_a_devices_start_needs(launcher, rundir, fds):
    """A root launcher kept every capability of root's (CapEff 0x1fffeffffff) for the VM's
    whole life, serving a monitor that parses guest data, and so did its zygote and each
    device until its sandbox. A device needs CAP_SETFCAP there (to write uid 0 into its user
    namespace's uid_map), CAP_SETUID and CAP_SETGID where it runs as another user
    (vm.device_uid), whom the launcher ends with CAP_KILL; it gets ready with nothing else.
    A launcher whose VM has no such device gives the three up at its configure, and so does
    its first zygote, started before it (it kept them until it rested)."""
    held = held_by_launcher_and_zygote(launcher, serial_spec(rundir, fds))
    setfcap = 1 << CAP_SETFCAP
    holds = {"CapEff": setfcap, "CapPrm": setfcap, "CapBnd": setfcap | FOR_ANOTHER_USER}
    none = {"CapInh": 0, "CapAmb": 0}
    assert held == {"launcher": holds | none, "zygote": holds | none}


@needs_setpriv
def test_root_launcher_under_securebit_noroot_passes_an_ambient_cap_setfcap_on_alone():
    """systemd's SecureBits=noroot with AmbientCapabilities=CAP_SETFCAP: root's exec of the
    zygote gains nothing from uid 0, so the ambient set is what carries CAP_SETFCAP to it (a
    zygote without it starts no device); every other capability still goes."""
    setpriv = ["--securebits=+noroot", "--inh-caps=+setfcap,+net_admin",
               "--ambient-caps=+setfcap,+net_admin"]  # fmt: skip
    caps = under_setpriv(setpriv, USER_CAPS_PROBE, 0, "run")
    setfcap = dict.fromkeys(("CapEff", "CapPrm", "CapInh", "CapAmb"), 1 << CAP_SETFCAP)
    none = dict.fromkeys(setfcap, 0)
    assert caps == {"launcher": setfcap, "zygote": setfcap, "warden": none, "device": none}


# A monitor whose launcher fails to start: what it is told.
LAUNCHER_START_PROBE = """
import sys
from pathlib import Path
from splitvmm.sandbox.launcher import Launcher
from splitvmm.sandbox.launcher_start import LauncherError
launcher = Launcher.start()
try:
    launcher.configure(Path(sys.argv[1]))
except LauncherError as e:
    print(e)
finally:
    launcher.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root launcher's capabilities need root")
def test_root_launcher_whose_interpreter_only_cap_dac_read_search_reaches_says_so_in_a_line(
    tmp_path, rundir
):
    """`sudo` with splitvmm in another user's private home: root reads by the modes once it
    has given up CAP_DAC_READ_SEARCH, and the zygote's exec failed with a traceback (or its
    imports, and then every device's start)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)
    (home / "venv").symlink_to(sys.prefix)
    python = home / "venv" / "bin" / "python"
    result = subprocess.run(
        [python, "-c", LAUNCHER_START_PROBE, str(rundir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.stdout, result.stderr) == (
        "the launcher did not start: the launcher has exited\n",
        f"splitvmm: launcher: {python} cannot be read without CAP_DAC_READ_SEARCH, which a "
        "root launcher gives up: run splitvmm from where root may read it by its modes\n",
    )


def test_launcher_closed_by_monitor_ends_with_the_devices_it_started(launcher, rundir, fds):
    process, listener = launcher.spawn(serial_spec(rundir, fds))
    os.close(listener)
    launcher.close()
    assert process.ended()  # killed by the launcher before it exited
    process.close()


def test_launcher_second_configure_is_refused_and_keeps_the_first_dir(
    launcher, rundir, fds, tmp_path
):
    other = tmp_path / "elsewhere"
    other.mkdir()
    launcher.configure(other)  # its reply comes with the next request
    with pytest.raises(DeviceFailure, match="the runtime dir was set already"):
        launcher.spawn(serial_spec(rundir, fds))
    process, listener = launcher.spawn(serial_spec(rundir, fds))  # still served, in rundir
    os.close(listener)
    process.kill()
    process.wait(10)
    process.close()


def test_launcher_spawn_before_configure_is_refused(rundir, fds):
    launcher = Launcher.start()
    try:
        with pytest.raises(DeviceFailure, match="no runtime dir yet"):
            launcher.spawn(serial_spec(rundir, fds))
    finally:
        launcher.close()


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: d / "missing", "is no runtime dir: No such file or directory"),
        (lambda d: (d / "open").mkdir(mode=0o755) or d / "open", "is not ours alone"),
        (lambda d: (d / "link").symlink_to(d) or d / "link", "is no runtime dir"),
        (lambda d: (d / "f").touch(mode=0o600) or d / "f", "is no runtime dir: Not a directory"),
    ],
    ids=["missing", "mode-0755", "symlink", "a-file"],
)
def test_launcher_configure_refused_is_final(rundir, fds, make, why):
    """A runtime dir that is missing, open to others or a symlink is refused, and so is any
    later configure: the first request decides."""
    launcher = Launcher.start()
    try:
        launcher.configure(make(rundir))
        with pytest.raises(DeviceFailure, match=why):  # the next request takes the reply
            launcher.spawn(serial_spec(rundir, fds))
        launcher.configure(rundir)
        with pytest.raises(DeviceFailure, match="was set already"):
            launcher.configure(rundir)  # a configure takes the one before's reply too
    finally:
        launcher.close()


def test_launcher_refused_configure_is_reported_without_another_request(rundir):
    """A VM without devices sends no request after configure: check_configured() takes
    its reply, and is a no-op once a reply was taken."""
    launcher = Launcher.start()
    try:
        launcher.configure(rundir / "missing")
        with pytest.raises(DeviceFailure, match="is no runtime dir"):
            launcher.check_configured()
        launcher.check_configured()  # nothing outstanding
    finally:
        launcher.close()


@pytest.mark.parametrize(
    ("payload", "with_fd", "why"),
    [
        (b"/run/\xff", False, "the runtime dir is not UTF-8"),
        (b"run/splitvmm", False, "is no absolute path"),
        (b"/run/a\0b", False, "is no absolute path"),  # os.open's ValueError ended the launcher
        (None, True, "is no absolute path"),  # the runtime dir, carrying an fd
    ],
    ids=["not-utf-8", "relative", "nul", "with-an-fd"],
)
def test_launcher_configure_request_outside_its_form_is_refused(rundir, fds, payload, with_fd, why):
    launcher = Launcher.start()
    try:
        launcher._await(lambda: launcher._ready or None, READY_TIMEOUT_S)  # what follows is raw
        data = str(rundir).encode() if payload is None else payload
        carried = [fds["irq"]] if with_fd else []
        header = {"op": "configure", "id": 1, "models": [], "device_user": None}
        got = request(launcher, header, data, carried)
    finally:
        launcher.close()
    assert got["reply"]["op"] == "refused" and why in got["reply"]["message"]


def children_of(pid: int) -> set[int]:
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_launcher_with_its_zygote_killed_starts_a_new_one_for_the_next_device(
    launcher, rundir, fds
):
    (zygote,) = children_of(launcher.pid)  # before any device: its only child
    os.kill(zygote, signal.SIGKILL)
    parent, others = serve_one(launcher, rundir, fds)
    assert parent == launcher.pid
    assert len(others) == 1 and zygote not in others  # a new zygote, the old one reaped


def test_launcher_that_cannot_start_a_new_zygote_refuses_naming_the_device_and_why(
    rundir, fds, monkeypatch
):
    """Its zygote gone (killed here; or rested), a spawn starts a new one. One the host
    refuses (fork's EAGAIN under a cgroup's pids.max, systemd's TasksMax=) was refused with the
    bare OSError, which `up` printed as its one line: "[Errno 11] Resource temporarily
    unavailable", naming neither the device nor what failed."""
    start = zygote_module.Zygote.start
    started: list[bool] = []

    def first_only(cls, env, command=zygote_module.ZYGOTE_COMMAND):  # the launcher's own
        if started:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        started.append(True)
        return start(env, command)

    monkeypatch.setattr(zygote_module.Zygote, "start", classmethod(first_only))
    launcher = Launcher.start(rundir)  # forked: the launcher starts its zygotes so
    try:
        (zygote,) = wait_for(lambda: children_of(launcher.pid))
        os.kill(zygote, signal.SIGKILL)
        with pytest.raises(DeviceFailure) as refused:
            launcher.spawn(serial_spec(rundir, fds))
        ended = launcher.exited()
    finally:
        launcher.close()
    assert str(refused.value) == (
        "device serial0: no zygote could be started to fork it: [Errno 11] Resource "
        "temporarily unavailable"
    )
    assert not ended  # the launcher goes on: the next spawn tries anew


def test_launcher_asked_only_after_its_zygote_is_ready_serves_from_that_zygote(rundir, fds):
    """The launcher imports its server code as soon as its zygote is ready (or a request
    comes first): it waits on the zygote's socket too, and must leave the zygote's "ready"
    there for the first fork."""
    launcher = Launcher.start()
    try:
        (zygote,) = wait_for(lambda: children_of(launcher.pid))
        wait_for(lambda: blocked_in_recvmsg(zygote))  # imported, waiting for a request
        launcher.configure(rundir)
        parent, others = serve_one(launcher, rundir, fds)
        assert parent == launcher.pid
        assert others == {zygote}  # forked by the zygote that was ready, not a new one
    finally:
        launcher.close()


SYS_RECVMSG = 47  # x86_64

# In a fresh interpreter, which has not imported msgspec (launcher_start imports nothing of
# the launcher's server: test_startup_imports.py): fork a launcher, wait until its zygote is
# ready (blocked in recvmsg, whose number is its argument), then see whether the launcher
# mapped msgspec's C extension, sending it no request.
EARLY_IMPORT_PROBE = """
import json, os, sys, time
from pathlib import Path
from splitvmm.sandbox.launcher_start import fork

sock, pid = fork()
def until(probe, seconds):
    deadline = time.monotonic() + seconds
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value
(zygote,) = until(lambda: Path(f"/proc/{pid}/task/{pid}/children").read_text().split(), 30)
ready = until(lambda: Path(f"/proc/{zygote}/syscall").read_text().split()[0] == sys.argv[1], 30)
mapped = until(lambda: "msgspec" in Path(f"/proc/{pid}/maps").read_text(), 10)
print(json.dumps({"ours": "msgspec" in sys.modules, "zygote": ready, "launcher": mapped}))
sock.close()
os.waitpid(pid, 0)
"""


def test_launcher_imports_its_server_once_its_zygote_is_ready_before_any_request():
    """Not at the monitor's first request, which comes once the monitor's own imports are
    done: the launcher's imports would then lie between that request and the first device."""
    probe = subprocess.run(
        [sys.executable, "-c", EARLY_IMPORT_PROBE, str(SYS_RECVMSG)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"ours": False, "zygote": True, "launcher": True}


def blocked_in_recvmsg(pid: int) -> bool:
    """/proc/PID/syscall: the number of the system call it is blocked in, first."""
    return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(SYS_RECVMSG)


def wait_for(probe: Callable[[], T], timeout_s: float = 30.0) -> T:
    """The first truthy value `probe` gives, trying every 10 ms."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing from {probe} within {timeout_s} s")
        time.sleep(0.01)
    return value


def serve_one(launcher: Launcher, rundir: Path, fds: dict[str, int]) -> tuple[int, set[int]]:
    """Start a serial device and see it serve: its parent, and the launcher's other
    children meanwhile (its zygote)."""
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)  # forked by a zygote, and serving
        others = children_of(launcher.pid) - {process.pid}
        # not a device of an earlier call, orphaned by its warden's end and not reaped yet
        return parent_of(process.pid), {pid for pid in others if not is_device(pid)}
    finally:
        process.kill()
        process.wait(10)
        channel.close()
        process.close()


def test_launcher_rest_ends_its_zygote_and_the_next_spawn_starts_a_new_one(launcher, rundir, fds):
    _, (zygote,) = serve_one(launcher, rundir, fds)  # ready (imported) and idle
    assert fds_of_zygote(zygote) == ["socket"]
    launcher.rest()
    # ended and reaped (the device's own process may still wait to be: its warden's end
    # made it the launcher's orphan)
    assert zygote not in children_of(launcher.pid)
    launcher.rest()  # resting again: nothing to end
    parent, others = serve_one(launcher, rundir, fds)
    assert parent == launcher.pid
    (new,) = others
    assert new != zygote
    # Started in the middle of a spawn request, while the launcher held that request's
    # fds: it got none of them.
    assert fds_of_zygote(new) == ["socket"]


def is_device(pid: int) -> bool:
    """A device process (named sv-<device>), or one reaped meanwhile."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("sv-")
    except FileNotFoundError:
        return True


def fds_of_zygote(pid: int) -> list[str]:
    """The kinds of a zygote's fds above stdio, having checked stdio (/dev/null in and out;
    fd 2 is the launcher's stderr)."""
    held = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed since
            held[int(fd.name)] = os.readlink(fd)
    assert (held.pop(0), held.pop(1)) == ("/dev/null", "/dev/null")
    del held[2]
    return sorted(target.split(":")[0] for target in held.values())


def test_launcher_start_with_a_thread_running_raises():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(LauncherError, match="before any thread exists"):
            Launcher.start(Path("/nonexistent"))
    finally:
        stop.set()
        thread.join()
        # join() returns before the thread's task leaves /proc/self/task, which the next
        # test's Launcher.start() counts ("before any thread exists"): wait until it has
        deadline = time.monotonic() + 10
        while launcher_start.thread_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)


# -- warm spares (a deferred spec, then resume: monitor/slot.py) --------------------------------
NOTHING_TO_REPLAY = {"applied": 0, "emitted": 0, "skip": 0, "replay": [], "replay_wall_ns": []}


def test_launcher_spare_resumed_says_ready_on_its_channel(launcher, rundir, fds):
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec.spare())
    channel = None
    try:
        launcher.resume(process, replace(spec, resume=NOTHING_TO_REPLAY))
        channel = DeviceChannel("serial", spec.channel, listener)
        channel.wait_ready(process)  # ChannelError, failing the test, if it is not READY
        parent = parent_of(process.pid)
    finally:
        if channel is not None:
            channel.close()
        process.kill()
        process.wait(10)
        process.close()
    assert parent == launcher.pid


def test_launcher_spare_spec_holding_a_state_is_refused(launcher, rundir, fds):
    state = {"model": "serial", "version": 1, "fields": {}}
    spare = replace(serial_spec(rundir, fds), deferred=True, state=state)
    with pytest.raises(DeviceFailure, match="a spare's spec has no state, resume, fault"):
        launcher.spawn(spare)


def test_launcher_resume_of_a_process_not_a_waiting_spare_is_refused(launcher, rundir, fds):
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec)  # a device started whole: no spare
    os.close(listener)
    try:
        with pytest.raises(DeviceFailure, match=f"pid {process.pid} is no spare waiting"):
            launcher.resume(process, spec)
    finally:
        process.kill()
        process.wait(10)
        process.close()


@contextlib.contextmanager
def a_spare(launcher: Launcher, rundir: Path, fds: dict[str, int]) -> Iterator[LaunchedProcess]:
    """A serial device's warm spare, killed at the end (its listener held until then: one
    resumed connects, and ends if nobody listens, which the launcher would report)."""
    process, listener = launcher.spawn(serial_spec(rundir, fds).spare())
    try:
        yield process
    finally:
        process.kill()
        process.wait(10)
        process.close()
        os.close(listener)


NO_REST = json.dumps(dict.fromkeys(DEFERRED)).encode()


@pytest.mark.parametrize(
    ("rest", "with_fd", "why"),
    [
        (b"[]", False, "a spare's rest is not an object of state, resume, fault"),
        (b'{"fault": {"bogus": 1}}', False, "device 'serial0': fault: unknown key 'bogus'"),
        (NO_REST, True, "a spare has its fds already"),
    ],
    ids=["not-an-object", "bad-fault", "with-an-fd"],
)
def test_launcher_resume_outside_what_a_spare_takes_is_refused_and_serves_on(
    launcher, rundir, fds, rest, with_fd, why
):
    """The rest is checked as a spawn's spec is; one that is no object ended the launcher."""
    with a_spare(launcher, rundir, fds) as spare:
        header = {"op": "resume", "id": 7, "pid": spare.pid}
        got = request(launcher, header, rest, [fds["irq"]] if with_fd else [])
    assert got["reply"]["op"] == "refused" and why in got["reply"]["message"]
    serves_a_device(launcher, rundir, fds)


def test_launcher_resumes_a_spare_once(launcher, rundir, fds):
    with a_spare(launcher, rundir, fds) as spare:
        header = {"op": "resume", "pid": spare.pid}
        first = request(launcher, {**header, "id": 7}, NO_REST)
        (rundir / "serial0.sock").unlink()  # the channel's second name: a monitor may remove it
        second = request(launcher, {**header, "id": 8}, NO_REST)
    assert first["reply"] == {"op": "resumed", "id": 7}
    assert second["reply"]["op"] == "refused"
    assert f"pid {spare.pid} is no spare waiting for its spec" in second["reply"]["message"]


def test_launcher_resume_onto_a_channel_path_taken_is_refused_and_serves_on(launcher, rundir, fds):
    """resume_child's link(2) fails (EEXIST): an OSError, which the launcher refuses rather
    than ending on."""
    with a_spare(launcher, rundir, fds) as spare:
        (rundir / "serial0.sock").touch()
        got = request(launcher, {"op": "resume", "id": 7, "pid": spare.pid}, NO_REST)
    assert got["reply"]["op"] == "refused" and "File exists" in got["reply"]["message"]
    (rundir / "serial0.sock").unlink()
    serves_a_device(launcher, rundir, fds)


def request(launcher: Launcher, header: dict[str, object], data: bytes, fds=()) -> dict:
    """One raw request (its header with `fds`, then `data` in chunks) and its reply, read
    with room for more than MAX_MESSAGE: what a reply holds."""
    sock = launcher._sock
    launcher_start.send(sock, {**header, "size": len(data)}, list(fds))
    for i in range(0, len(data), CHUNK):
        launcher_start.send(sock, data[i : i + CHUNK])
    assert readable(sock.fileno(), 30), "no reply within 30 s"
    reply, got, cut = launcher_start.receive(sock, 1 << 20)
    launcher_start.close_all(got)
    assert reply, "the launcher closed its socket: it has exited"
    return {"reply": json.loads(reply), "size": len(reply)}


def serves_a_device(launcher: Launcher, rundir: Path, fds: dict[str, int]) -> None:
    spec = DeviceSpec("serial0", "serial", f"ipc://{rundir}/serial0.sock", fds)
    process, listener = launcher.spawn(spec)
    # Its listener closed only once it is dead: closed first, a device quick to connect ended
    # on its own ("the monitor closed the channel", status 1) before the kill, now and then
    process.kill()
    assert process.wait(10) == -signal.SIGKILL
    process.close()
    os.close(listener)


@pytest.mark.parametrize(
    ("size", "chunks", "with_fd"),
    [
        (10, [b"x" * 20], False),  # past its size: the spec would pass MAX_SPEC
        (10, [b"x" * 5, b""], False),
        (CHUNK + 1, [b"x" * (CHUNK + 1)], False),  # over CHUNK: cut
        (10, [b"x" * 10], True),
    ],
    ids=["past-size", "empty-chunk", "cut-chunk", "chunk-with-fd"],
)
def test_launcher_spec_chunks_that_do_not_make_its_size_are_refused(
    launcher, rundir, fds, size, chunks, with_fd
):
    launcher.check_configured()  # ready and configured: what follows speaks raw
    sock = launcher._sock
    launcher_start.send(sock, {"op": "spawn", "id": 7, "size": size})
    for chunk in chunks:
        launcher_start.send(sock, chunk, [fds["irq"]] if with_fd else [])
    assert readable(sock.fileno(), 30), "no reply within 30 s"
    reply = json.loads(launcher_start.receive(sock, MAX_MESSAGE)[0])
    assert reply == {"op": "refused", "id": 7,
                     "message": f"launcher: the spec's chunks do not make {size} bytes"}  # fmt: skip
    serves_a_device(launcher, rundir, fds)


@pytest.mark.parametrize("role_bytes", [2000, 300_000], ids=["over-MAX_MESSAGE", "over-sndbuf"])
def test_launcher_refusal_quoting_role_names_fits_a_reply(launcher, rundir, fds, role_bytes):
    """A spec naming fds the model does not take is refused with the names it gave: the
    reply must still fit MAX_MESSAGE (the monitor's handle breaks for good on a longer one),
    and one past the socket's send buffer must not end the launcher (EMSGSIZE)."""
    launcher.check_configured()  # ready and configured: what follows speaks raw
    roles = {f"{i}{'r' * role_bytes}": 0 for i in range(2)}
    spec = {"name": "serial0", "model": "serial", "channel": f"ipc://{rundir}/serial0.sock",
            "fds": roles}  # fmt: skip
    got = request(launcher, {"op": "spawn", "id": 7}, json.dumps(spec).encode(),
                  [fds["irq"], fds["out"]])  # fmt: skip
    assert got["reply"]["op"] == "refused" and "model serial takes fds" in got["reply"]["message"]
    assert got["size"] <= MAX_MESSAGE
    # the legitimate client, on the same socket, still served
    serves_a_device(launcher, rundir, fds)


def test_launcher_request_carrying_fewer_fds_than_its_roles_is_refused(launcher, rundir, fds):
    """The spec names the model's roles, the message carries one fd for two: refused, and
    the next request served (zip(..., strict=True) raises ValueError, which no refusal
    catches: the launcher would end)."""
    launcher.check_configured()  # ready and configured: what follows speaks raw
    spec = {"name": "serial0", "model": "serial", "channel": f"ipc://{rundir}/serial0.sock",
            "fds": {"irq": 0, "out": 0}}  # fmt: skip
    got = request(launcher, {"op": "spawn", "id": 7}, json.dumps(spec).encode(), [fds["irq"]])
    assert got["reply"]["op"] == "refused"
    assert "the request names ['irq', 'out'] and carries 1" in got["reply"]["message"]
    serves_a_device(launcher, rundir, fds)


@pytest.mark.parametrize("spare", [False, True], ids=["device", "spare"])
def test_launcher_whose_spawned_reply_cannot_pass_its_fds_refuses_and_serves_on(
    rundir, fds, monkeypatch, spare
):
    """A user's fds in flight over UNIX sockets count, host-wide, against the RLIMIT_NOFILE of
    each of its processes that sends one, unless it holds CAP_SYS_RESOURCE (which a launcher
    gives up): a process of the same user -- another VM's compromised monitor, whose fds wait
    in its own launcher's queue while it reads no reply -- makes the reply's SCM_RIGHTS fail
    with ETOOMANYREFS. The launcher ended on it with a traceback, and its VM's devices with
    it. Here the fds wait in a socket of ours, and the launcher's limit drops below them once
    the zygote has forked the device, as another process's fds would arrive meanwhile."""
    from splitvmm.sandbox import launcher_server  # the forked launcher uses this module

    spawn_child = launcher_server.spawn_child

    def then_over_the_limit(*args, **kwargs):
        spawned = spawn_child(*args, **kwargs)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the launcher's fds are below
        return spawned

    monkeypatch.setattr(launcher_server, "spawn_child", then_over_the_limit)
    launcher = Launcher.start(rundir)
    parking = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        for _ in range(2):  # 400 in flight, never received
            socket.send_fds(parking[0], [b"x"], [null] * 200)
        os.close(null)
        spec = serial_spec(rundir, fds)
        with pytest.raises(DeviceFailure, match="device serial0: .*Too many references"):
            launcher.spawn(spec.spare() if spare else spec)
        assert list(rundir.iterdir()) == []  # its socket removed, as a failed start leaves none
        for sock in parking:
            sock.close()  # the fds in flight go: the next reply passes its own
        serves_a_device(launcher, rundir, fds)
    finally:
        for sock in parking:
            sock.close()
        launcher.close()


def test_monitor_whose_spawn_request_cannot_pass_its_fds_fails_that_spawn_only(
    launcher, rundir, fds, monkeypatch
):
    """The monitor's side of the same limit: a confined monitor holds no CAP_SYS_RESOURCE, so
    another process of its user (another VM's monitor) with fds in flight makes a spawn
    request's SCM_RIGHTS fail with ETOOMANYREFS. Nothing was sent, yet the handle took the
    launcher for one that takes no request, for good: that VM could start no device again,
    no restart either."""
    from splitvmm.sandbox import launcher as launcher_module

    real_send = launcher_module.send

    def over_the_limit_once(sock, msg, fds=()):
        monkeypatch.setattr(launcher_module, "send", real_send)
        raise OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))

    monkeypatch.setattr(launcher_module, "send", over_the_limit_once)
    with pytest.raises(DeviceFailure, match="not sent the request: Too many references"):
        launcher.spawn(serial_spec(rundir, fds))
    serves_a_device(launcher, rundir, fds)


def spawn_on_thread(launcher: Launcher, spec: DeviceSpec) -> tuple[threading.Thread, list]:
    """A spawn on a thread of its own (as a restart's): the thread, and what it came to."""
    outcome: list = []

    def spawn() -> None:
        try:
            outcome.append(launcher.spawn(spec))
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=spawn)
    thread.start()
    wait_for(lambda: launcher._reading)  # sent, and waiting for the reply
    return thread, outcome


def test_launcher_abandon_ends_a_spawn_its_hung_zygote_holds_and_the_launcher_then_ends(
    launcher, rundir, fds, monkeypatch
):
    """A stop while a spawn waits for the zygote (its imports on a loaded host, or a zygote
    that hangs: here, a stopped one) gives the spawn up at once, not after the zygote's fork
    timeout; and the launcher, whose monitor then closes its socket, ends of itself (its
    devices and zygote killed, their last words relayed), not SIGKILLed after STOP_TIMEOUT_S."""
    _, (zygote,) = serve_one(launcher, rundir, fds)  # ready and idle
    os.kill(zygote, signal.SIGSTOP)
    spec = serial_spec(rundir, fds, name="serial1", channel=f"ipc://{rundir}/serial1.sock")
    thread, outcome = spawn_on_thread(launcher, spec)
    wait_for(lambda: (rundir / "serial1.sock").exists())  # in the zygote's hands (below)
    launcher.abandon("the VM is stopping")
    thread.join(5)  # the zygote's fork timeout is 10 s
    assert not thread.is_alive()
    (error,) = outcome
    assert isinstance(error, LauncherError) and str(error) == "the VM is stopping"
    with pytest.raises(LauncherError, match="the VM is stopping"):
        launcher.spawn(serial_spec(rundir, fds))  # nothing is sent any more
    sent: list[int] = []
    real_send_signal = signal.pidfd_send_signal

    def send_signal(pidfd: int, sig: int, *args: object) -> None:
        sent.append(sig)
        real_send_signal(pidfd, sig, *args)

    monkeypatch.setattr(launcher_module.signal, "pidfd_send_signal", send_signal)
    launcher.close()
    assert sent == []


@contextlib.contextmanager
def spawn_abandoned_behind_a_hung_zygote(
    launcher: Launcher, rundir: Path, fds: dict[str, int]
) -> Iterator[tuple[LaunchedProcess, int, list]]:
    """A serial device serving, then a second spawn that its stopped zygote holds, given up by
    a stop (abandon): the serving device's process, the zygote's pid, what the spawn came to."""
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)
        (zygote,) = children_of(launcher.pid) - {process.pid}
        os.kill(zygote, signal.SIGSTOP)
        thread, outcome = spawn_on_thread(launcher, serial_spec(rundir, fds, name="serial1",
                                          channel=f"ipc://{rundir}/serial1.sock"))  # fmt: skip
        # The launcher listens on a spawn's channel just before it asks its zygote: the spawn
        # is in the zygote's hands then. A spawn it reads only after the stop it refuses
        # before the zygote (launcher_server.py), and that zygote would hold nothing.
        wait_for(lambda: (rundir / "serial1.sock").exists())
        launcher.abandon("the VM is stopping")
        thread.join(5)
        assert isinstance(outcome[0], LauncherError)
        yield process, zygote, outcome
    finally:
        channel.close()
        process.close()


def test_launcher_reply_to_an_abandoned_spawn_leaves_the_other_devices_reports_whole(
    launcher, rundir, fds
):
    """The zygote answers after all: the spawned reply comes to nobody (the stop gave the
    request up), and must not break the handle, whose exit reports the teardown still reads
    to reap every other device."""
    with spawn_abandoned_behind_a_hung_zygote(launcher, rundir, fds) as (process, zygote, _):
        os.kill(zygote, signal.SIGCONT)  # it forks serial1 now, and the launcher replies
        wait_for(lambda: len(children_of(launcher.pid) - {process.pid, zygote}) > 0)
        process.kill()
        assert process.wait(10) == -signal.SIGKILL  # reported, the late reply filed on the way


def test_launcher_abandon_after_close_writes_to_no_fd(rundir):
    """A stop signal may come during the teardown, after the launcher's handle closed: its
    eventfd is gone, and its number may be another file's by then."""
    launcher = Launcher.start(rundir)
    launcher.close()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # likely the eventfd's number, reused
    try:
        launcher.abandon("the VM is stopping")
        assert not readable(r, 0)
    finally:
        os.close(r)
        os.close(w)


def test_launcher_abandon_lets_the_teardown_reap_a_running_device_before_the_zygote_answers(
    launcher, rundir, fds, monkeypatch
):
    """A restart's spawn waits for a hung zygote while another device runs, and the VM stops.
    The teardown kills that device and waits for the launcher's report of its end before it
    closes the launcher's socket (machine.py close: _end_devices, then the closables). The
    launcher, single-threaded, sat in the zygote's fork timeout (10 s; 30 s for a new zygote's
    imports) and reported nothing meanwhile. The abandoning handle shuts its sending side as it
    goes on receiving: that ends the launcher's wait, and it reports ends as before. The handle
    here gives the launcher less than the zygote's timeout to report the end."""
    monkeypatch.setattr(launcher_module, "REPLY_TIMEOUT_S", 4.0)
    with spawn_abandoned_behind_a_hung_zygote(launcher, rundir, fds) as (process, zygote, _):
        process.kill()  # the teardown's _end_devices
        assert process.wait(10) == -signal.SIGKILL  # reported, not "did not answer within 4 s"
        assert zygote not in children_of(launcher.pid)  # the wait for it ended: killed, reaped


@pytest.mark.skipif(os.geteuid() != 0, reason="a root launcher's capabilities need root")
def test_root_launchers_device_on_a_users_terminal_leaves_the_shells_description_blocking(
    launcher, rundir, fds, monkeypatch
):
    """`sudo splitvmm up` in a user's terminal (sudo without use_pty, su): stdout is the
    user's terminal, which a root device holding CAP_SETFCAP alone cannot open anew for a
    description of its own. It made the one it shares with the operator's shell non-blocking
    for the VM's life instead (fdline.py), and said so at every start."""
    from splitvmm.config import DeviceSection
    from splitvmm.monitor import devicefds

    master, terminal = os.openpty()
    os.fchown(terminal, 65534, 65534)
    os.fchmod(terminal, 0o620)
    monkeypatch.setattr(devicefds, "STDOUT", terminal)
    owned: list[devicefds.Closable] = []
    dev = DeviceSection("serial0", "serial", "stop", {"output": "stdio"})
    out = devicefds.open_output(dev, "output", owned)  # the monitor, before its confinement
    spec = serial_spec(rundir, {**fds, "out": out})
    try:
        process, listener = launcher.spawn(spec)
        channel = DeviceChannel("serial", spec.channel, listener)
        try:
            channel.wait_ready(process)
            flags = fcntl.fcntl(terminal, fcntl.F_GETFL)
            process.kill()
            process.wait(10)
        finally:
            channel.close()
            process.close()
    finally:
        for each in owned:
            each.close()
        os.close(master)
        os.close(terminal)
    assert not flags & os.O_NONBLOCK


# A launcher started with the pty given as its stderr (its fd 2, as the monitor's): prints its
# pid, then holds it until its stdin ends.
STDERR_PROBE = """
import sys
from pathlib import Path
from splitvmm.sandbox.launcher import Launcher
launcher = Launcher.start(Path(sys.argv[1]))
launcher.check_configured()
print(launcher.pid, flush=True)
sys.stdin.read()
launcher.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root launcher's capabilities need root")
def test_root_launcher_on_a_users_terminal_has_a_description_of_its_own_to_write_to(rundir):
    """`sudo splitvmm up` in a user's terminal: the launcher's lines (its own, the devices'
    it relays) must never wait for the terminal (stderrlog.py), so they go through a
    non-blocking description of its own. It made that at its first line, once it held
    CAP_SETFCAP alone and could no longer open the user's 0620 pty: its lines then waited on
    the description it shares with the operator's shell. It is made before it narrows."""
    master, terminal = os.openpty()
    os.fchown(terminal, 65534, 65534)
    os.fchmod(terminal, 0o620)
    pty = os.ttyname(terminal)
    probe = subprocess.Popen(
        [sys.executable, "-c", STDERR_PROBE, str(rundir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    try:
        assert probe.stdout is not None
        pid = int(probe.stdout.readline())
        held = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == pty:
                    info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                    flags = next(int(line.split()[1], 8) for line in info if "flags:" in line)
                    held[int(fd)] = bool(flags & os.O_NONBLOCK)
    finally:
        probe.communicate(timeout=30)
        os.close(master)
        os.close(terminal)
    own = [fd for fd, nonblocking in held.items() if fd != 2 and nonblocking]
    assert (held.get(2), len(own)) == (False, 1), held


# -- devices run as another host user (config.py vm.device_uid) -------------------------------
NOBODY = (65534, 65534)
needs_root_for_users = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root starts a process as another user"
)


@pytest.fixture
def launcher_for_nobody(rundir: Path) -> Iterator[Launcher]:
    rundir.chmod(0o711)  # as the monitor makes it for such a VM (monitor/rundir.py)
    launcher = Launcher.start()
    launcher.configure(rundir, (), NOBODY)
    yield launcher
    launcher.close()


@needs_root_for_users
def test_launcher_configured_for_another_user_starts_its_devices_as_that_user(
    launcher_for_nobody, rundir, fds
):
    """Each device becomes the user before its namespaces (sandbox/device.py _become); its
    channel's socket lets that user connect (0602), in a runtime dir it may only search."""
    spec = serial_spec(rundir, fds, user=NOBODY)
    process, listener = launcher_for_nobody.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        mode = stat.S_IMODE(os.stat(rundir / "serial0.sock").st_mode)
        process.kill()
        process.wait(10)
    finally:
        channel.close()
        process.close()
    assert [line.split()[1:] for line in status if line.startswith(("Uid:", "Gid:"))] == [
        ["65534"] * 4,
        ["65534"] * 4,
    ]
    assert mode == 0o602


@needs_root_for_users
def test_launcher_for_another_user_and_its_zygote_keep_what_becoming_it_needs(
    launcher_for_nobody, rundir, fds
):
    """CAP_SETUID and CAP_SETGID (each device becomes the user with them) and CAP_KILL (the
    launcher ends such devices) stay in a VM whose devices run as another user."""
    held = held_by_launcher_and_zygote(launcher_for_nobody, serial_spec(rundir, fds, user=NOBODY))
    kept = (1 << CAP_SETFCAP) | FOR_ANOTHER_USER
    holds = {"CapEff": kept, "CapPrm": kept, "CapBnd": kept, "CapInh": 0, "CapAmb": 0}
    assert held == {"launcher": holds, "zygote": holds}


@needs_root_for_users
def test_launcher_for_another_user_starts_no_device_as_ours(launcher_for_nobody, rundir, fds):
    """The configure says which user the VM's devices are, once: a spawn that names another
    (or none) is refused."""
    with pytest.raises(DeviceFailure, match=r"would run as None, the VM's devices as \(65534"):
        launcher_for_nobody.spawn(serial_spec(rundir, fds))


def test_launcher_for_our_user_starts_no_device_as_another(launcher, rundir, fds):
    with pytest.raises(
        DeviceFailure, match=r"would run as \(65534, 65534\), the VM's devices as None"
    ):
        launcher.spawn(serial_spec(rundir, fds, user=NOBODY))


@needs_root_for_users
@pytest.mark.parametrize(
    ("parent_mode", "dir_mode", "user", "why"),
    [
        (0o700, 0o711, None, "is not ours alone"),  # searchable only for another user's devices
        (0o700, 0o755, NOBODY, "is not ours alone"),  # and even then listed by no one
        (0o755, 0o711, NOBODY, "its parent is not ours alone"),
        (0o700, 0o711, (0, 1), "device_user is not \\[uid, gid\\], neither 0"),
        (0o700, 0o711, (1, 2**32 - 1), "device_user is not \\[uid, gid\\], neither 0"),
    ],
    ids=["0711-for-ours", "0755", "open-parent", "root", "gid-minus-one"],
)
def test_launcher_configure_for_another_user_refused(rundir, fds, parent_mode, dir_mode, user, why):
    rundir.parent.chmod(parent_mode)
    rundir.chmod(dir_mode)
    launcher = Launcher.start()
    try:
        launcher.configure(rundir, (), user)
        with pytest.raises(DeviceFailure, match=why):
            launcher.check_configured()
    finally:
        launcher.close()
        rundir.parent.chmod(0o700)


@needs_root_for_users
def test_devices_of_another_user_die_with_their_launcher(rundir, fds):
    """PR_SET_PDEATHSIG: a launcher killed (the OOM killer; the monitor's death, through its
    own parent-death signal) takes its wardens with it, whoever they run as."""
    rundir.chmod(0o711)
    launcher = Launcher.start()
    launcher.configure(rundir, (), NOBODY)
    spec = serial_spec(rundir, fds, user=NOBODY)
    process, listener = launcher.spawn(spec)
    channel = DeviceChannel("serial", spec.channel, listener)
    try:
        channel.wait_ready(process)
        os.kill(launcher.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _state(process.pid) not in ("Z", None):
            time.sleep(0.05)
        state = _state(process.pid)
    finally:
        if _state(process.pid) not in ("Z", None):
            os.kill(process.pid, signal.SIGKILL)
        channel.close()
        with contextlib.suppress(Exception):
            launcher.close()
    assert state in ("Z", None)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


# -- what a compromised monitor asks of its launcher ------------------------------------------
def test_launcher_refuses_a_device_named_after_the_control_socket(launcher, rundir, fds):
    """config.py refuses the name "control" (its channel would be the VM's control.sock); a
    compromised monitor asks the launcher directly, which refused nothing but NAME_RE."""
    spec = DeviceSpec("control", "serial", f"ipc://{rundir}/control.sock", fds)
    with pytest.raises(DeviceFailure, match="device name 'control' is reserved"):
        launcher.spawn(spec)
    assert not (rundir / "control.sock").exists()
    serves_a_device(launcher, rundir, fds)


@pytest.mark.parametrize(
    "header",
    [{"models": ["no-such-model"], "device_user": None}, {"models": [], "device_user": [0, 0]}],
    ids=["bad-models", "root-as-device-user"],
)
def test_launcher_configure_refused_in_its_header_is_the_only_one(rundir, fds, header):
    """The first configure decides, refused or not; one refused for its header (a model it
    does not know, a device user of 0) left the next configure free to set another dir."""
    launcher = Launcher.start()
    try:
        assert readable(launcher._sock.fileno(), 30), "no ready within 30 s"
        ready = launcher_start.receive(launcher._sock, MAX_MESSAGE)[0]
        assert json.loads(ready) == {"op": "ready"}  # what follows speaks raw
        got = request(launcher, {"op": "configure", "id": 1, **header}, str(rundir).encode())
        assert got["reply"]["op"] == "refused"
        while readable(launcher._sock.fileno(), 1):  # a header refused leaves its spec unread,
            launcher_start.receive(launcher._sock, MAX_MESSAGE)  # taken then as a request
        got = request(
            launcher,
            {"op": "configure", "id": 2, "models": [], "device_user": None},
            str(rundir).encode(),
        )
        assert got["reply"] == {
            "op": "refused", "id": 2, "message": "launcher: the runtime dir was set already"
        }  # fmt: skip
        # read whole, though refused: no part of it is taken as a request of its own
        assert not readable(launcher._sock.fileno(), 1)
    finally:
        launcher.close()


def test_launcher_resume_whose_channel_name_is_taken_is_refused_naming_the_channel(
    launcher, rundir, fds
):
    """A spare's socket takes the channel's name by a link made through the runtime dir's fd
    (/proc/self/fd/N/NAME); a refusal names the channel's own path, not that one."""
    spec = serial_spec(rundir, fds)
    process, listener = launcher.spawn(spec.spare())
    try:
        (rundir / "serial0.sock").touch()  # something has the channel's name
        with pytest.raises(DeviceFailure) as refused:
            launcher.resume(process, replace(spec, resume=NOTHING_TO_REPLAY))
    finally:
        process.kill()
        process.wait(10)
        process.close()
        os.close(listener)
    assert str(refused.value) == (
        f"device serial0: its spare's socket cannot take the name {rundir}/serial0.sock: "
        "File exists"
    )


def test_launcher_makes_no_socket_in_a_runtime_dir_made_anew_at_its_path(launcher, rundir, fds):
    """A compromised monitor may empty and remove its runtime dir (its Landlock domain lets it
    remove what is there, and the dir itself); another `up` of the VM's name then makes the
    dir anew at the same path. The launcher made its sockets by the path, in the new VM's dir,
    where the new VM's own sockets then could not be made. It makes them in the dir it was
    configured with, held open, which takes no new name once removed."""
    launcher.check_configured()
    rundir.rmdir()
    rundir.mkdir(mode=0o700)  # the next VM's
    with pytest.raises(DeviceFailure, match="cannot make the device channel"):
        launcher.spawn(serial_spec(rundir, fds))
    assert list(rundir.iterdir()) == []
