"""LatencyBudget and Deadline: time limits on devices, with a clock the test moves."""

from __future__ import annotations

import pytest

from splitvmm.monitor.budget import Deadline, LatencyBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: FakeClock) -> LatencyBudget:
    return LatencyBudget(budget_ms=2500, window_s=10, slow_ms=50, clock=clock)


def test_latency_budget_busy_healthy_device_never_counts():
    b = budget(FakeClock())
    assert {b.charge(0.3) for _ in range(100_000)} == {None}  # 30 s of 0.3 ms round trips


def test_latency_budget_two_replies_near_deadline_go_over_with_window_total():
    clock = FakeClock()
    b = budget(clock)
    first = b.charge(1900)
    clock.now += 1.9
    assert (first, b.charge(1900)) == (None, 3800)


def test_latency_budget_slow_replies_a_window_apart_are_forgotten():
    clock = FakeClock()
    b = budget(clock)
    first = b.charge(1900)
    clock.now += 10.0
    assert (first, b.charge(1900)) == (None, None)


def test_latency_budget_rejects_empty_window():
    with pytest.raises(ValueError, match="positive"):
        LatencyBudget(budget_ms=1, window_s=0, slow_ms=1)


def test_deadline_counts_only_time_inside_counting():
    clock = FakeClock()
    d = Deadline(1.5, clock=clock)
    with d.counting():
        clock.now += 1.0
    clock.now += 60.0  # writing RAM: not the devices' time
    assert d.remaining_ms() == 500


def test_deadline_spent_leaves_zero_not_negative():
    clock = FakeClock()
    d = Deadline(1.0, clock=clock)
    with d.counting():
        clock.now += 3.0
    assert d.remaining_ms() == 0
