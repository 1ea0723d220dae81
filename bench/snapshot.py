"""Snapshot save, pause, size and restore for 128 MiB, 512 MiB and 2 GiB guests.

Each guest runs the `dirty` test guest, which writes a non-zero pattern over
N MiB at CPL3 (native speed here), then spins. We snapshot it with `splitvmm
ctl suspend` and restore it with `splitvmm up --restore --timings`.

- save s: the `ctl suspend` round trip (a Python client's start included);
  write ms: the monitor's own time to write the snapshot (from its reply);
  pause ms: how long the vCPUs were stopped (from its reply).
- live pause ms: the same for a `ctl snapshot` taken just before, after which
  the VM runs on: its vCPUs run again once the data is copied, before the
  fsyncs (monitor/coordinator.py).
- tracked: the live pause of the same guest in a VM with vm.track_dirty_pages (booted
  for it in each run): its RAM is copied while it runs and only what it wrote meanwhile
  in the pause (monitor/dirtylog.py); "tracked write ms" is that snapshot's whole write,
  every pass (what the save costs the host, not the guest).
- busy (a table of its own, rows with data): the live pause of the guest rewriting its data
  at each rate of STREAM_MIB_S, a MiB at a time (its rate=; tests/guests/README.md), in a VM
  with and without vm.track_dirty_pages: what the passes made while it runs must chase.
- reading (a table of its own, rows with data): the same two live pauses of a guest reading its
  disk, the virtio-blk loop guest at READ_BLOCKS_S blocks a second, each 1 MiB block written
  from one buffer and read back into the next, its buffers taken in turn over half its RAM (at
  most READ_SPREAD_MIB: its spread=, rate=; tests/guests/README.md), once it has gone round
  them: a page cache filling, which the device process writes, not the vCPU (monitor/dirtylog.py).
- floor s: writing the same number of bytes to a file in the same directory
  and fsyncing it, once in each run, as the save is: write/floor is the goal's ratio,
  the median of one against the median of the other. (The floor was the best of three
  tries in each run against a single save: a write+fsync here varies by 2-3x, so the best
  of three sits ~10% below what one try gets, and the ratio counted that against the save.)
  Both start from a settled disk (settle()): on this ext4, mounted with
  `discard`, an fsync also waits for the discards of files deleted before it,
  and for other dirty data, so whichever came after a deletion paid for it.
  And the first large write after the guest dirtied its memory pays ~0.3-0.4 s
  of system time more than the next ones, whoever makes it (this host's page
  allocation: a plain write+fsync made first took 571 ms, the save after it
  218 ms; made second, 138 ms), so an untimed write of the same size comes
  before the save, and one before the floor's timed write (disk_floor): the floor
  comes after a restored VM ended, and its single try paid the same (252-434 ms
  against 85-122 for the same write right after, in 4 of 6 runs of 256/128).
- floor wb s: the same write+fsync, its writeback started every WRITEBACK_STEP bytes as it
  is written (sync_file_range), as a suspend's RAM file now is (snapshot/writer.py): what
  the save's own way of writing costs. write/floor, the goal's ratio, stays against floor s.
- restore s: from our clock reading before the spawn of `up --restore` to the
  monitor's "vcpus started" mark, taken once its vCPU threads are started (its
  --timings marks use the same CLOCK_MONOTONIC), as QEMU's figure runs until its
  vCPUs run (`cont`). The restore phases table says where that time went (the
  phases of splitvmm/timings.py, from the last run).
- ctl s: until the control socket first answers a status request. This bench asks it
  from its own process, as it asks QEMU through QMP: the socket exists from the devices'
  launch on, before the vCPUs run, so a `splitvmm ctl` client (an interpreter's start and
  imports) started when it appeared ran beside the restore it was waiting for.
- QEMU (when qemu-system-x86_64 is installed), on the same RAM: QEMU's KVM
  cannot run the `dirty` guest (an ELF with a 64-bit Linux-style entry), so it
  runs the firmware-hello guest (prints, then halts) with the same number of
  non-zero bytes put in its RAM from outside (a memory-backend-file on
  /dev/shm, at the `dirty` guest's range; shmem, like our memfd). What a
  snapshot costs depends on the RAM, not on the code the guest runs. Save: QMP
  `stop`, `migrate exec:cat > FILE` (bandwidth limit lifted), until completed,
  then fsync the file (QEMU does not): compare with pause ms. Restore: from
  the spawn of `qemu -incoming "exec:cat FILE"` (RAM: memory-backend-memfd)
  until `cont` returns after the migration completed.

Each figure is the median of --runs runs (the machine is noisy).

Restore, what changed (2026-12-01, issue 12 goal 4): a restore starts as a boot does, so
the start-up work (bench/startup.py: msgspec records, the launcher forked earlier) counts
here too; and the monitor no longer waits for the launcher's reply to its first request
(configure) while it decodes the states and copies RAM. Alternating restores of the same
snapshots, 9 pairs, to-vCPUs by the monitor's marks, configure's change alone: idle 512 MiB
224.7 ms against 231.7 (paired ratio 0.97), 256 MiB dirty 357.6 against 380.5 (0.955).
This bench, --sizes 512 --runs 3, back to back with this file on both trees: before the
session (f7e5af6) idle 0.293 s, 256 MiB dirty 0.368 s (QEMU 0.570, 0.655); after, idle
0.199 s, 256 MiB dirty 0.312 s (QEMU 0.527, 0.645). Goal (0.1 s, 0.25 s) not met: the
interpreters' start and imports are ~150 ms of the idle figure.

Tried for restoring 256 MiB of RAM and dropped (snapshot/ram.py keeps sendfile into the
memfd in 8 MiB pieces, each hashed on a helper thread while the next is copied: 112-130 ms
here, the copy alone): preadv into the mapping, 196-220 ms (a fault per fresh page), also
after MADV_POPULATE_WRITE on each piece; posix_fallocate before sendfile, no change; two
threads each sendfile()ing half of every piece, 226 ms against 225 (two busy cores: the
copy is CPU-bound); BLAKE3 with max_threads=AUTO on the helper, 134 ms against 112 (its
threads compete with the copy).

Tried for saving and dropped: finding zero pages with one mmap.find of a zero page per
extent instead of one per page (snapshot/ram.py nonzero_runs): 35 ms against 8.9 ms for
256 MiB of non-zero data (a search that long runs CPython's two-way algorithm over every
byte; a per-page find rejects a non-zero page after a few compares). The save's distance
from the floor (write/floor ~1.8 for 256 MiB dirty on a loaded host) is not the scan.
Changed since (2026-12-02): the per-page find itself was fast on pyenv's CPython 3.11.7
only. On Debian's 3.11.2, which .venv is made from now, it took 157-204 ms for 256 MiB of
data pages (write ms 220-230 against 72-93, live pause 318-494 against 89-146 ms), and on
both it took 130-430 ms for 128 MiB of zero pages. nonzero_runs now takes a page whose first
byte is set as data and compares any other whole (a copy and a memcmp): 3-4 ms for 256 MiB of
data pages, 17-38 ms for 256 MiB of zero pages, on both.

End of 2026-12-02's session, --sizes 512 --runs 3, two rounds alternating with its first
tree (1aa1705, .venv from pyenv's 3.11.7): restore, idle, 0.145 and 0.148 s against 0.188 and
0.183 (QEMU 0.50-0.98); 256 MiB dirty 0.320 and 0.246 against 0.286 and 0.336 (no change
outside the noise); save write/floor 1.29 and 1.24 against 1.50 and 1.29.

The next session's start-up work (bench/startup.py: kernel waits, imports) against its first
tree (037f155), busy hour: --runs 3, two rounds, restore idle 0.145 and 0.144 s against 0.162
and 0.133, 256 MiB dirty 0.302 and 0.245 against 0.251 and 0.266: single medians of three
cannot tell them apart here. Paired restores of one snapshot, the trees alternating (to
vCPUs, from `up --timings`): idle 512 MiB, 20 each, 145.0 -> 136.2 ms, median paired
difference -4.8 ms (bootstrap 95% [-13.9, 3.1]); 256 MiB dirty, 12 each, 290.0 -> 269.4,
-7.1 [-31.1, 12.9]. The goals (0.1 s idle, 0.25 s dirty) are not met: a restore is a
start-up first (~120-140 ms to the vCPUs here).

Changed (2026-12-02, a later session): the chunk checksum's helper thread (snapshot/digest.py
Overlapped) was started anew for every 8 MiB piece, ~0.6 ms each here; one helper now serves a
whole chunk. snapshot/ram.py write_ram of 256 MiB of data, the two trees alternating in fresh
processes (each after an untimed write of the same size, as below), 14 each: 90.6 -> 74.9 ms,
paired -15.8 ms [-20.4, 0.1]; load_ram 136.1 -> 130.9, -6.3 [-15.4, 6.5]. This bench cannot
show it: three rounds of --sizes 512 --runs 3 each, alternating, gave write ms 149/177/189
before and 162/178/180 after, the host's page-allocation stalls (a first large allocation
after a while costs 0.3-0.5 s here, on any write) moving single runs by more than that.

    python bench/snapshot.py [--sizes 128,512,2048] [--runs 3] [--json]

2026-12-02, fourth session, another host, --sizes 512 --runs 3: idle guest, restore 0.115 s
(QEMU 0.326); 256 MiB dirty, save 0.24 s, write 188 ms against a write+fsync floor of 0.17 s
(1.11), restore 0.202 s (QEMU 0.453). Of the idle restore's 116 ms to the vCPUs: interpreter
10, launcher fork 10, cli 16, command line 10, monitor imports 29, config 3, then the VM and
its devices (bench/startup.py has the timeline). No change to the path.

2026-12-03, a fast host (`python -c pass` 7.9 ms), --sizes 512, --runs 3 then 5: idle guest,
restore 0.104 s both times (QEMU 0.482, 0.348); 256 MiB dirty, restore 0.196 and 0.191 s (QEMU
0.368, 0.353), save write 162 and 170 ms against a write+fsync floor of 0.14 s (1.16, 1.19),
live pause 77 and 72 ms. Tried and dropped: a restore that,
as a boot does, asks for its devices before it loads RAM (no device reads guest RAM, or does
anything, before its channel is attached, after confinement), with the PIT's saved state set
first so that its re-injection switch (an SRCU grace period, holding the PIT's lock) starts as
early as a boot's: 16 paired restores of the idle guest, to the vCPUs by `up --timings`,
109.3 ms against 108.6, median paired difference -0.6 ms, inside a spread of +-10. The
monitor's decode and apply (~5 ms) were overlapping the wait for the zygote already.

2026-12-04, a slow hour, the monitor without pyzmq (its channels a plain socket: monitor/zmtp.py;
"import monitor" 39-43 ms against 62-70), --sizes 512 --runs 3, back to back with b498c6a:
restore, idle, 0.191 s against 0.212 (QEMU 0.73-0.78); 256 MiB dirty 0.378 against 0.391; save
write/floor 1.37 against 1.40. A restore now waits on the zygote's imports as a boot does
("device launch requests" 34 ms idle). Goals (0.1 s, 0.25 s, 1.2) not met in this hour.

2026-12-06, pre-copy (vm.track_dirty_pages: monitor/dirtylog.py, snapshot/ram.py sparse-v2), the
"tracked" columns new, --sizes 512 --runs 3, two runs an hour apart, splitvmm's figures (live
pause untracked / tracked, ms): idle 8 / 8 and 10 / 6; 256 MiB dirty 165 / 9 and 81 / 9. The
tracked snapshot's whole write (both passes, the copy made while the guest runs included, its
fsyncs) is 413 and 449 ms against the suspend's 304 and 317: the host pays for the first pass,
the guest no longer waits for it. Its guest writes nothing after its fill, so the second pass
holds only what the devices and the spinning vCPU touched. Same runs: save write/floor 1.06 and
1.05, restore idle 0.120 and 0.163 s (QEMU 0.303 and 0.308; a slower hour for the second:
bench/startup.py's `python -c pass` floor read 10.6 ms then, 8.9 at the session's start), 256 MiB
dirty 0.227 and 0.223 s.
Later the same session, with the passes made again while the guest runs (89dede3) and the busy
table new, --runs 3: live pause untracked / tracked, idle 8 / 6, 256 MiB dirty 79 / 8; the
guest rewriting its 256 MiB at 256 MiB/s 82 / 11 ms, at 1024 MiB/s 249 / 52 ms. In one-off runs
of the busy guest (the tracked snapshot kept, its passes counted): at 64 MiB/s one pass made
again, at 256 two, at 1024 none (what it wrote during the first was over half of it), and then
the pause copied the 181 MiB written meanwhile (183-189 ms in those runs, against 261 untracked).

2026-12-06, where the idle restore's last ~10 ms go, with device-side marks (not committed) and
`perf sched` (idle 512 MiB, this file's snapshot restored 10-20 times per variant, to the vCPUs
by the monitor's marks; the figures are offsets from the first mark). The zygote is ready at
~+52 ms and waits; the monitor sends its launch requests at ~+67-72, after its imports and
config, and the vCPUs start at ~+91. After the launch two paths of ~20 ms each run side by side:
- the devices: each spawn is a round trip through the launcher and the zygote's two forks (the
  monitor waits for its pid: 3 ms for the first, 8-13 for the second, its fork sharing the cores
  with the first device's sandbox entry, ~6 ms of which the warden's fork is ~1.5), then their
  set-up (~1-3 ms), then READY, which waits for the monitor to serve their channels;
- the monitor: it serves them only once confined (~4 ms: policies, capabilities, Landlock, the
  filter), and confines itself only single-threaded, after the PIT's re-injection switch ends.
  That switch ends 15-25 ms after KVM_CREATE_PIT2, wherever it starts in that window (an SRCU
  grace period that the PIT's creation leaves under way: 40 ms after it the switch takes 0.3
  ms): starting it right after the PIT's creation instead of after apply(), 16 pairs, -0.5 ms.
  Making the VM, its RAM slots, irqchip and PIT before the monitor's imports (a prototype) took
  the PIT's wait out of the monitor's confinement (13.6 -> 3.5 ms) and left the devices' path
  the longer: to the vCPUs 104.9 against 103.7 ms, no gain.
- importing the launcher's server code before its fork (it then imports nothing, as the monitor
  needs the same modules; the zygote starts ~13 ms later and is still ready before the first
  request): restore 107.2 against 109.7 ms (20 pairs, paired difference -4.0), a boot's wall
  clock unchanged (30 alternating pairs of whole `up` processes: 1.004) with 5% less CPU. Not done:
  it reverses the order that keeps the zygote's exec first (sandbox/launcher_start.py,
  tests/integration/test_startup_imports.py), for a gain inside this host's spread (102-115 ms).
- byte-code without column tables (-X no_debug_ranges: .pyc 8% smaller): the same imports.
So the goal's last 5-10 ms are CPU on 2 cores, shared between the monitor's imports and each
device's two forks and sandbox: the same work in less CPU, not another order.

2026-12-06, later: each pass now copies what a device wrote since the pass before (its marks
harvested: monitor/dirtylog.py), where it copied all the device had written since the first,
and the reading table is new. The reading guest at 50 blocks a second in a 512 MiB VM (256
MiB of buffers), tracked, 5 snapshots each, the trees alternating: live pause 34.5 ms
(31-39) before, 6.9 ms (6-8) after; the pause copied 0-3 MiB after (two passes made again
while it ran, of 39-48 and 6-9 MiB). At 200 blocks a second, faster than the first pass of
256 MiB converges here, 117 ms before and 136 after (45-149, 3 runs): both pauses copy what
was written during the first pass (145 MiB in one run).

2026-12-06, another session and host (`python -c pass` 8.0-8.9 ms; the idle restore 106-110 ms
to the vCPUs, median of 10), the same marks again (offsets from the spawn, medians of 10):
the launch requests at +84, the serial device running at +88 and the rtc at +94 (its request
waits for the first's reply: 3 and 6 ms), the monitor idle in the PIT's switch from +92 to
+100, then its policies (1.5 ms) and confinement (2.4); the devices' filters loaded at +96
and +100, READY at +104 and +105, the vCPUs at +106. Tried: decoding the states after the
PIT's creation, so that its grace period starts ~4.6 ms sooner: 12 alternating pairs, paired
difference -0.3 ms. What the monitor's CPU goes to before the launch: 199 modules, 4.4 MB of
byte-code unmarshalled (~11 ms; splitvmm's own 1.5 MB, ~4 ms), and click brings inspect,
ast, dis, uuid (with platform), datetime and gettext, ~6.5 ms that nothing of splitvmm uses.
No change to the path.

2026-12-06, a third session, same kind of host (the idle restore 108-111 ms to the vCPUs at
its start, alternating with 1c47f01). Marks in every process again (monitor, launcher,
zygote, devices, wardens; offsets from the spawn, with each process's CPU time):
- After the launch requests two paths ran side by side, and both were ~17 ms: the monitor's
  (the launch replies, then 7.4 ms idle in the PIT's switch, then confinement) and the
  devices' (each a spawn through the launcher and the zygote's two forks, then its sandbox
  entry and READY). Moving only one of them gains nothing, which is why each earlier try
  read ~0: the PIT's switch started once the vCPUs run took the monitor's path to ~10 ms
  and the restore 0.7 ms (20 pairs), the devices' path then being the longer.
- The devices' path is CPU on two cores, not waiting: from the first launch request to the
  last READY five or six processes are runnable (the monitor confining itself, the launcher,
  the zygote, each device and its warden), and a device's fork of its warden takes 3-6 ms
  of wall clock for 0.4 ms of its own CPU. Per device: ~2.8 ms of CPU from the zygote's fork
  to its warden (of which ~1.4 before its own code runs: the forks' copy-on-write), ~1.5 in
  the warden before its exec, ~3.1 in the device to READY. Sending every launch request
  before taking any reply (a prototype: the launcher forks the second device while the
  monitor has not read the first reply) read +0.3 ms over 20 pairs.
- So the change was CPU a device does that no spec decides, done once in the zygote before
  it forks: the decoding plans of the model's saved state, its policy parsed (0ff2a5e, with
  the PIT's switch) and its enforcing filter compiled (af3842c): 3.7 -> 2.8 ms of CPU before
  the warden, 3.9 -> 2.4-2.8 after. Paired restores, to the vCPUs: 0ff2a5e against 1c47f01,
  108.2 -> 104.2 ms (20 pairs, median paired difference -3.3; another round -3.8); af3842c
  against 0ff2a5e -0.3 and -1.3 ms (20 and 24 pairs); a02a79e (each model prepared once, not
  again at each fork) against 1c47f01, 107.2 -> 103.7 ms (24 pairs, -3.7). This bench,
  --sizes 512 --runs 3 at 0ff2a5e: idle restore 0.100 s (QEMU 0.388), 256 MiB dirty 0.196 s
  (QEMU 0.522); --sizes 128,2048 at 5300baa: idle 0.105 and 0.104 s.
- Then the devices that are handed no guest RAM (here both) are asked for before the RAM
  load, without waiting for the launcher's replies (taken once RAM is loaded, before the
  devices handed RAM are asked for), their irqfds held until the saved irqchip is set
  (monitor/devicefds.py HeldIrqfds): the vCPUs' creation and apply() now overlap the spawns.
  Against d48b4b3, to the vCPUs: -2.5 and -2.6 ms (24 and 30 pairs, a prototype), -3.2 (24
  pairs). Asked for early but waiting for each reply, as before: -0.5 and +0.2 (24 and 30
  pairs). The 256 MiB dirty restore is unchanged (this bench, --runs 3: 0.195 s against
  0.194): the devices' start then takes the second core from the RAM load's checksums.
- Whole `up` of the firmware hello guest, 20 alternating pairs: unchanged (+0.5 ms). A boot
  keeps the PIT's switch before its devices: moved after its vCPUs too, a guest that ends at
  once made the close wait for it (+9.3 ms).
- What is left on the way: the monitor's ~60 ms of imports (interpreter 10, launcher fork
  11, click and logging 18, command line 9, monitor 25) before anything of the VM, and the
  ~17 ms window above, which is CPU: a device's two forks, its warden's exec, namespaces
  (a new net namespace is 0.3 ms of its unshare), pivot_root (the old root's lazy unmount
  ~1 ms in a profile of the device), Landlock, and the monitor's own confinement
  (~4 ms: its two policies parsed and compiled 1.4, sysconfig's paths for Landlock 0.7).

2026-12-06, the cyclic collector held off while the monitor imports and reads its config and
snapshot (cli/early.py hold_collector, released before run_vm), and in the zygote for its
life (devprocs/zygote.py; each device turns it on). Collections counted with gc.callbacks:
the monitor 49 (boot) and 52 (restore) collections, ~5-6 ms, before its release point; the
zygote's imports and two models 27, ~2.4 ms. Earlier tries read no difference (bench/startup.py:
the zygote alone, and the monitor alone up to its imports, in start-ups of ~250 ms); both
together, paired with the tree before (34637fc), whole restores of the 512 MiB idle snapshot
to the vCPUs: 100.8 -> 97.1 ms (20 pairs, paired median -3.9), 95.6 -> 90.3 (20, -5.5), 96.5
-> 92.7 (30, -4.0); whole `up` of the hello guest 103.7 -> 99.7 (20, -3.3), 101.2 -> 97.1 (30,
-3.7). Held on until the vCPUs start instead (a prototype): -0.2 ms more, not kept. The
garbage frozen at the release: ~395 objects (functions and classes of the imports), none
holding an fd.

2026-12-06, same session: a suspend's RAM file starts to reach the disk as it is written
(SnapshotWriter.add_ram's writeback: sync_file_range(SYNC_FILE_RANGE_WRITE) every 8 MiB),
so the commit's fsync waits for the last piece, not the whole file. By hand first (a file
written in 8 MiB pieces, then fsynced, 7 alternating tries each): 64 MiB 56.0 -> 40.2 ms,
256 MiB 186.3 -> 118.7; the writes themselves 18.4 -> 21.8 and 65.7 -> 114.8 ms, as each
piece now goes to the disk while the next is copied. So a live snapshot, whose pause ends
with the copy, does not do it; a suspend, or a snapshot of a paused VM, whose VM waits for
the commit anyway, does. This bench, --sizes 128,512 --runs 3, one run each of the tree
before and after, same hour: save write 56 -> 38 ms at 64 of 128 MiB (write/floor 1.31 ->
1.03), 178 -> 148 ms at 256 of 512 (1.14 -> 0.89); the live pauses unchanged (29 and 77 ms
both). The floor now has a second column taken the save's way (floor wb s, above).
Then, both changes in (the collector's hold and this), --sizes 128,512,2048 --runs 3: idle
restore 0.094 / 0.092 / 0.091 s (QEMU 0.108 / 0.303 / 1.077); save write/floor 1.14 at 64 of
128 MiB (38 ms against a floor of ~33), 0.83 at 256 of 512, 0.84 at 1024 of 2048 (472 ms
against 0.56 s; floor wb 0.47); restore with 256 MiB dirty 0.179 s (QEMU 0.361). A live
pause of 117 ms at 64 of 128 MiB in that run, the first VM of it; --sizes 128 again right
after: 25 ms (29 before the change), write/floor 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.qmp import Qmp  # noqa: E402
from bench.vmrun import (  # noqa: E402
    compile_package,
    host_tsc_khz,
    wait_for_text,
    write_config,
)
from splitvmm.monitor.control import READ_ONLY_TIMEOUT_S, ControlError, request  # noqa: E402
from splitvmm.native import files  # noqa: E402
from splitvmm.snapshot.writer import WRITEBACK_STEP  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

FIRST = re.compile(r"timings: first mark at monotonic ([\d.]+) s")
PHASE = re.compile(r"timings: phase (.+?)\s+([\d.]+) ms$", re.MULTILINE)
VCPUS_START = "vcpus started"  # the mark right after the vCPU threads start (Machine.run)
QEMU = "qemu-system-x86_64"
DIRTY_START_MIB = 16  # where the `dirty` guest starts writing (tests/guests/dirty.c)
WAIT_TIMEOUT_S = 120  # a guest's line, a loaded host included
# The busy guest rewrites its data at these rates (MiB/s), a MiB at a time, moving across it:
# what a live snapshot's passes chase (the first converges here, the second is faster than half
# the copy runs, so no pass is made again). It has run this long when the snapshot is asked.
STREAM_MIB_S = (256, 1024)
STREAM_SETTLE_S = 0.3
# The reading guest: 1 MiB blocks a second (half of them read, by the device, into guest RAM),
# its buffers over half its RAM up to this much (a round of them takes READ_SPREAD_MIB /
# READ_BLOCKS_S seconds before each of its snapshots), its disk that large.
READ_BLOCKS_S = 50
READ_SPREAD_MIB = 256


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitvmm", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def settle() -> None:
    """Write back everything dirty (and commit the file system's journal, with the discards
    of deleted files) outside any timed step, so that no step pays for the one before."""
    os.sync()


def disk_floor(work: Path, size: int) -> float:
    """Seconds to write `size` bytes and fsync them, in 1 MiB pieces, after an untimed write
    of the same, as the save comes after one (one()): the first large write after the
    host's memory churned (a guest dirtied its RAM, a VM ended) pays more, whoever makes it."""
    piece = os.urandom(1 << 20)
    write_fsync(work, size, piece)
    return write_fsync(work, size, piece)


