"""Device crashes in a running VM: on_crash = "restart" (transparent), "stop", "leave", and
the restart budget. The serial device's process is killed while a counting guest prints."""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from splitvmm.monitor.control import ControlError, request
from tests.integration.conftest import vm_toml
from tests.integration.test_virtio import loop_vm, stop_loop, written
from tests.integration.vmproc import VmProcess, comm

pytestmark = pytest.mark.kvm

KILLS = 20
COUNT_RE = re.compile(r"^count=(\d+)$")


def start_counter(
    tmp_path: Path, guests: dict[str, Path], device_extra: str, cmdline: str = ""
) -> VmProcess:
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = "{cmdline}"'
    config.write_text(vm_toml(boot, "64M", 1, serial) + device_extra)
    vm = VmProcess(tmp_path, ["up", str(config)], serial)
    vm.wait_for(r"^count=\d+$")
    return vm


def serial_device(tmp_path: Path) -> dict[str, object]:
    reply = request(tmp_path / "run" / "splitvmm" / "test" / "control.sock", "devices")
    devices = reply["devices"]
    assert isinstance(devices, list)
    return next(d for d in devices if d["name"] == "serial0")


def wait_back(tmp_path: Path, value: int, key: str = "generation") -> dict[str, object]:
    """The serial device once it serves with `key` at `value` (polls the socket): its
    process number (generation), or its restarts (a warm spare that failed to take over
    counts a process more, not a restart)."""
    for _ in range(600):
        dev = serial_device(tmp_path)
        if dev[key] == value and dev["state"] == "running":
            return dev
        time.sleep(0.02)
    raise AssertionError(f"serial0 not back with {key} {value}: {dev}")


def assert_each_count_once(text: str) -> None:
    """Every full count= line well formed, and the counts k*period for k = 1, 2, ... in
    order: none lost, repeated or garbled."""
    lines = text.split("\n")[1:-1]  # the header, and a last line that may be cut
    values = []
    for line in lines:
        m = COUNT_RE.fullmatch(line)
        assert m, f"garbled line {line!r}"
        values.append(int(m.group(1)))
    assert values == [values[0] * (k + 1) for k in range(len(values))], "lost or repeated a line"


