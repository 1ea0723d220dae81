"""native/files.py start_writeback and wait_writeback: sync_file_range(2), which the os module
lacks."""

from __future__ import annotations

import errno
import os

import pytest

from splitvmm.native import files
from tests.failing_disk import TOO_MUCH, failing_fs


def test_start_writeback_of_a_file_with_dirty_pages_returns_at_once(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\x01" * (1 << 20))
        files.start_writeback(fd)
        os.fsync(fd)  # what start_writeback leaves to it: the wait, the metadata
    finally:
        os.close(fd)


def test_wait_writeback_tells_an_early_description_of_a_failure_anothers_sync_took(tmp_path):
    """What a restarted virtio-blk device relies on (devprocs/virtio_blk.py): the failed
    write-back that one description's fdatasync took is still told, once, to a description
    opened before it failed, and not to one opened after it was told."""
    with failing_fs(tmp_path) as top:
        path = top / "disk.img"
        device = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        early = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pwrite(device, b"\xab" * TOO_MUCH, 0)
            with pytest.raises(OSError) as taken:
                os.fdatasync(device)  # the failure, taken (a process killed here says nothing)
            os.fdatasync(device)  # told once: this description's next sync says nothing
            late = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with pytest.raises(OSError, match="sync_file_range") as told:
                    files.wait_writeback(early)
                files.wait_writeback(early)  # once
                files.wait_writeback(late)  # opened after the failure was told: nothing
            finally:
                os.close(late)
        finally:
            os.close(early)
            os.close(device)
    assert told.value.errno == taken.value.errno
    assert told.value.errno in (errno.EIO, errno.ENOSPC)


def test_wait_writeback_of_a_healthy_file_with_dirty_pages_says_nothing(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\x01" * (1 << 20))
        files.wait_writeback(fd)
    finally:
        os.close(fd)


def test_start_writeback_of_a_pipe_is_an_oserror_naming_the_call():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="sync_file_range") as raised:
            files.start_writeback(w)
        assert raised.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)