def write_fsync(work: Path, size: int, piece: bytes, writeback: bool = False) -> float:
    """Seconds to write `size` bytes (whole pieces) to a new file in `work` and fsync it,
    from a settled disk; the file is removed afterwards. `writeback`: the file's disk writes
    started every WRITEBACK_STEP bytes as it is written, as a suspend's RAM file is
    (snapshot/writer.py)."""
    settle()
    t0 = time.perf_counter()
    with open(work / "floor.bin", "wb") as f:
        for n in range(1, (size >> 20) + 1):
            f.write(piece)
            if writeback and not (n << 20) % WRITEBACK_STEP:
                f.flush()
                files.start_writeback(f.fileno())
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    (work / "floor.bin").unlink()
    return elapsed


def restore_phases(stderr: str, spawned_at: float) -> dict[str, float]:
    """The restored monitor's phases in ms, with 'to vCPUs' from the spawn to VCPUS_START."""
    first = FIRST.search(stderr)
    if first is None:
        raise SystemExit(f"the restored VM printed no timings:\n{stderr}")
    phases = {"interpreter start": (float(first.group(1)) - spawned_at) * 1e3}
    phases |= {name: float(ms) for name, ms in PHASE.findall(stderr)}
    names = list(phases)
    if VCPUS_START not in names:
        raise SystemExit(f"no {VCPUS_START!r} mark:\n{stderr}")
    phases["to vCPUs"] = sum(phases[n] for n in names[: names.index(VCPUS_START) + 1])
    return phases


