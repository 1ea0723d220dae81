"""Coordinator.snapshot: a live snapshot lets the VM run again before the commit (fsync,
manifest, rename), which reads nothing of the VM; a suspend keeps it stopped throughout, and a
failed one resumes it. The machine, its vCPUs and the writer are fakes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from splitvmm.monitor.coordinator import Coordinator
from splitvmm.record import Struct, field


class FakeVcpu(Struct):
    events: list[str]

    def request_pause(self) -> None:
        self.events.append("pause")

    def wait_parked(self, timeout: float) -> bool:
        return True

    def resume(self) -> None:
        self.events.append("resume")


class FakeWriter(Struct):
    events: list[str]
    target: Path
    fail: bool = False
    aborted: list[bool] = field(default_factory=list)

    def __enter__(self) -> FakeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.aborted.append(True)

    def commit(self, sign_key: bytes | None) -> Path:
        self.events.append("commit")
        if self.fail:
            raise OSError("disk full")
        self.target.mkdir()
        return self.target


def coordinator(tmp_path: Path, monkeypatch, fail: bool = False) -> tuple[Coordinator, list[str]]:
    events: list[str] = []
    cfg = SimpleNamespace(vm=SimpleNamespace(name="t", snapshot_dirs=[tmp_path]))
    machine = SimpleNamespace(cfg=cfg, stopping=False, vcpus=[FakeVcpu(events)], slots=[])
    coord = Coordinator(machine)  # type: ignore[arg-type]
    writer = FakeWriter(events, tmp_path / "snap", fail)
    monkeypatch.setattr(coord, "_write", lambda target, deadline: writer)
    return coord, events


def test_coordinator_snapshot_resumes_vcpus_before_the_commit(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)

    coord.snapshot(tmp_path / "snap")

    assert (events, coord.paused) == (["pause", "resume", "commit"], False)


def test_coordinator_suspend_commits_with_the_vcpus_stopped(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch)

    coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (events, coord.paused) == (["pause", "commit"], True)


def test_coordinator_failed_suspend_commit_resumes_the_vcpus(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch, fail=True)

    with pytest.raises(OSError, match="disk full"):
        coord.snapshot(tmp_path / "snap", keep_paused=True)

    assert (events, coord.paused) == (["pause", "commit", "resume"], False)


def test_coordinator_failed_live_commit_resumes_once(tmp_path, monkeypatch):
    coord, events = coordinator(tmp_path, monkeypatch, fail=True)

    with pytest.raises(OSError, match="disk full"):
        coord.snapshot(tmp_path / "snap")

    assert (events, coord.paused) == (["pause", "resume", "commit"], False)
