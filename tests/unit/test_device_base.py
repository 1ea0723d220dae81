"""The device library's small helpers (devprocs/base.py)."""

import logging

from splitvmm.ratelimit import RateLimitedLog


def test_rate_limited_log_repeats_within_a_second_are_dropped_per_kind(caplog):
    times = iter([10.0, 10.5, 10.6, 11.0])
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), clock=lambda: next(times))
    limited.warning("a", "a at 10.0")
    limited.warning("a", "a at 10.5")
    limited.warning("b", "b at 10.6")
    limited.warning("a", "a at 11.0")
    assert [r.getMessage() for r in caplog.records] == ["a at 10.0", "b at 10.6", "a at 11.0"]