def answers(control: Path) -> bool:
    """Whether the VM's control socket answers a status request, asked from this process."""
    if not control.exists():
        return False
    try:
        request(control, "status", timeout_s=READ_ONLY_TIMEOUT_S)
    except ControlError:
        return False
    return True


def restore(env: dict[str, str], config: Path, snap: Path, work: Path) -> dict[str, object]:
    argv = [sys.executable, "-m", "splitvmm", "up", str(config), "--restore", str(snap)]
    settle()
    t0 = time.perf_counter()
    restored = subprocess.Popen(
        [*argv, "--timings"], env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # Asked from this process, as QEMU is through QMP: the control socket exists from the
    # devices' launch on, and a `ctl` client (an interpreter's start and imports) started
    # then took the CPU of this 2-core host from the restore it was waiting for.
    control = Path(env["XDG_RUNTIME_DIR"]) / "splitvmm" / "bench-snap" / "control.sock"
    while not answers(control):
        if restored.poll() is not None:
            raise SystemExit(f"restore failed: {restored.stderr.read() if restored.stderr else ''}")
        time.sleep(0.002)
    ctl_s = time.perf_counter() - t0
    request(control, "suspend", {"path": os.path.join(os.path.realpath(work), "again")})
    _, err = restored.communicate(timeout=60)
    shutil.rmtree(work / "again", ignore_errors=True)
    phases = restore_phases(err, t0)
    return {"restore_s": phases["to vCPUs"] / 1e3, "ctl_s": ctl_s, "phases_ms": phases}


def dirty_vm(
    work: Path,
    guest: Path,
    mib: int,
    dirty_mib: int,
    name: str,
    vm_extra: str = "",
    rate: int = 0,
) -> tuple[dict[str, str], subprocess.Popen[str], Path]:
    """The `dirty` guest booted (its environment, its process, its config), once it has
    written its data; with `rate`, once it rewrites it at `rate` MiB/s (tests/guests/README.md)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run")}
    serial, config = work / f"serial-{name}-{mib}-{dirty_mib}.log", work / f"{name}.toml"
    serial.unlink(missing_ok=True)
    streaming = f" rate={rate} tsc_khz={host_tsc_khz()}" if rate else ""
    boot = f'kernel = "{guest}"\ncmdline = "mib={dirty_mib}{streaming}"'
    write_config(config, "bench-snap", boot, f"{mib}M", serial, vm_extra)
    vm = started(env, config)
    wait_for_text(serial, f"dirty: {dirty_mib} MiB written", vm, WAIT_TIMEOUT_S)
    if rate:
        wait_for_text(serial, "dirty: streaming", vm, WAIT_TIMEOUT_S)
        time.sleep(STREAM_SETTLE_S)
    return env, vm, config


def started(env: dict[str, str], config: Path) -> subprocess.Popen[str]:
    """`splitvmm up config`, running on: its stderr kept for its end."""
    return subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(config)],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_spread_mib(mib: int) -> int:
    """MiB of request buffers (and of disk) of the reading guest in a VM of `mib` MiB: half its
    RAM, at most READ_SPREAD_MIB."""
    return min(mib // 2, READ_SPREAD_MIB)


def reading_vm(
    work: Path, guest: Path, mib: int, tracked: bool
) -> tuple[dict[str, str], subprocess.Popen[str]]:
    """The virtio-blk loop guest reading its disk into buffers spread over half its RAM, at
    READ_BLOCKS_S blocks a second, in a VM with vm.track_dirty_pages or not (its environment
    and process), once it has gone round its buffers."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run")}
    spread = read_spread_mib(mib)
    serial, config, disk = work / "serial-reading.log", work / "reading.toml", work / "reading.img"
    serial.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(spread << 20)
    line = f"mode=loop size={spread}M every=16M depth=1 spread={spread}M"
    line += f" rate={READ_BLOCKS_S} tsc_khz={host_tsc_khz()}"
    extra = "track_dirty_pages = true\n" if tracked else ""
    write_config(
        config, "bench-snap", f'kernel = "{guest}"\ncmdline = "{line}"', f"{mib}M", serial, extra
    )
    with config.open("a") as f:
        f.write(f'[[device]]\nname = "blk0"\nmodel = "virtio-blk"\npath = "{disk}"\n')
    vm = started(env, config)
    wait_for_text(serial, "virtio-blk: loop pass=1 ", vm, WAIT_TIMEOUT_S)
    return env, vm


