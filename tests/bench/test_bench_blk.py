"""bench/blk.py --cache direct: the host floor keeps as many requests on the disk as the guest
keeps in flight (DEPTH), as both VMMs pass them on; a floor at one request at a time is not
the floor of what they do."""

from __future__ import annotations

import os
import threading
import time

from bench import blk


def test_the_direct_floor_has_the_guests_requests_in_flight(monkeypatch, tmp_path):
    monkeypatch.setattr(blk, "PASSES", 1)
    monkeypatch.setattr(blk, "BENCH_MIB", 16)
    monkeypatch.setattr(blk, "RANDOM_READS", 64)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 << 20))
    lock, now, peak = threading.Lock(), [0], [0]
    direct_fds: set[int] = set()
    real_open, real_preadv, real_pwritev = os.open, os.preadv, os.pwritev

    def opened(path, flags, *rest):
        fd = real_open(path, flags, *rest)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def on_disk(call):
        def io(fd, buffers, offset, *rest):
            if fd not in direct_fds:
                return call(fd, buffers, offset, *rest)
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            try:
                time.sleep(0.002)  # a disk's latency: requests that can overlap do
                return call(fd, buffers, offset, *rest)
            finally:
                with lock:
                    now[0] -= 1

        return io

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "preadv", on_disk(real_preadv))
    monkeypatch.setattr(os, "pwritev", on_disk(real_pwritev))
    dd_argv: list[list[str]] = []
    monkeypatch.setattr(blk, "dd_mib_s", lambda argv: dd_argv.append(argv) or 1.0)
    floor = blk.host_floor(disk, direct=True)
    assert set(floor) >= set(blk.PHASES)
    assert not dd_argv, f"a one-request-at-a-time dd stands for the floor: {dd_argv}"
    assert peak[0] == blk.DEPTH, f"at most {peak[0]} O_DIRECT requests in flight"


def test_the_image_is_on_the_disk_before_any_vmm_runs(monkeypatch, tmp_path):
    """Left dirty in the page cache (on ext4 not even allocated yet: delayed allocation), the
    first O_DIRECT write to the image waited for its writeback, and with --cache direct that
    was the first pass of the VMM that runs first in each pair (splitvmm): 659-1114 MiB/s of
    seq-write against ~2500 for its later passes. The image is fsynced whole, once written."""
    monkeypatch.setattr(blk, "DISK_SIZE", 16 << 20)
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(blk.os, "fsync", fsync)
    disk = blk.make_disk(tmp_path / "disk.img")
    assert synced == [(str(disk), 16 << 20)]
