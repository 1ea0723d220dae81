"""A file system whose write-back fails, for tests of what a sync reports.

ext4 on a loop device whose backing file lies on a tmpfs too small for it: a write lands in
the page cache at once, and its write-back, once the tmpfs is full, fails (the loop device's
ENOSPC). Linux reports that to fsync as it would a failing disk's EIO: the pages are marked
clean, and each open file description is told of the failure once (errseq). Needs root, a
free loop device and mkfs.ext4 (Debian's e2fsprogs); a host without them skips, saying why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOM = 8 << 20  # the tmpfs under the loop device: ~3.5 MiB left once mkfs has written
SIZE = 64 << 20  # the file system as ext4 sees it
TOO_MUCH = 24 << 20  # a write whose write-back cannot fit: more than ROOM


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise OSError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


@contextlib.contextmanager
def failing_fs(where: Path) -> Iterator[Path]:
    """A directory on such a file system, made under `where`, unmounted and freed after."""
    if os.geteuid() != 0:
        pytest.skip("a failing file system needs root (mount, a loop device)")
    back, top = where / "back", where / "top"
    back.mkdir()
    top.mkdir()
    with contextlib.ExitStack() as undo:
        _needed("mount", "-t", "tmpfs", "-o", f"size={ROOM}", "tmpfs", str(back))
        undo.callback(_run, "umount", str(back))
        image = back / "fs.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)  # sparse: what ext4 writes takes the tmpfs's room
        loop = _needed("losetup", "--find", "--show", str(image))
        undo.callback(_run, "losetup", "--detach", loop)
        _needed("mkfs.ext4", "-q", "-F", loop)
        # errors=continue: ext4 neither panics nor turns read-only at the failed write-back
        _needed("mount", "-o", "errors=continue", loop, str(top))
        undo.callback(_run, "umount", str(top))
        yield top


def _needed(*command: str) -> str:
    """_run, or a skip saying what this host lacks (root without CAP_SYS_ADMIN mounts
    nothing, a host may have no free loop device or no mkfs.ext4)."""
    try:
        return _run(*command)
    except OSError as e:
        pytest.skip(f"no failing file system here: {e}")
