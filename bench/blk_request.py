"""virtio-blk's cost per request, in one process: the device's own work, without a guest.

A VirtioBlk over a memfd of guest RAM and a disk image in the page cache, driven as the
bench guest drives it (tests/guests/virtio_blk.c, mode=bench): a queue of 128, DEPTH chains
of header, one data descriptor and a status byte made available per kick, no EVENT_IDX,
VIRTQ_AVAIL_F_NO_INTERRUPT set. Each round the driver side re-publishes the same DEPTH
chains (what the guest's slots are) and kicks; the device pops, serves and pushes them all.
The figure is the 10th percentile over ROUNDS rounds of the time per request, next to a bare
os.preadv of the same size into the same guest buffers (the floor of a read). The device
does not poll for more after a round (POLL_NS = 0), and where a round outlasts its budget
(BUDGET_NS) its own notify is served again, as the event loop does.

    python bench/blk_request.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitvmm.devprocs.base import DeviceContext, load_model  # noqa: E402
from splitvmm.devprocs.virtio_blk import VIRTIO_BLK_F_FLUSH, VirtioBlk  # noqa: E402
from tests.virtio.support import F_VERSION_1, Driver, Ring, close_fds, host_fds  # noqa: E402

MIB = 1 << 20
RAM = 32 * MIB
DISK = 64 * MIB
DEPTH = 8
QSIZE = 128
DATA_BASE = 16 * MIB  # slot i's buffer at DATA_BASE + i MiB, as the guest's
IN, OUT = 0, 1


class Unpolled(VirtioBlk):
    """No poll for more after each round (devprocs/virtio/pci.py POLL_NS): this driver adds
    nothing meanwhile, so the poll would be POLL_NS of waiting in every round, not work."""

    POLL_NS = 0


def make_device(disk: Path) -> VirtioBlk:
    fds = host_fds("virtio-blk", disk)
    for role, size in (("ram", RAM), ("dirty", 4096)):
        os.close(fds[role])
        fds[role] = os.memfd_create(role, os.MFD_CLOEXEC)
        os.ftruncate(fds[role], size)
    ctx = DeviceContext(fds=fds, transport={"pci": [3, 0], "intx_gsi": 16, "ram": [[0, RAM, 0]]})
    model = load_model("virtio-blk")
    model.setup(ctx)
    model.setup_sandboxed(ctx)  # as a device process does (nothing, for a page-cache image)
    return Unpolled.from_options(ctx, {})


class Slots:
    """DEPTH requests laid out once (header, data, status per slot), re-published per round."""

    def __init__(self, dev: VirtioBlk, size: int, kind: int) -> None:
        self.dev = dev
        dev.ram.write(0, bytes(DATA_BASE))  # rings and headers from a clean slate
        self.ring = Ring(dev.ram, size=QSIZE)
        self.driver = Driver(dev)
        # As the bench guest (virtio_blk.c): VIRTIO_BLK_F_FLUSH taken, so writes are write-back
        # (without it, each would be synced before it completes: 5.2.6.2).
        self.driver.start(self.ring, F_VERSION_1 | VIRTIO_BLK_F_FLUSH)
        notify_fd = dev.ctx.fds["notify0"]
        self.notify = next(s for s in dev.event_sources() if s.fd == notify_fd)
        self.ring.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT: the guest polls
        self.size, self.kind = size, kind
        self.heads = []
        for i in range(DEPTH):
            header = self.ring.buffer(16)
            status = self.ring.buffer(1)
            parts = [(*header, False), (DATA_BASE + i * MIB, size, kind == IN), (*status, True)]
            self.heads.append(self.ring._descs(self.ring.desc, parts, self.ring.next_desc))

    def round(self, sector: int) -> int:
        """Point each slot at the next sectors, make all DEPTH available, kick, collect:
        the ns the kick took (the device's work)."""
        ring = self.ring
        for i, head in enumerate(self.heads):
            hdr_gpa = struct.unpack("<Q", self.dev.ram.read(ring.desc + 16 * head, 8))[0]
            sec = (sector + i * self.size // 512) % (DISK // 512 - self.size // 512)
            self.dev.ram.write(hdr_gpa, struct.pack("<IIQ", self.kind, 0, sec))
            ring.publish(head)
        t0 = time.perf_counter_ns()
        self.driver.kick()
        done = len(ring.take_used())
        # A call that spends its budget (BUDGET_NS) signals the device's own notify and
        # returns: the event loop calls it again, as this does.
        while done < DEPTH and select.select([self.notify.fd], [], [], 0)[0]:
            self.notify.on_readable()
            done += len(ring.take_used())
        took = time.perf_counter_ns() - t0
        if done != DEPTH:
            raise SystemExit(f"the device completed {done} of {DEPTH} requests")
        return took


def low(samples: list[float]) -> float:
    """The 10th percentile: other work on the host only ever adds time, so the low end is
    the device's own cost, and it moves far less from run to run than the median."""
    return statistics.quantiles(samples, n=10)[0]


def per_request(dev: VirtioBlk, size: int, kind: int, rounds: int) -> float:
    """µs per request (low()) over `rounds` rounds of DEPTH requests."""
    slots = Slots(dev, size, kind)
    samples = []
    for r in range(rounds + 10):
        took = slots.round(r * DEPTH * size // 512)
        if r >= 10:  # the first rounds warm up
            samples.append(took / 1e3 / DEPTH)
    dev.write(0x1000 + 0x14, b"\0")  # device reset: the next Slots starts afresh
    return low(samples)


def bare_preadv(dev: VirtioBlk, size: int, rounds: int) -> float:
    """µs (low()) of one os.preadv of `size` into the slots' buffers, DEPTH per round."""
    views = [dev.ram.buffer(DATA_BASE + i * MIB, size, writable=True) for i in range(DEPTH)]
    samples = []
    for r in range(rounds + 10):
        t0 = time.perf_counter_ns()
        for i, view in enumerate(views):
            os.preadv(dev.disk, [view], ((r * DEPTH + i) * size) % (DISK - size))
        if r >= 10:
            samples.append((time.perf_counter_ns() - t0) / 1e3 / DEPTH)
    for view in views:
        view.release()
    return low(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not a tmpfs
        disk = Path(tmp) / "disk.img"
        disk.write_bytes(os.urandom(DISK))  # in the page cache from here on
        dev = make_device(disk)
        result = {
            "in_1m_us": per_request(dev, MIB, IN, args.rounds),
            "preadv_1m_us": bare_preadv(dev, MIB, args.rounds),
            "in_4k_us": per_request(dev, 4096, IN, args.rounds * 4),
            "preadv_4k_us": bare_preadv(dev, 4096, args.rounds * 4),
            "out_1m_us": per_request(dev, MIB, OUT, args.rounds),
        }
        close_fds(dict(dev.ctx.fds))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>14} {value:8.1f}")


if __name__ == "__main__":
    main()