def live_snapshot(
    work: Path, guest: Path, mib: int, dirty_mib: int, tracked: bool, rate: int = 0
) -> dict[str, float]:
    """A `ctl snapshot` of the guest in a VM of its own, with vm.track_dirty_pages or not, the
    guest idle after its fill or rewriting it at `rate` MiB/s: its reply (pause_ms, write_ms)."""
    extra = "track_dirty_pages = true\n" if tracked else ""
    env, vm, _ = dirty_vm(work, guest, mib, dirty_mib, "live", extra, rate)
    return live_pause(work, env, vm)


def live_pause(work: Path, env: dict[str, str], vm: subprocess.Popen[str]) -> dict[str, float]:
    """A `ctl snapshot` of the running VM `vm`, which ends after it: the reply (pause_ms,
    write_ms)."""
    snap = work / "live-own"
    try:
        settle()
        reply = run(env, "ctl", "--vm", "bench-snap", "snapshot", str(snap), "--json")
        if reply.returncode != 0:
            raise SystemExit(f"live snapshot failed: {reply.stderr}")
    finally:
        vm.terminate()
        vm.communicate(timeout=60)
    shutil.rmtree(snap, ignore_errors=True)
    return json.loads(reply.stdout)  # type: ignore[no-any-return]


def tracked_live(
    work: Path, guest: Path, mib: int, dirty_mib: int, reader: Path | None
) -> dict[str, float]:
    """The live snapshots of VMs with vm.track_dirty_pages: of the guest idle after its fill
    (pause and write), and, with data to rewrite, the pause of it rewriting it at each of
    STREAM_MIB_S, and of `reader` (the virtio-blk guest) reading its disk, and the same
    without tracking."""
    idle = live_snapshot(work, guest, mib, dirty_mib, tracked=True)
    figures = {"tracked_pause_ms": idle["pause_ms"], "tracked_write_ms": idle["write_ms"]}
    for rate in STREAM_MIB_S if dirty_mib else ():
        for tracked, key in ((False, "busy_pause_ms"), (True, "busy_tracked_pause_ms")):
            busy = live_snapshot(work, guest, mib, dirty_mib, tracked, rate)
            figures[f"{key}_{rate}"] = busy["pause_ms"]
    if dirty_mib and reader is not None:
        for tracked, key in ((False, "reading_pause_ms"), (True, "reading_tracked_pause_ms")):
            figures[key] = live_pause(work, *reading_vm(work, reader, mib, tracked))["pause_ms"]
    return figures


