"""native/files.py start_writeback: sync_file_range(2), which the os module lacks."""

from __future__ import annotations

import errno
import os

import pytest

from splitvmm.native import files


def test_start_writeback_of_a_file_with_dirty_pages_returns_at_once(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\x01" * (1 << 20))
        files.start_writeback(fd)
        os.fsync(fd)  # what start_writeback leaves to it: the wait, the metadata
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
