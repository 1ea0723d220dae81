"""The progress page (devprocs/progress.py): what a device's processes keep for each other."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from splitvmm.devprocs.progress import MAX_QUEUES, RECEIVE, SIZE, SLOT, Progress
from splitvmm.errors import StateError


@pytest.fixture
def page() -> Iterator[int]:
    fd = os.memfd_create("progress", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)  # the monitor's: one page (monitor/devicefds.py)
    yield fd
    os.close(fd)


def test_progress_fresh_page_has_nothing_latched(page):
    assert Progress(page).latched() == 0 and Progress(page).records() == {}


def test_progress_latched_error_is_read_back_by_a_later_process(page):
    Progress(page).latch(5)

    assert Progress(page).latched() == 5  # another process's Progress on the same page


def test_progress_latch_in_doubt_is_read_back_as_one_and_taken_back_by_unlatch(page):
    """A latch made before a question whose answer only its maker would hear (virtio-blk's
    disk-errors): a later process finds it, in doubt; its maker, knowing, takes it back."""
    Progress(page).latch(5, in_doubt=True)
    found = Progress(page).latched(), Progress(page).latched_in_doubt()

    Progress(page).unlatch()

    assert found == (5, True)
    assert (Progress(page).latched(), Progress(page).latched_in_doubt()) == (0, False)


def test_progress_latch_made_knowing_is_not_in_doubt(page):
    progress = Progress(page)
    progress.latch(5, in_doubt=True)
    progress.latch(28)  # the answer: a failure

    assert (progress.latched(), progress.latched_in_doubt()) == (28, False)


def test_progress_latch_leaves_the_queue_records_alone(page):
    progress = Progress(page)
    progress.write(7, 100)
    progress.write(8, 150)

    progress.latch(28)

    assert progress.records() == {7: 100, 8: 150} and progress.latched() == 28


def test_progress_latch_scribbled_on_reads_as_none(page):
    progress = Progress(page)
    progress.latch(5)
    os.pwrite(page, b"\xff", 2 * SLOT + 1)

    assert progress.latched() == 0


@pytest.mark.parametrize("code", [0, -5])
def test_progress_latch_refuses_what_is_no_error(page, code):
    with pytest.raises(ValueError, match="no error code"):
        Progress(page).latch(code)


def test_progress_page_too_small_is_refused(page):
    os.ftruncate(page, SIZE - 1)

    with pytest.raises(StateError, match="progress memfd"):
        Progress(page)


def test_progress_transmit_start_before_the_lines_count_reads_back_below_zero(page):
    """After a restore the chain at the used idx may start before the new line's count 0
    (the snapshotted VM's line took part of it); input counts stay unsigned."""
    progress = Progress(page)
    progress.write(3, -40960)
    progress.write(9, (1 << 64) - 1, RECEIVE)

    assert progress.records() == {3: -40960}
    assert progress.records(RECEIVE) == {9: (1 << 64) - 1}


def test_progress_rings_written_are_read_back_by_a_later_process(page):
    Progress(page).rings_written()[1] = 1

    assert bytes(Progress(page).rings_written()[:3]) == b"\x00\x01\x00"


def test_progress_rings_written_leave_the_records_the_latch_and_the_host_io_flag_alone(page):
    progress = Progress(page)
    progress.write(7, 100)
    progress.write(8, 5, RECEIVE)
    progress.latch(28)

    progress.rings_written()[:] = b"\x01" * MAX_QUEUES

    assert (progress.records(), progress.records(RECEIVE)) == ({7: 100}, {8: 5})
    assert (progress.latched(), progress.host_io_flag()[0]) == (28, 0)