def one(
    work: Path, guest: Path, mib: int, dirty_mib: int, reader: Path | None = None
) -> dict[str, object]:
    snap = work / "snap"
    env, vm, config = dirty_vm(work, guest, mib, dirty_mib, "vm")
    disk_floor(work, (dirty_mib + 1) << 20)  # untimed: the first large write pays more
    settle()
    live = json.loads(run(env, "ctl", "--vm", "bench-snap", "snapshot", str(snap), "--json").stdout)
    shutil.rmtree(snap)
    settle()
    t0 = time.perf_counter()
    reply = run(env, "ctl", "--vm", "bench-snap", "suspend", str(snap), "--json")
    save_s = time.perf_counter() - t0
    if reply.returncode != 0:
        vm.kill()
        raise SystemExit(f"suspend failed: {reply.stderr} (VM: {vm.communicate()[1]})")
    vm.wait(60)
    size = sum(p.stat().st_size for p in snap.iterdir())
    restored = restore(env, config, snap, work)
    floor_s = disk_floor(work, size)  # one try, as the save had one: medians over the runs
    floor_wb_s = write_fsync(work, size, os.urandom(1 << 20), writeback=True)
    shutil.rmtree(snap)
    saved = json.loads(reply.stdout)
    return {
        "save_s": save_s,
        "write_ms": saved["write_ms"],
        "pause_ms": saved["pause_ms"],
        "live_pause_ms": live["pause_ms"],
        "size_mib": size / (1 << 20),
        **restored,
        "floor_write_fsync_s": floor_s,
        "floor_writeback_fsync_s": floor_wb_s,
        **tracked_live(work, guest, mib, dirty_mib, reader),
    }


