"""The monitor's own confinement (monitor/confinement.py), seen from outside a running VM:
its /proc status, what Landlock and seccomp let it do, and a VM run by an unprivileged user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, vm_toml
from tests.integration.vmproc import VmProcess, boot_guest, comm
from tests.setpriv import needs_setpriv, under_setpriv

pytestmark = pytest.mark.kvm

TEST_USER = "splitvmm-test"  # created by the test, in the kvm group


def status_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_running_monitor_holds_no_capability_and_every_thread_is_filtered(guests, tmp_path):
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=100000"'
    config.write_text(vm_toml(boot, vcpus=2, serial_out=serial))  # vcpu1 waits for a SIPI
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    try:
        vm.wait_for(r"^count=\d+")
        pid = json.loads(vm.ctl("status", "--json").stdout)["pid"]
        status = status_fields(Path(f"/proc/{pid}/status"))
        tasks = [status_fields(t / "status") for t in Path(f"/proc/{pid}/task").iterdir()]
    finally:
        vm.ctl("suspend", str(tmp_path / "end"))
        vm.finish()
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    if os.geteuid() == 0:  # a root monitor also empties its bounding set
        assert int(status["CapBnd"], 16) == 0
    assert all(t["Seccomp"] == "2" and t["NoNewPrivs"] == "1" for t in tasks)
    assert all(int(t["CapEff"], 16) == 0 for t in tasks)
    # The two vCPU threads stack vcpu.policy on the monitor's filter (KVM's own worker
    # threads, "kvm-nx-lpage-recovery", are made by a vCPU's first KVM_RUN and inherit it).
    ours = [int(t["Seccomp_filters"]) for t in tasks if not t["Name"].startswith("kvm-")]
    assert sorted(ours)[-3:] == [1, 2, 2]


def test_monitor_with_eight_vcpus_runs_suspends_and_leaves_no_runtime_dir(guests, tmp_path):
    # Thirteen threads allocate: more than glibc's first 8 malloc arenas, so it sizes the
    # pool from the CPU mask (sched_getaffinity), once, from whichever thread comes next.
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=100000"'
    config.write_text(vm_toml(boot, vcpus=8, serial_out=serial))  # vcpu1-7 wait for a SIPI
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^count=\d+")
    suspended = vm.ctl("suspend", str(tmp_path / "end"))
    status, err = vm.finish()
    assert (suspended.returncode, status) == (0, 0), err
    # Emptied and removed at tear-down, by a monitor that may remove nothing else.
    assert list((tmp_path / "run" / "splitvmm").iterdir()) == []


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_running_vm_devices_are_the_launchers_children_not_the_monitors(guests, tmp_path):
    vm = boot_guest(tmp_path, guests["counter"])
    try:
        vm.wait_for(r"^count=\d+")
        status = json.loads(vm.ctl("status", "--json").stdout)
        wardens = [d["pid"] for d in status["devices"]]
        parents = {parent_of(pid) for pid in wardens}
        launcher = min(parents)
        # Once every device has started, the monitor lets the launcher end its zygote (rest);
        # the launcher then closes the zygote's socket and reaps (reading its children from
        # /proc for a moment): its fds are looked at once that is done.
        deadline = time.monotonic() + 10
        while set(map(int, children_of(launcher))) != set(wardens):
            assert time.monotonic() < deadline, "the zygote did not end once the VM ran"
            time.sleep(0.02)
        while _busy(launcher, wardens) and time.monotonic() < deadline:
            time.sleep(0.02)  # (one that stays busy fails on its fds below)
        launcher_status = status_fields(Path(f"/proc/{launcher}/status"))
        launcher_fds = fds_of(launcher)
        names = {
            d["name"]: (comm(d["pid"]), comm(int(children_of(d["pid"])[0])))
            for d in status["devices"]
        }
    finally:
        vm.ctl("suspend", str(tmp_path / "end"))
        vm.finish()
    assert len(parents) == 1 and launcher != status["pid"]
    assert launcher_status["PPid"] == str(status["pid"])
    # no_new_privs, no filter of its own (its devices would inherit it)
    assert (launcher_status["NoNewPrivs"], launcher_status["Seccomp"]) == ("1", "0")
    # nothing of the VM: what it keeps, and only that (_launcher_fd_kinds)
    rundir = str(tmp_path / "run" / "splitvmm" / "test")
    assert kinds_of(launcher_fds) == _launcher_fd_kinds(wardens, rundir)
    # Each warden is the small warden program; each device is named after itself in ps.
    assert names == {name: ("warden", f"sv-{name}") for name in names}


def _launcher_fd_kinds(wardens: list[int], rundir: str = "") -> list[str]:
    """/dev/null, stderr (a pipe here: vmproc.py) and its own description of that pipe for
    its lines (sandbox/launcher_start.py _own_stderr), its socket to the monitor (its
    zygote's went with the zygote), its SIGCHLD wake-up pipe, the VM's runtime dir, in which
    it makes the devices' sockets (sandbox/launcher_server.py channel_dir_fd), and a pidfd
    and a stderr pipe (sandbox/relay.py) per device."""
    return sorted(
        ["anon_inode:[pidfd]"] * len(wardens) + ["pipe"] * (3 + len(wardens)) + ["socket", rundir]
    )


def _busy(launcher: int, wardens: list[int]) -> bool:
    """Whether the launcher holds more than it keeps (the zygote's socket not closed yet, its
    children's /proc file open while it reaps)."""
    try:
        return len(kinds_of(fds_of(launcher))) > len(_launcher_fd_kinds(wardens))
    except FileNotFoundError:  # an fd closed while we read them
        return True


def children_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def fds_of(pid: int) -> dict[int, str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {int(fd.name): os.readlink(fd) for fd in fd_dir.iterdir()}


def kinds_of(fds: dict[int, str]) -> list[str]:
    """The kinds of the fds above stdio, having checked stdio: /dev/null as stdin and stdout;
    fd 2 is the stderr its parent gave it (the launcher's relay pipe, for a device)."""
    assert (fds.pop(0), fds.pop(1)) == ("/dev/null", "/dev/null")
    del fds[2]
    return sorted(t if t.startswith("anon_inode") else t.split(":")[0] for t in fds.values())


def test_monitor_killed_takes_launcher_and_devices_along(guests, tmp_path):
    vm = boot_guest(tmp_path, guests["counter"])
    try:
        vm.wait_for(r"^count=\d+")
        devices = json.loads(vm.ctl("status", "--json").stdout)["devices"]
        wardens = [d["pid"] for d in devices]  # the serial device and the default rtc
        pidfds = [os.pidfd_open(pid) for pid in (parent_of(wardens[0]), *wardens)]
        vm.proc.kill()  # SIGKILL: the monitor cleans nothing up
        ended = [bool(select.select([fd], [], [], 10)[0]) for fd in pidfds]
    finally:
        vm.finish()
    for fd in pidfds:
        os.close(fd)
    assert ended == [True] * (1 + len(wardens))  # PR_SET_PDEATHSIG: monitor, launcher, warden


def test_running_vm_device_killed_stops_vm_with_its_status_from_the_launcher(guests, tmp_path):
    # After its first line the guest counts for hours without I/O: no read of the device is
    # in flight when it dies (one would fail first, on its deadline).
    vm = boot_guest(tmp_path, guests["counter"], "period=1000000000000")
    try:
        vm.wait_for(r"^counter: period=")
        devices = json.loads(vm.ctl("status", "--json").stdout)["devices"]
        device = next(d for d in devices if d["name"] == "serial0")
        os.kill(device["pid"], signal.SIGKILL)  # its warden: the pid the monitor knows
    finally:
        status, stderr = vm.finish()
    # The confined monitor's supervisor saw the pidfd and asked the launcher how it ended.
    assert status == 4, stderr
    assert "device serial0 failed: process was killed by signal 9" in stderr


def test_device_stderr_reaches_the_operator_named_by_the_launcher_and_escaped(guests, tmp_path):
    """A device's fd 2 is a pipe the launcher reads, not the operator's terminal: what a
    device (one a guest took over, say) writes there comes out as its line, named by the
    launcher, with escape sequences shown as text (it wrote the clipboard through OSC 52, and
    lines that read as the monitor's). The test writes into that pipe as the device would."""
    vm = boot_guest(tmp_path, guests["counter"], "period=1000000000000")
    try:
        vm.wait_for(r"^counter: period=")
        devices = json.loads(vm.ctl("status", "--json").stdout)["devices"]
        warden = next(d["pid"] for d in devices if d["name"] == "serial0")
        stderr_of_device = os.readlink(f"/proc/{warden}/fd/2")
        flags = int(Path(f"/proc/{warden}/fdinfo/2").read_text().split()[3], 8)
        launcher_holds = set(fds_of(parent_of(warden)).values())
        fd = os.open(f"/proc/{warden}/fd/2", os.O_WRONLY)
        try:
            os.write(fd, b"\x1b]52;c;cHduZWQ=\x07\x1b[2Jsplitvmm: error: fake\n")
        finally:
            os.close(fd)
        time.sleep(0.5)  # the launcher relays it
    finally:
        status, stderr = vm.stop()
    assert stderr_of_device.startswith("pipe:") and stderr_of_device in launcher_holds
    # blocking, as a terminal is: a traceback written while the launcher is busy waits
    assert not flags & os.O_NONBLOCK
    assert "\x1b" not in stderr, repr(stderr)
    shown = "splitvmm: device serial0: \\x1b]52;c;cHduZWQ=\\x07\\x1b[2Jsplitvmm: error: fake\n"
    assert shown in stderr, stderr


PROBE = textwrap.dedent(
    """
    import ctypes, errno, os, resource, shutil, socket, sys, threading
    from pathlib import Path
    import splitvmm
    from splitvmm.monitor.confinement import Confinement
    from splitvmm.monitor.slot import DeviceSlot, Spawn
    from splitvmm.native.eventfd import EventFd
    from splitvmm.sandbox.launcher import Launcher
    run, snaps, outside, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    launcher = Launcher.start(run)  # first, as the machine does
    irq, (out_r, out_w) = EventFd(), os.pipe()  # a device's fds, made before confinement
    if step == "pci":  # a VM and a PCI function's notify eventfd, made before confinement
        from splitvmm.monitor.bus import Bus
        from splitvmm.monitor.irqroutes import GsiRoutes, MsiVectors
        from splitvmm.monitor.pci.function import PciFunctionHost
        from splitvmm.monitor.pci.root import Ecam, PciRoot
        from splitvmm.native.kvm import Kvm
        from splitvmm.protocol.models import virtio_function
        kvm = Kvm()
        vm = kvm.create_vm()
        vm.create_irqchip()
        routes = GsiRoutes(vm)
        vectors = MsiVectors("blk0", routes, routes.allocate(2, "blk0"))
        root, mmio = PciRoot(), Bus("mmio")
        bases = {0: 0xC0000000, 1: 0xC0004000}
        host = PciFunctionHost("blk0", virtio_function(1), (1, bases), mmio, vm, (irq.fd,))
        host.plug(root)
    progress = os.memfd_create("progress")  # a device's progress page (FdKind.PROGRESS)
    os.ftruncate(progress, 4096)
    c = Confinement(launcher_fd=launcher.fileno())
    if step == "thread-first":  # a thread made before confinement would stay unconfined
        release = threading.Event()
        early = threading.Thread(target=release.wait)
        early.start()
        try:
            c.confine_process(run, [snaps])
            outcome = None
        except Exception as e:
            outcome = str(e)
        release.set()
        early.join()
        print(repr({"refused": outcome}))
        sys.exit(0)
    if step == "no-landlock":  # a kernel without it
        from splitvmm.native import landlock
        def unavailable(rules):
            raise landlock.LandlockUnavailable(errno.EOPNOTSUPP, "Landlock is not enabled")
        landlock.restrict_self = unavailable
        try:
            landlocked = c.confine_process(run, [snaps])
        except Exception as e:
            print(repr({"refused": str(e)}))
            sys.exit(0)
        created = open(outside + ".new", "w") is not None
        print(repr({"refused": None, "created_outside": created, "landlocked": landlocked}))
        sys.exit(0)
    assert c.confine_process(run, [snaps]) is True
    def refused(fn):
        try:
            fn()
        except PermissionError:
            return True
        return False
    results = {}
    if step == "files":
        from splitvmm.native import landlock
        abi = landlock.abi_version()
        results = {
            "read_outside": refused(lambda: open(outside).read()),
            "create_outside": refused(lambda: open(Path(outside).parent / "new", "w")),
            "create_in_snapshot_dir": not refused(lambda: (snaps / "s").mkdir()),
            "read_in_snapshot_dir": refused(lambda: (snaps / "other-vm" / "ram.bin").read_bytes()),
            "symlink_in_snapshot_dir": refused(lambda: (snaps / "s" / "l").symlink_to("/")),
            "create_in_runtime_dir": refused(lambda: (run / "f").write_text("x")),
            "remove_in_another_vms_runtime_dir": refused(
                lambda: (run.parent / "other-vm" / "control.sock").unlink()
            ),
            # (Landlock has a truncate right to withhold from ABI 3 on)
            "truncate_in_snapshot_dir": abi < 3
            or refused(lambda: os.truncate(snaps / "other-vm" / "ram.bin", 0)),
            "write_own_code": refused(
                lambda: os.close(os.open(splitvmm.__file__, os.O_WRONLY | os.O_APPEND))
            ),
            "read_own_code": not refused(lambda: Path(splitvmm.__file__).read_bytes()),
            # no core file of guest RAM, no ptrace: prctl(PR_GET_DUMPABLE), RLIMIT_CORE
            "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
            "core_limit": resource.getrlimit(resource.RLIMIT_CORE),
        }
    if step == "tsync":  # a thread made before the filter is loaded is held by it too
        go = threading.Event()
        def late_socket():
            go.wait()
            socket.socket(socket.AF_UNIX)
        early = threading.Thread(target=late_socket)
        early.start()
    c.load_monitor_filter()
    if step == "tsync":
        go.set()
        early.join()
    if step == "socket":
        socket.socket(socket.AF_UNIX)  # seccomp: the process dies here
    if step == "exec":
        os.execv("/bin/true", ["true"])
    if step == "o-path":  # Landlock checks no O_PATH open: the filter refuses it
        os.open(outside, os.O_PATH | os.O_CLOEXEC)
    if step == "ioctl-only":  # nor one in access mode 3 (O_WRONLY|O_RDWR)
        os.open(outside, os.O_ACCMODE | os.O_CLOEXEC)
    if step == "threads":  # more threads allocate than glibc has arenas: it counts the CPUs
        barrier = threading.Barrier(17)
        def allocate():
            results.setdefault("allocated", []).append(len(bytes(64 << 10)))
            barrier.wait()
        threads = [threading.Thread(target=allocate) for _ in range(16)]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join()
        results["allocated"] = len(results["allocated"])
    if step == "device":  # spawned by the launcher for a monitor confined in every way
        fds = {"irq": irq.fd, "out": out_w}
        spawn = Spawn("serial0", "serial", 8, {"output": "stdio"}, fds)
        slot = DeviceSlot(spawn, run, launcher.spawn, lambda slot, why: print(why))
        slot.start()
        slot.wait_ready()
        slot.write(7, b"Z")  # the UART's scratch register
        results = {"scratch": slot.read(7, 1).decode(), "generation": slot.generation}
        process = slot.process
        process.kill()
        results["status"] = process.wait(10)  # from the launcher: it is not our child
        slot.close()
        launcher.close()
        print(repr(results))
        sys.exit(0)
    def vcpu():
        c.confine_vcpu_thread()
        if step == "files":
            results["vcpu_open"] = refused(lambda: open(snaps / "s" / "x", "w"))
        if step == "pci":  # a guest's BAR move and a device's MSI-X route, from a vCPU
            Ecam(root).write(1 << 15 | 0x10, (0xD0000000).to_bytes(4, "little"))
            results["decoding"] = dict(sorted(host.decoding().items()))
            results["msi"] = vectors.route(0, 0xFEE00000, 0x41)
        if step == "threads":  # past glibc's largest mmap threshold: realloc is an mremap
            big = bytearray(40 << 20)
            big.append(1)
            results["vcpu_large_buffer"] = len(big)
            # past a forwarded access's deadline: is the device inside a host I/O call?
            results["vcpu_reads_host_io_flag"] = os.pread(progress, 1, 64)
    t = threading.Thread(target=vcpu)
    t.start(); t.join()
    if step == "files":
        results["monitor_open_after_vcpu"] = not refused(lambda: open(snaps / "s" / "y", "w"))
        # what a snapshot writer does to publish its directory, and to drop one it aborts
        renamed = snaps / "published"
        results["rename_and_remove_in_snapshot_dir"] = not refused(
            lambda: (os.rename(snaps / "s", renamed), shutil.rmtree(renamed))
        )
        results["runtime_dir_removed"] = not refused(lambda: shutil.rmtree(run))
    print(repr(results))
    """
)


def run_probe(
    tmp_path: Path, step: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The probe confines itself with runtime dir root/vm (as RuntimeDir makes it) and one
    snapshot dir, which already holds another VM's snapshot."""
    run, snaps, other = tmp_path / "root" / "vm", tmp_path / "snaps", tmp_path / "other"
    for d in (run, snaps / "other-vm", other, run.parent / "other-vm"):
        d.mkdir(parents=True)
    run.chmod(0o700)  # as RuntimeDir makes it, which the launcher checks
    (run.parent / "other-vm" / "control.sock").touch()  # another VM's, beside ours
    (other / "secret").write_text("secret\n")
    (snaps / "other-vm" / "ram.bin").write_bytes(b"guest RAM")
    (run / "control.sock").touch()
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(run), str(snaps), str(other / "secret"), step],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_confinement_landlock_allows_only_what_the_running_monitor_does(tmp_path):
    r = run_probe(tmp_path, "files")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr(
        {
            "read_outside": True,
            "create_outside": True,
            "create_in_snapshot_dir": True,
            "read_in_snapshot_dir": True,  # refused: another VM's snapshot stays private
            "symlink_in_snapshot_dir": True,
            "create_in_runtime_dir": True,  # refused: the runtime dir is only torn down
            "remove_in_another_vms_runtime_dir": True,  # its parent: only ours is removed
            "truncate_in_snapshot_dir": True,  # refused: another VM's snapshot stays whole
            "write_own_code": True,  # refused: Python's and splitvmm's code are read only
            "read_own_code": True,  # lazy imports, a traceback's source lines
            "dumpable": 0,
            "core_limit": (0, 0),
            "vcpu_open": True,
            "monitor_open_after_vcpu": True,
            "rename_and_remove_in_snapshot_dir": True,
            "runtime_dir_removed": True,
        }
    )
    assert not (tmp_path / "root" / "vm").exists()


def test_confinement_without_landlock_refuses_to_run_naming_the_way_out(tmp_path):
    """The monitor's filter allows open, unlink and rename: Landlock is its only file-system
    barrier, and a monitor without it would run a guest with the host's files open."""
    r = run_probe(tmp_path, "no-landlock")
    assert r.returncode == 0, r.stderr
    refused = eval(r.stdout)["refused"]
    assert "this kernel has no Landlock" in refused
    assert "SPLITVMM_MONITOR_LANDLOCK=optional runs it anyway" in refused


def test_confinement_without_landlock_runs_when_the_operator_says_optional(tmp_path):
    r = run_probe(tmp_path, "no-landlock", {"SPLITVMM_MONITOR_LANDLOCK": "optional"})
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == {"refused": None, "created_outside": True, "landlocked": False}
    assert "no Landlock on this kernel" in r.stderr


def test_confinement_landlock_mode_not_known_is_refused(tmp_path):
    r = run_probe(tmp_path, "no-landlock", {"SPLITVMM_MONITOR_LANDLOCK": "off"})
    assert "SPLITVMM_MONITOR_LANDLOCK='off': expected required or optional" in r.stderr


def test_confinement_seccomp_mode_not_known_is_refused(tmp_path):
    """A mistyped mode is not taken as "log": the filter would kill nothing."""
    r = run_probe(tmp_path, "no-landlock", {"SPLITVMM_MONITOR_SECCOMP": "kil"})
    assert "SPLITVMM_MONITOR_SECCOMP='kil': expected kill or log" in r.stderr


def test_confinement_with_a_thread_running_is_refused(tmp_path):
    """Capabilities and Landlock hold the calling thread and those it makes later: a thread
    already running would keep what the monitor gave up."""
    r = run_probe(tmp_path, "thread-first")
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == {
        "refused": "the monitor must confine itself before it starts a thread"
    }


def test_confinement_seccomp_holds_a_thread_made_before_the_filter_loaded(tmp_path):
    r = run_probe(tmp_path, "tsync")
    assert r.returncode == -signal.SIGSYS, r.stderr


def test_confinement_seccomp_lets_many_threads_allocate_and_vcpu_grow_a_buffer(tmp_path):
    r = run_probe(tmp_path, "threads")
    assert r.returncode == 0, r.stderr  # -SIGSYS: sched_getaffinity or mremap was refused
    assert r.stdout.strip() == repr(
        {"allocated": 16, "vcpu_large_buffer": (40 << 20) + 1, "vcpu_reads_host_io_flag": b"\0"}
    )


@pytest.mark.parametrize("step", ["socket", "exec", "o-path", "ioctl-only"])
def test_confinement_seccomp_kills_monitor_that_makes_a_socket_execs_or_opens_for_no_io(
    tmp_path, step
):
    r = run_probe(tmp_path, step)
    assert r.returncode == -signal.SIGSYS, r.stderr


def test_confined_vcpu_moves_a_bar_and_routes_an_msi(tmp_path):
    r = run_probe(tmp_path, "pci")
    assert r.returncode == 0, r.stderr  # -SIGSYS: KVM_IOEVENTFD or KVM_SET_GSI_ROUTING refused
    assert r.stdout.strip() == repr({"decoding": {0: 0xD0000000, 1: 0xC0004000}, "msi": ""})


def test_confined_monitor_gets_a_working_device_from_the_launcher(tmp_path):
    r = run_probe(tmp_path, "device")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr({"scratch": "Z", "generation": 1, "status": -signal.SIGKILL})


# -- an unprivileged user in the kvm group runs a VM --------------------------------------------
def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def kvm_user():
    """A system user in the `kvm` group that may open /dev/kvm (group rw, as Debian's udev
    rule sets it); everything put back afterwards. Needs root to create them."""
    if os.geteuid() != 0:
        pytest.skip("creating a test user and the kvm group needs root")
    try:
        grp.getgrnam("kvm")
        made_group = False
    except KeyError:
        _run("groupadd", "--system", "kvm")
        made_group = True
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "--groups", "kvm", TEST_USER)  # fmt: skip
        created = True
    kvm = os.stat("/dev/kvm")
    # The interpreter may live under a root-only home (pyenv): let the user traverse it.
    blocked = [p for p in Path(sys.executable).resolve().parents if not os.stat(p).st_mode & 0o001]
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in blocked}
    try:
        os.chown("/dev/kvm", -1, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", 0o660)
        for p, mode in modes.items():
            os.chmod(p, mode | 0o001)
        yield pwd.getpwnam(TEST_USER)
    finally:
        os.chown("/dev/kvm", kvm.st_uid, kvm.st_gid)
        os.chmod("/dev/kvm", stat.S_IMODE(kvm.st_mode))
        for p, mode in modes.items():
            os.chmod(p, mode)
        if created:
            _run("userdel", TEST_USER)
        if made_group:
            _run("groupdel", "kvm")


def test_unprivileged_user_in_kvm_group_runs_a_vm(guests, kvm_user):
    work = Path(tempfile.mkdtemp(prefix="splitvmm-user-"))  # pytest's tmp_path is root-only
    try:
        os.chmod(work, 0o755)
        shutil.copy(guests["hello"], work / "hello.elf")
        (work / "run").mkdir()
        serial = work / "serial.log"
        (work / "vm.toml").write_text(
            vm_toml(f'kernel = "{work / "hello.elf"}"', serial_out=serial)
        )
        os.chown(work / "run", kvm_user.pw_uid, kvm_user.pw_gid)
        serial.touch()
        os.chown(serial, kvm_user.pw_uid, kvm_user.pw_gid)
        proc = subprocess.run(
            [sys.executable, "-m", "splitvmm", "up", str(work / "vm.toml")],
            user=kvm_user.pw_uid,
            group=kvm_user.pw_gid,
            extra_groups=[grp.getgrnam("kvm").gr_gid],
            env={"XDG_RUNTIME_DIR": str(work / "run"), "PATH": "/usr/bin:/bin"},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert serial.read_text().startswith("Hello from a splitvmm test guest!\n")
    finally:
        shutil.rmtree(work)


# In a fresh interpreter, whose only thread is its main one: a thread still running keeps the
# monitor from confining itself, one that was just joined (its OS thread may outlive join()
# by a moment) does not.
SINGLE_THREADED_PROBE = """
import threading
from splitvmm.monitor.confinement import single_threaded
release = threading.Event()
running = threading.Thread(target=release.wait)
running.start()
print(single_threaded(grace_s=0.05))
release.set()
running.join()
print(single_threaded())
"""


def test_confine_process_waits_out_an_os_thread_python_does_not_know_of():
    """A C library's own thread (libzmq's I/O thread was one) is in /proc, not in threading."""
    probe = (
        "from splitvmm.monitor import confinement\n"
        "confinement.thread_count = lambda: 2\n"
        "print(confinement.single_threaded(grace_s=0.01))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert (result.returncode, result.stdout.split()) == (0, ["False"]), result.stderr


def test_confine_process_waits_out_a_joined_thread_not_a_running_one():
    result = subprocess.run(
        [sys.executable, "-c", SINGLE_THREADED_PROBE], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


# Confined with some capabilities but not CAP_SETPCAP: root under a bounding set without it (a
# hardened service, a container), or a user given CAP_NET_ADMIN for its TAPs (README: "made if
# missing (needs CAP_NET_ADMIN)"). Locking the securebits and emptying the bounding set need
# CAP_SETPCAP; the monitor used to refuse to start there ("cannot drop the monitor's
# privileges: prctl(28)"). It must end holding no capability all the same.
CAPS_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from splitvmm.monitor.confinement import Confinement
    status = open("/proc/self/status")  # read once confined (Landlock hides /proc then)
    c = Confinement(launcher_fd=3)  # only a constant of its policies here
    c.confine_process(Path(sys.argv[1]), [])
    fields = dict(l.split(":", 1) for l in status.read().splitlines())
    print(json.dumps({k: int(fields[k], 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapInh")}))
    """
)


# The securebits of a monitor confined as root with every capability (PR_GET_SECUREBITS).
SECUREBITS_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from pathlib import Path
    from splitvmm.monitor.confinement import Confinement
    Confinement(launcher_fd=3).confine_process(Path(sys.argv[1]), [])
    print(json.dumps({"Securebits": ctypes.CDLL(None).prctl(27, 0, 0, 0, 0)}))
    """
)


def confined_caps(setpriv: list[str], uid: int = 0, probe: str = CAPS_PROBE) -> dict[str, int]:
    """The capability sets of a process confined as the monitor is, run under `setpriv`."""
    caps: dict[str, int] = under_setpriv(setpriv, probe, uid, "run/vm")
    return caps


@needs_setpriv
def test_root_monitor_without_cap_setpcap_confines_itself_and_holds_no_capability():
    caps = confined_caps(["--bounding-set", "-setpcap"])
    assert caps == {"CapEff": 0, "CapPrm": 0, "CapAmb": 0, "CapInh": 0}


@needs_setpriv
def test_user_monitor_given_cap_net_admin_confines_itself_and_holds_no_capability():
    caps = confined_caps(
        [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
        ],  # fmt: skip
        uid=65534,
    )
    assert (caps["CapEff"], caps["CapPrm"], caps["CapAmb"]) == (0, 0, 0)


@needs_setpriv
@pytest.mark.parametrize("bits", ["+noroot_locked", "+no_setuid_fixup_locked"])
def test_root_monitor_under_a_securebit_locked_already_confines_itself(bits):
    """systemd's SecureBits=noroot-locked, a container runtime: a securebit locked by the
    parent cannot be changed (EPERM), and locking all of them refused to start the VM. It
    keeps the value it was locked at; every capability still goes."""
    caps = confined_caps(["--securebits", bits])
    assert caps == {"CapEff": 0, "CapPrm": 0, "CapAmb": 0, "CapInh": 0}


@needs_setpriv
def test_root_monitor_confines_itself_with_every_securebit_set_and_locked():
    """PR_GET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE and every lock
    (KEEP_CAPS stays clear, locked): nothing the monitor could exec or setuid to regains a
    capability."""
    bits = confined_caps(["--reuid=0"], probe=SECUREBITS_PROBE)
    assert bits == {"Securebits": 0xEF}


# The monitor of a VM whose devices run as another user (config.py vm.device_uid): it keeps
# CAP_KILL alone, to end them through the pidfds the launcher sent (its filter allows no other
# signal but to its own threads), with the securebits locked as ever.
KEEP_KILL_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from pathlib import Path
    from splitvmm.monitor.confinement import Confinement
    status = open("/proc/self/status")
    Confinement(launcher_fd=3, keep_kill=True).confine_process(Path(sys.argv[1]), [])
    fields = dict(l.split(":", 1) for l in status.read().splitlines())
    caps = {k: int(fields[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")}
    print(json.dumps({**caps, "Securebits": ctypes.CDLL(None).prctl(27, 0, 0, 0, 0)}))
    """
)


@needs_setpriv
def test_root_monitor_of_devices_run_as_another_user_keeps_cap_kill_alone():
    from splitvmm.native.confine import CAP_KILL, SECUREBITS_LOCKED

    caps = confined_caps([], probe=KEEP_KILL_PROBE)

    kill = 1 << CAP_KILL
    assert caps == {
        "CapEff": kill,
        "CapPrm": kill,
        "CapBnd": kill,
        "CapAmb": 0,
        "CapInh": 0,
        "Securebits": SECUREBITS_LOCKED,
    }


def _uids(pid: int) -> list[str]:
    return status_fields(Path(f"/proc/{pid}/status"))["Uid"].split()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs its devices as another user")
def test_vm_whose_devices_run_as_another_user_runs_restarts_and_suspends(guests, tmp_path):
    """Every device process (wardens, devices, a crashed one's successor) is that user on the
    host; the monitor, root, ends one (`ctl crash-device`) and its restart comes back as it."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "period=100000"'
    toml = vm_toml(boot, serial_out=serial, vm_extra="device_uid = 65534\ndevice_gid = 65534")
    config.write_text(toml + 'on_crash = "restart"\n')
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    try:
        vm.wait_for(r"^count=\d+")
        before = json.loads(vm.ctl("status", "--json").stdout)
        crashed = vm.ctl("crash-device", "serial0")
        vm.wait_for(r"^count=\d+", after=len(vm.text()))
        after = json.loads(vm.ctl("status", "--json").stdout)
        monitor = status_fields(Path(f"/proc/{after['pid']}/status"))
        wardens = [d["pid"] for d in after["devices"]]
        devices = [int(c) for w in wardens for c in _children(w)]
        uids = [_uids(pid) for pid in wardens + devices]
    finally:
        suspended = vm.ctl("suspend", str(tmp_path / "end"))
        status, err = vm.finish()
    assert crashed.returncode == 0, crashed.stderr
    serial0 = {d["name"]: d for d in after["devices"]}["serial0"]
    assert serial0["restarts"] == 1 and serial0["pid"] != before["devices"][0]["pid"]
    assert len(devices) == len(wardens) == 2  # serial0 and the clock
    assert uids == [["65534"] * 4] * 4
    assert int(monitor["CapEff"], 16) == 1 << 5  # CAP_KILL
    assert (suspended.returncode, status) == (0, 0), err
    assert list((tmp_path / "run" / "splitvmm").iterdir()) == []


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
