"""bench/snapshot.py: write/floor sets a single save against a floor taken the same way (one
try a run, medians over the runs), not against the best of several tries of the floor."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from bench import snapshot
from splitvmm import timings
from splitvmm.config import parse_config
from splitvmm.monitor import machine as machine_module
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.machine import Machine
from tests.guests.build import build_guests

pytestmark = pytest.mark.kvm


def test_the_floor_is_one_try_as_the_save_is(monkeypatch, tmp_path):
    guest = build_guests(tmp_path / "guests")["dirty"]
    untimed_then_tries = iter([0.5, 0.30, 0.20, 0.10])  # seconds each disk_floor() call "takes"
    monkeypatch.setattr(snapshot, "disk_floor", lambda work, size: next(untimed_then_tries))
    figures = snapshot.one(tmp_path, guest, 128, 0)
    assert figures["floor_write_fsync_s"] == 0.30  # the save's one try against the floor's one


# The floor's write+fsync is timed as the save is, after an untimed write of the same size.
# On these hosts the first large write after the host's memory churned pays
# more, whoever makes it; one() makes an untimed write before the save for that reason, and the
# floor, taken after the restored VM has ended, paid it alone in its single try (252-434 ms
# against 85-122 ms for the same write right after it, 4 runs of 6 at 256/128): write/floor
# read ~0.3-0.6 where it was ~1.2.


def test_the_floor_is_timed_after_an_untimed_write_of_the_same_size(monkeypatch, tmp_path):
    tries = iter([0.4, 0.1])  # the first pays more (above); the second is the floor
    sizes: list[int] = []

    def write_fsync(work, size: int, piece: bytes) -> float:
        sizes.append(size)
        return next(tries)

    monkeypatch.setattr(snapshot, "write_fsync", write_fsync)
    assert snapshot.disk_floor(tmp_path, 4 << 20) == 0.1
    assert sizes == [4 << 20, 4 << 20]


def test_the_written_back_floor_starts_the_disk_every_step_as_the_save_does(monkeypatch, tmp_path):
    """The second floor writes as a suspend's RAM file is written (snapshot/writer.py): its
    writeback started every WRITEBACK_STEP bytes, each time once all of them reached the file."""
    sizes: list[int] = []
    monkeypatch.setattr(snapshot.files, "start_writeback", lambda fd: sizes.append(fd_size(fd)))
    snapshot.write_fsync(tmp_path, 2 * snapshot.WRITEBACK_STEP + (1 << 20), b"x" * (1 << 20), True)
    assert sizes == [snapshot.WRITEBACK_STEP, 2 * snapshot.WRITEBACK_STEP]
    snapshot.write_fsync(tmp_path, 2 * snapshot.WRITEBACK_STEP, b"x" * (1 << 20))
    assert len(sizes) == 2  # the plain floor: none


def fd_size(fd: int) -> int:
    return os.fstat(fd).st_size


class Nothing:
    """The supervisor and the control server of a machine with no devices and no client."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        pass

    def watch(self, slot: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_restore_figure_ends_once_the_vcpu_threads_run(monkeypatch, tmp_path):
    """The mark the figure ends at is taken after the monitor has started its vCPU threads:
    the supervisor, the write-behind ring, the control server and the threads themselves
    (1.6-14.2 ms over 12 restores here, median 6.9) come before any guest instruction runs."""
    cfg = parse_config({"boot": {"kernel": "bzImage"}}, tmp_path, check_files=False)
    m = Machine(cfg, runtime_root=tmp_path)
    marks_at_start: list[list[str]] = []

    class VcpuThread:
        def __init__(self, *args: object) -> None:
            pass

        def start(self) -> None:  # the marks taken when a vCPU thread starts running
            marks_at_start.append([name for name, _ in timings._marks])

        def request_stop(self) -> None:
            pass

        def join(self) -> None:
            pass

    def guest_runs() -> None:
        m._outcome = Outcome(0, "the guest ended")

    monkeypatch.setattr(timings, "_marks", [])
    monkeypatch.setattr(machine_module, "VcpuThread", VcpuThread)
    monkeypatch.setattr(machine_module, "Supervisor", Nothing)
    monkeypatch.setattr(m, "_write_behind", lambda: None)
    monkeypatch.setattr(m, "_serve_console", guest_runs)
    m.vcpu_fds = [object()]  # type: ignore[list-item]
    m.mem = m.confinement = None  # type: ignore[assignment]  # what build() makes: unused here
    m.control = Nothing()  # type: ignore[assignment]

    m.run()

    assert snapshot.VCPUS_START in [name for name, _ in timings._marks]
    assert snapshot.VCPUS_START not in marks_at_start[0], (
        f"the restore figure ends at {snapshot.VCPUS_START!r}, before the vCPU threads start"
    )


def test_nothing_the_bench_starts_runs_beside_the_restore_it_times(monkeypatch, tmp_path):
    guest = build_guests(tmp_path / "guests")["dirty"]
    monkeypatch.setattr(snapshot, "disk_floor", lambda work, size: 0.1)
    spawned: list[tuple[float, list[str]]] = []

    class Popen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: list[str], *rest: object, **kwargs: object) -> None:
            spawned.append((time.perf_counter(), [str(a) for a in args]))
            super().__init__(args, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess, "Popen", Popen)
    figures = snapshot.one(tmp_path, guest, 128, 0)
    (start,) = [at for at, argv in spawned if "--restore" in argv]
    end = start + float(figures["restore_s"])  # type: ignore[arg-type]
    beside = [argv[2:] for at, argv in spawned if start < at < end]
    assert not beside, f"started while the restore was timed: {beside}"