def qemu_argv(qemu: str, firmware: Path, mib: int, backend: str, qmp: Path) -> list[str]:
    return [
        *(qemu, "-accel", "kvm", "-bios", str(firmware), "-display", "none", "-nodefaults"),
        *("-m", f"{mib}M", "-object", f"{backend},id=mem,size={mib}M"),
        *("-machine", "memory-backend=mem", "-qmp", f"unix:{qmp},server=on,wait=off"),
    ]


def qemu_memory(path: Path, mib: int, dirty_mib: int) -> None:
    """A RAM image with dirty_mib MiB of non-zero bytes where the `dirty` guest writes them."""
    piece = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.truncate(mib << 20)
        f.seek(DIRTY_START_MIB << 20)
        for _ in range(dirty_mib):
            f.write(piece)


def qemu_one(qemu: str, work: Path, firmware: Path, mib: int, dirty_mib: int) -> dict[str, float]:
    """QEMU's save (stop, migrate to a file, fsync) and restore (spawn to running)."""
    ram, state, qmp = (
        Path(f"/dev/shm/splitvmm-bench-{os.getpid()}"),
        work / "qemu.state",
        work / "q",
    )
    serial = work / "qemu-serial.log"
    serial.unlink(missing_ok=True)
    qemu_memory(ram, mib, dirty_mib)
    backend = f"memory-backend-file,mem-path={ram},share=on"
    src = subprocess.Popen(
        [*qemu_argv(qemu, firmware, mib, backend, qmp), "-serial", f"file:{serial}"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_text(serial, "Hello from splitvmm firmware!", src, WAIT_TIMEOUT_S, "QEMU")
        q = Qmp(qmp)
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # default: 128 MiB/s
        settle()
        t0 = time.perf_counter()
        q.cmd("stop")
        q.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
        q.wait_migration()
        fd = os.open(state, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        save_s = time.perf_counter() - t0
        q.cmd("quit")
        q.close()
    finally:
        src.wait(60)
        ram.unlink()
        qmp.unlink(missing_ok=True)
    settle()
    t0 = time.perf_counter()
    incoming = ("-serial", "null", "-incoming", f"exec:cat {shlex.quote(str(state))}")
    dst = subprocess.Popen(
        [*qemu_argv(qemu, firmware, mib, "memory-backend-memfd", qmp), *incoming],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        q = Qmp(qmp)
        q.wait_migration()
        q.cmd("cont")  # the VM was stopped when saved: it stays paused until told
        restore_s = time.perf_counter() - t0
        q.cmd("quit")
        q.close()
    finally:
        dst.wait(60)
        qmp.unlink(missing_ok=True)
    size = state.stat().st_size
    state.unlink()
    return {"qemu_save_s": save_s, "qemu_restore_s": restore_s, "qemu_size_mib": size / (1 << 20)}


def median_row(runs: list[dict[str, object]]) -> dict[str, object]:
    """Each figure's median over the runs; the phases of the last run."""
    row: dict[str, object] = {}
    for key, value in runs[0].items():
        if isinstance(value, float | int):
            row[key] = statistics.median(float(r[key]) for r in runs)  # type: ignore[arg-type]
        else:
            row[key] = runs[-1][key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,512,2048", help="guest RAM sizes in MiB")
    parser.add_argument("--runs", type=int, default=3, help="runs of each size (medians)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_package()
    rows = []
    qemu = shutil.which(QEMU)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        guests = build_guests(work / "guests")
        for mib in (int(s) for s in args.sizes.split(",")):
            for dirty in (0, mib // 2):
                runs = []
                for _ in range(args.runs):  # alternate, so drift on the host hits both alike
                    figures = one(work, guests["dirty"], mib, dirty, guests["virtio-blk"])
                    if qemu:
                        figures |= qemu_one(qemu, work, guests["firmware-hello"], mib, dirty)
                    runs.append(figures)
                rows.append({"memory_mib": mib, "dirty_mib": dirty, **median_row(runs)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_tables(rows, args.runs)


def print_tables(rows: list[dict[str, object]], runs: int) -> None:
    console = Console(width=max(Console().width, 190))  # a pipe gets 80: too narrow
    table = Table(
        title=f"snapshot (suspend) and restore, median of {runs}; "
        "floor = write+fsync of the same bytes; wb: written back as written, as the save"
    )
    columns = ["RAM MiB", "dirty MiB", "save s", "write ms", "pause ms", "live pause ms"]
    columns += ["tracked live pause ms", "tracked write ms", "size MiB", "floor s", "floor wb s"]
    qemu_columns = ("QEMU save s", "QEMU restore s", "restore / QEMU")
    for col in (*columns, "write/floor", "restore s", "ctl s", *qemu_columns):
        table.add_column(col, justify="right")
    for r in rows:
        floor = float(r["floor_write_fsync_s"])  # type: ignore[arg-type]
        floor_wb = float(r["floor_writeback_fsync_s"])  # type: ignore[arg-type]
        write_s = float(r["write_ms"]) / 1e3  # type: ignore[arg-type]
        table.add_row(
            *(str(r[k]) for k in ("memory_mib", "dirty_mib")),
            f"{r['save_s']:.2f}",
            f"{r['write_ms']:.0f}",
            f"{r['pause_ms']:.0f}",
            f"{r['live_pause_ms']:.0f}",
            f"{r['tracked_pause_ms']:.0f}",
            f"{r['tracked_write_ms']:.0f}",
            f"{r['size_mib']:.1f}",
            f"{floor:.2f}",
            f"{floor_wb:.2f}",
            f"{write_s / floor:.2f}" if floor >= 0.01 else "—",
            f"{r['restore_s']:.3f}",
            f"{r['ctl_s']:.2f}",
            *qemu_cells(r),
        )
    console.print(table)
    busy = [r for r in rows if f"busy_pause_ms_{STREAM_MIB_S[0]}" in r]
    if busy:
        t = Table(title="live pause ms, the guest rewriting its data (median)")
        for col in ("RAM MiB", "data MiB", "rewritten MiB/s", "untracked", "tracked"):
            t.add_column(col, justify="right")
        for r in busy:
            for rate in STREAM_MIB_S:
                t.add_row(
                    *(str(r[k]) for k in ("memory_mib", "dirty_mib")),
                    str(rate),
                    f"{r[f'busy_pause_ms_{rate}']:.0f}",
                    f"{r[f'busy_tracked_pause_ms_{rate}']:.0f}",
                )
        console.print(t)
    reading = [r for r in rows if "reading_pause_ms" in r]
    if reading:
        t = Table(title="live pause ms, the guest reading its disk (median)")
        for col in ("RAM MiB", "buffers MiB", "blocks/s", "untracked", "tracked"):
            t.add_column(col, justify="right")
        for r in reading:
            t.add_row(
                str(r["memory_mib"]),
                str(read_spread_mib(int(r["memory_mib"]))),  # type: ignore[call-overload]
                str(READ_BLOCKS_S),
                f"{r['reading_pause_ms']:.0f}",
                f"{r['reading_tracked_pause_ms']:.0f}",
            )
        console.print(t)
    if "qemu_save_s" not in rows[0]:
        console.print(f"QEMU: {QEMU} not found (apt-get install qemu-system-x86)")
    phases = Table(title="restore phases, ms (last run; up --timings)")
    phases.add_column("phase")
    for r in rows:
        phases.add_column(f"{r['memory_mib']}/{r['dirty_mib']}", justify="right")
    names = list(rows[0]["phases_ms"])  # type: ignore[call-overload]
    for name in names:
        cells = [f"{r['phases_ms'].get(name, 0.0):.1f}" for r in rows]  # type: ignore[attr-defined]
        phases.add_row(name, *cells)
    console.print(phases)


def qemu_cells(r: dict[str, object]) -> tuple[str, str, str]:
    if "qemu_save_s" not in r:
        return ("—", "—", "—")
    ratio = float(r["restore_s"]) / float(r["qemu_restore_s"])  # type: ignore[arg-type]
    return (f"{r['qemu_save_s']:.3f}", f"{r['qemu_restore_s']:.3f}", f"{ratio:.2f}")


if __name__ == "__main__":
    main()
