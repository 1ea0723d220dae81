"""bench/exit_rtt.py: the goal's ratio is forwarded in / (inline in + the raw round trip of the
transport a forwarded exit uses, its ends waiting as the channel's do), not of a transport the
device channel no longer has, nor of ends asleep where the channel's look first."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import exit_rtt

FORWARDED, INLINE, ZMQ, ASLEEP, POLLED = 167.2, 53.6, 52.0, 50.9, 11.1  # µs: runs of this bench


def fake_pio(count: int, port: int, work: Path, in_port: int | None = None):
    kinds = {"in", "out", "rdtsc"}
    if port == exit_rtt.UNCLAIMED_PORT:
        return {k: (INLINE, INLINE) for k in kinds}
    if in_port == exit_rtt.IIR_PORT:
        return {k: (FORWARDED, FORWARDED) for k in kinds}
    return {k: (66.0, 66.0) for k in kinds}


def test_the_goals_ratio_is_against_the_channels_own_transport(monkeypatch, tmp_path):
    monkeypatch.setattr(exit_rtt, "splitvmm_pio", fake_pio)
    monkeypatch.setattr(exit_rtt, "zmq_pair_floor", lambda n: [ZMQ * 1e-6] * 10)
    polled = {0: ASLEEP, exit_rtt.MAX_POLL_NS: POLLED}
    monkeypatch.setattr(
        exit_rtt, "zmtp_socket_floor", lambda n, poll_ns=0: [polled[poll_ns] * 1e-6] * 10
    )
    monkeypatch.setattr(exit_rtt, "two_cpus", lambda: None)
    _, ratios = exit_rtt.one_round(10, tmp_path)
    goal, asleep, zmq = ratios  # main() prints and stores the goal's first, as "ratios"
    assert goal == pytest.approx(FORWARDED / (INLINE + POLLED))  # 2.56, not 1.60 or 1.58
    assert asleep == pytest.approx(FORWARDED / (INLINE + ASLEEP))
    assert zmq == pytest.approx(FORWARDED / (INLINE + ZMQ))
