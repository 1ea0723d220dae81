"""bench/serial.py's table: the "/ QEMU" figure (splitvmm's time over QEMU's) stands in
splitvmm's row, not in QEMU's, where it reads as QEMU measured against itself."""

from __future__ import annotations

import sys

from bench import serial

TSC_KHZ = 1_000_000  # 1 GHz: a tick a nanosecond
OURS, THEIRS, FLOOR = 1_200_000_000, 800_000_000, 900_000_000  # ticks: 1.2 s, 0.8 s, 0.9 s


class FakeVm:
    def coalesced_pio_page(self) -> int:
        return 1

    def close(self) -> None:
        pass


class FakeKvm:
    def __enter__(self) -> FakeKvm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def default_tsc_khz(self) -> int:
        return TSC_KHZ

    def create_vm(self) -> FakeVm:
        return FakeVm()


def test_the_ratio_is_in_splitvmms_row(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(serial, "Kvm", FakeKvm)
    monkeypatch.setattr(serial, "build_guests", lambda d: {"firmware-serial": tmp_path / "fw"})
    monkeypatch.setattr(serial.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(serial, "qemu_version", lambda q: "QEMU emulator version 0")
    monkeypatch.setattr(serial, "run_splitvmm", lambda *a: OURS)
    monkeypatch.setattr(serial, "run_qemu", lambda *a: THEIRS)
    monkeypatch.setattr(serial, "run_floor", lambda *a: FLOOR)
    monkeypatch.setattr(sys, "argv", ["serial.py", "--runs", "1"])
    monkeypatch.setenv("COLUMNS", "200")
    serial.main()
    rows = {
        line.split("│")[1].strip(): line
        for line in capsys.readouterr().out.splitlines()
        if line.count("│") >= 5
    }
    last = lambda row: row.split("│")[-2].strip()  # noqa: E731
    assert last(rows["splitvmm"]) == "1.50", rows["splitvmm"]
    assert last(rows["QEMU"]) in ("", "1.00"), rows["QEMU"]