def test_serial_killed_20_times_loses_repeats_and_garbles_no_line(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 100\n')
    rng = random.Random(11)
    try:
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.01, 0.2))  # a random moment in the guest's printing
            dev = serial_device(tmp_path)
            os.kill(int(dev["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            wait_back(tmp_path, kill + 2)
        after = len(vm.text())
        vm.wait_for(r"^count=\d+$", after=after)  # it prints on after the last kill
        dev = serial_device(tmp_path)
        assert dev["restarts"] == KILLS and dev["crashes"] == KILLS
        assert dev["recover_ms"] is not None
        status, err = vm.stop()
    finally:
        vm.kill_if_running()
    assert_each_count_once(vm.text())
    assert err.count("killed by signal 9") == KILLS, err[-2000:]


def test_serial_sandboxed_process_killed_while_the_guest_prints_flat_out_is_always_restarted(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """The serial device's sandboxed process (its warden's child) SIGKILLed 80 times while
    the guest prints as fast as the register mirror answers its LSR polls (period=1000), to
    a file, with another VM busy on the host. Each crash restarts the device, and no line is
    lost or repeated. A device lagging its posted writes let the journal pass MAX_JOURNAL
    frames past the last checkpoint the monitor had, and a crash then stopped the VM
    (status 4): "cannot be restarted: more than 4096 frames since its last checkpoint"."""
    neighbour_dir = tmp_path / "neighbour"
    neighbour_dir.mkdir()
    neighbour = loop_vm(neighbour_dir, guests)  # another VM busy on the host: CPU is short
    written(neighbour)
    vm = start_counter(
        tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 1000\n', "period=1000"
    )
    rng = random.Random(3)
    kills = 0
    try:
        while kills < 80:
            time.sleep(rng.uniform(0.05, 0.4))  # back by then: a warm restart takes ms
            warden = int(wait_back(tmp_path, kills, "restarts")["pid"])  # type: ignore[call-overload]
            (device,) = children_of(warden)
            os.kill(device, signal.SIGKILL)
            kills += 1
    except ControlError:
        pass  # the VM ended: its stderr says why
    finally:
        status, err = vm.stop()
        stop_loop(neighbour)
    assert kills == 80 and status == 128 + signal.SIGTERM, err[-2000:]
    assert_each_count_once(vm.text())


def wait_spare(tmp_path: Path, other_than: int = 0) -> int:
    """The pid of the serial device's warm spare, once there is one (not `other_than`)."""
    for _ in range(600):
        spare = int(serial_device(tmp_path)["spare_pid"])  # type: ignore[call-overload]
        if spare not in (0, other_than):
            return spare
        time.sleep(0.02)
    raise AssertionError("serial0 has no warm spare")


def test_serial_killed_comes_back_as_its_warm_spare_and_a_new_spare_follows(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        spare = wait_spare(tmp_path)
        dev = serial_device(tmp_path)
        assert dev["pid"] != spare  # the spare is never shown as the device
        os.kill(int(dev["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        back = wait_back(tmp_path, 2)
        next_spare = wait_spare(tmp_path, other_than=spare)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))
        status = request(tmp_path / "run" / "splitvmm" / "test" / "control.sock", "status")
        vm.stop()
    finally:
        vm.kill_if_running()
    assert (back["pid"], back["warm_restarts"], status["state"]) == (spare, 1, "running")
    assert next_spare != back["pid"]
    assert_each_count_once(vm.text())
    for pid in (spare, next_spare):  # no orphan: the spares ended with the monitor
        assert not Path(f"/proc/{pid}").exists()


def test_serial_spare_killed_while_waiting_is_replaced_and_the_next_crash_is_warm(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        spare = wait_spare(tmp_path)
        os.kill(spare, signal.SIGKILL)
        replacement = wait_spare(tmp_path, other_than=spare)  # no crash of the device
        assert serial_device(tmp_path)["generation"] == 1
        os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        back = wait_back(tmp_path, 2)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))
        _, err = vm.stop()
    finally:
        vm.kill_if_running()
    assert (back["pid"], back["warm_restarts"]) == (replacement, 1)
    assert "its warm spare" in err and "starting another" in err, err[-2000:]
    assert_each_count_once(vm.text())


def test_on_crash_stop_ends_the_vm_with_status_4(tmp_path: Path, guests: dict[str, Path]) -> None:
    vm = start_counter(tmp_path, guests, 'on_crash = "stop"\n')
    os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    status, err = vm.finish()
    assert status == 4
    assert "device serial0 failed" in err and "killed by signal 9" in err, err[-2000:]


def test_launcher_killed_the_restart_that_cannot_be_done_stops_the_vm_with_status_4(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """The devices end with their launcher, and none can be started again: the VM stops, not
    running on dead devices, saying the launcher is why (it used to name a device whose
    restart then failed, after a dozen lines of restart attempts that could not work)."""
    rtc = '[[device]]\nname = "rtc"\nmodel = "rtc"\non_crash = "restart"\n'
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\n' + rtc)
    children = Path(f"/proc/{vm.proc.pid}/task/{vm.proc.pid}/children").read_text().split()
    (launcher,) = children  # the monitor's only child: devices are the launcher's
    os.kill(int(launcher), signal.SIGKILL)
    status, err = vm.finish(timeout=20)
    assert status == 4, err[-2000:]
    assert "the launcher process exited, and every device with it" in err, err[-2000:]
    assert "starting cold" not in err and "its restart failed" not in err, err[-2000:]


def test_on_crash_leave_keeps_the_vm_running_reading_all_ones(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    vm = start_counter(tmp_path, guests, 'on_crash = "leave"\n')
    try:
        vm.ctl("crash-device", "serial0", "--signal", "SEGV")
        for _ in range(500):
            dev = serial_device(tmp_path)
            if dev["state"] == "failed":
                break
            time.sleep(0.02)
        assert dev["state"] == "failed" and "signal 11" in str(dev["reason"])
        # The guest polls LSR: all-ones says THRE, so it keeps writing into the void, and runs.
        assert vm.proc.poll() is None
        status = request(tmp_path / "run" / "splitvmm" / "test" / "control.sock", "status")
        assert status["state"] == "running"
    finally:
        status_code, err = vm.stop()
    assert "stays dead (on_crash = leave)" in err


def test_on_crash_leave_failed_device_shows_no_pid_of_its_dead_process(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """A device left dead has no process: status showed its dead warden's pid, which the
    kernel may since have given to another process, for an operator to signal."""
    vm = start_counter(tmp_path, guests, 'on_crash = "leave"\n')
    try:
        dead = int(serial_device(tmp_path)["pid"])  # type: ignore[call-overload]
        vm.ctl("crash-device", "serial0")
        for _ in range(500):
            dev = serial_device(tmp_path)
            if dev["state"] == "failed":
                break
            time.sleep(0.02)
        table = vm.ctl("status").stdout
    finally:
        vm.stop()
    assert dev["state"] == "failed" and dev["pid"] is None, dev
    line = next(line for line in table.splitlines() if "serial0" in line)
    assert str(dead) not in line and " pid - " in line, table


def test_device_crashing_in_a_loop_hits_the_budget_and_stops_the_vm(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    vm = start_counter(
        tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 2\nrestart_window = "60s"\n'
    )
    try:
        for kill in range(2):
            vm.ctl("crash-device", "serial0")
            wait_back(tmp_path, kill + 2)
        vm.ctl("crash-device", "serial0")
    finally:
        status, err = vm.finish()
    assert status == 4
    assert "max_restarts = 2" in err and "restart_window = 60 s" in err, err[-2000:]


# -- fault injection: from the config, and from `ctl inject-fault` -----------------------------
def run_with_fault(
    tmp_path: Path, guests: dict[str, Path], extra: str, *inject: str, generation: int
) -> tuple[str, dict[str, object]]:
    """Start the counter (on_crash = restart), arm `inject` with ctl if given, wait until the
    serial device serves as process `generation` and the guest printed on; (stderr, device)."""
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n' + extra)
    try:
        if inject:
            done = vm.ctl("inject-fault", "serial0", *inject)
            assert done.returncode == 0, done.stderr
        dev = wait_back(tmp_path, generation)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))  # it prints on after the fault
        dev = serial_device(tmp_path)
        _, err = vm.stop()
    finally:
        vm.kill_if_running()
    assert_each_count_once(vm.text())
    return err, dev


def test_config_fault_crash_restarts_the_device_and_the_guest_loses_no_line(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    err, dev = run_with_fault(tmp_path, guests, 'fault = "crash:after=200"\n', generation=2)
    assert dev["restarts"] == 1 and dev["crashes"] == 1  # the restarted process has no fault
    assert "killed by signal 11" in err, err[-2000:]


def test_ctl_fault_delay_under_the_read_deadline_fails_nothing(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    err, dev = run_with_fault(
        tmp_path, guests, "", "delay", "--after", "5", "--delay-ms", "300", generation=1
    )
    assert dev["crashes"] == 0 and dev["state"] == "running", dev


def test_ctl_fault_drop_fails_the_device_at_the_read_deadline_and_it_restarts(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    err, dev = run_with_fault(tmp_path, guests, "", "drop", "--after", "5", generation=2)
    assert dev["restarts"] == 1 and "no reply within" in str(dev["last_failure"]), dev


def test_ctl_fault_exit_mid_request_restarts_and_reruns_the_request(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    err, dev = run_with_fault(tmp_path, guests, "", "exit", "--after", "3", generation=2)
    assert dev["restarts"] == 1 and "exited with status 3" in err, err[-2000:]


def test_killed_devices_leave_no_zombie_under_the_launcher(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """A device killed by its warden's death leaves its PID-namespace init an orphan, which
    the launcher (a subreaper: sandbox/zygote.py) inherits and must reap."""
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        launcher = parent_of(int(serial_device(tmp_path)["pid"]))  # type: ignore[call-overload]
        for generation in (2, 3, 4):
            os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            wait_back(tmp_path, generation)
        zombies = zombie_children(launcher)
        for _ in range(250):  # the orphans die of their parent-death signal, then are reaped
            if not zombies:
                break
            time.sleep(0.02)
            zombies = zombie_children(launcher)
    finally:
        vm.proc.kill()
        vm.finish()
    assert zombies == []


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def zombie_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    ]


def test_zygote_rests_in_a_running_vm_and_one_comes_back_for_a_burst_of_restarts(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """The zygote forks every device (sandbox/zygote.py); once the devices and their spares
    have started and no restart came for ZYGOTE_IDLE_S, the monitor lets the launcher end it
    (rest). A restart takes the spare, and the next spare needs a new zygote; a second crash
    right after is served by that same zygote, which rests once the crashes stop. The guest
    loses nothing."""
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        launcher = parent_of(int(serial_device(tmp_path)["pid"]))  # type: ignore[call-overload]
        spare = wait_spare(tmp_path)
        rested_at_start = wait_no_zygote(launcher, tmp_path)
        zygotes = []
        for generation in (2, 3):  # the spare takes over; the next spare needs a zygote
            os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            wait_back(tmp_path, generation)
            spare = wait_spare(tmp_path, other_than=spare)
            zygotes.append(zygotes_of(launcher, tmp_path))
        rested_after = wait_no_zygote(launcher, tmp_path)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))
    finally:
        _, err = vm.stop()
    assert rested_at_start and rested_after
    assert len(zygotes[0]) == 1 and zygotes[1] == zygotes[0]  # one zygote for the burst
    assert "the zygote ended" not in err  # a rest is no death to report
    assert err.count("killed by signal 9") == 2
    assert_each_count_once(vm.text())


def test_zygote_killed_in_a_running_vm_the_next_restarts_come_from_a_new_one(
    tmp_path: Path, guests: dict[str, Path]
) -> None:
    """Killed (here before it rests), the zygote is replaced by the launcher for the next
    spawn (the warm spare after a restart), which says so, and the guest loses nothing."""
    vm = start_counter(tmp_path, guests, 'on_crash = "restart"\nmax_restarts = 5\n')
    try:
        launcher = parent_of(int(serial_device(tmp_path)["pid"]))  # type: ignore[call-overload]
        wait_spare(tmp_path)  # forked: from here on the zygote is idle, for ZYGOTE_IDLE_S
        (zygote,) = zygotes_of(launcher, tmp_path)
        os.kill(zygote, signal.SIGKILL)
        for generation in (2, 3):  # the spare takes over; the next spare needs a zygote
            os.kill(int(serial_device(tmp_path)["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            wait_back(tmp_path, generation)
        vm.wait_for(r"^count=\d+$", after=len(vm.text()))
        reaped = zygote not in children_of(launcher)
    finally:
        _, err = vm.stop()
    assert reaped
    assert "the zygote ended (-9); starting a new one" in err
    assert_each_count_once(vm.text())


def zygotes_of(launcher: int, tmp_path: Path) -> list[int]:
    """The launcher's children that run the zygote's code and are not the serial device's
    process or its spare (each is forked from the zygote and runs its code until it names
    itself sv-<device> and execs its warden: a spare just reported may not have yet)."""
    dev = serial_device(tmp_path)
    devices = {dev["pid"], dev["spare_pid"]}
    return [
        c
        for c in children_of(launcher)
        if "splitvmm.devprocs.zygote" in cmdline(c)
        and comm(c) == Path(sys.executable).name[:15]
        and c not in devices
    ]


def wait_no_zygote(launcher: int, tmp_path: Path, timeout_s: float = 10.0) -> bool:
    """Whether the launcher's zygote ends (rests) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not zygotes_of(launcher, tmp_path):
            return True
        time.sleep(0.02)
    return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:  # ended meanwhile
        return ""


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
