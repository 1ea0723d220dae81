"""Start-up phase marks (splitvmm/timings.py): what `up --timings` prints."""

import re

import pytest

from splitvmm import timings


@pytest.fixture(autouse=True)
def fresh_marks(monkeypatch):
    monkeypatch.setattr(timings, "_marks", [])
    monkeypatch.setattr(timings, "_spans", [])


def test_timings_report_gives_each_phase_its_own_duration(monkeypatch):
    clock = iter([1.0, 1.010, 1.035])
    monkeypatch.setattr(timings.time, "perf_counter", lambda: next(clock))
    for phase in ("start", "import cli", "config"):
        timings.mark(phase)

    phases = dict(re.findall(r"phase (\S+(?: \S+)?)\s+([\d.]+) ms", timings.report()))

    assert phases == {"import cli": "10.00", "config": "25.00", "total": "35.00"}


def test_timings_report_places_a_span_from_the_first_mark():
    timings._marks.append(("start", 2.0))
    timings.span("device serial0 ready", 2.005, 2.105)

    spans = re.findall(r"span  (.+?)\s+([\d.]+) ms \(from \+([\d.]+) ms\)", timings.report())

    assert spans == [("device serial0 ready", "100.00", "5.00")]


def test_timings_report_without_marks_says_so():
    assert timings.report() == "splitvmm: timings: no marks taken\n"
