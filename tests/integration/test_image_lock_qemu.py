"""A disk image's lock against QEMU's own (monitor/devicefds.py lock_disk), with the real
qemu-io: QEMU's file-posix driver reads our lock bytes as its own and refuses the image, and
lock_disk refuses an image qemu-io holds. No KVM: both sides are file locks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor.devicefds import lock_disk

QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not installed (Debian: qemu-utils)"
)
KEY = "device 'disk0'.path"
IMAGE_BYTES = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_BYTES))
    return path


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    assert QEMU_IO is not None
    return subprocess.run(
        [QEMU_IO, "-f", "raw", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def qemu_io_holding(image: Path) -> Iterator[subprocess.Popen[str]]:
    """qemu-io with the image open read-write, taking commands on stdin: its first read's
    answer says the image is open, with QEMU's locks on it; EOF on stdin ends it."""
    assert QEMU_IO is not None
    proc = subprocess.Popen(
        [QEMU_IO, "-f", "raw", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert "read 512/512 bytes at offset 0" in answer, answer
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()


@pytest.mark.parametrize("readonly", [False, True], ids=["ours-rw", "ours-ro"])
def test_qemu_io_cannot_write_an_image_a_vm_has_locked(image, readonly):
    fd = os.open(image, os.O_RDONLY if readonly else os.O_RDWR)
    try:
        lock_disk(fd, str(image), KEY, readonly)
        write = qemu_io("-c", "write -P 0xab 0 4k", str(image))
    finally:
        os.close(fd)
    assert (write.returncode, 'Failed to get "write" lock' in write.stderr) == (1, True)
    assert image.read_bytes() == bytes(IMAGE_BYTES)


@pytest.mark.parametrize("readonly", [False, True], ids=["ours-rw", "ours-ro"])
def test_lock_disk_refuses_an_image_qemu_io_holds_read_write(image, qemu_io_holding, readonly):
    fd = os.open(image, os.O_RDONLY if readonly else os.O_RDWR)
    try:
        with pytest.raises(
            ConfigError,
            match=f"{re.escape(KEY)}: {re.escape(str(image))} is open in another program, "
            'which holds it with "write" permission',
        ):
            lock_disk(fd, str(image), KEY, readonly)
    finally:
        os.close(fd)
