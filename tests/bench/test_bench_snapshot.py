"""bench/snapshot.py: write/floor sets a single save against a floor taken the same way (one
try a run, medians over the runs), not against the best of several tries of the floor."""

from __future__ import annotations

import pytest

from bench import snapshot
from tests.guests.build import build_guests

pytestmark = pytest.mark.kvm


def test_the_floor_is_one_try_as_the_save_is(monkeypatch, tmp_path):
    guest = build_guests(tmp_path / "guests")["dirty"]
    untimed_then_tries = iter([0.5, 0.30, 0.20, 0.10])  # seconds each disk_floor() call "takes"
    monkeypatch.setattr(snapshot, "disk_floor", lambda work, size: next(untimed_then_tries))
    figures = snapshot.one(tmp_path, guest, 128, 0)
    assert figures["floor_write_fsync_s"] == 0.30  # the save's one try against the floor's one
