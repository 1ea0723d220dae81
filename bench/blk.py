"""virtio-blk throughput: splitvmm next to QEMU and host `dd`, on the same guest and file.

Runs the firmware-virtio-blk test guest (a `-bios` image written from the virtio spec; it
assigns the BARs itself, as no firmware does it under `qemu -bios`) in `mode=bench`: seven
passes (PASSES) of: write `size` (64 MiB) sequentially in 1 MiB requests, FLUSH, read it back
in 1 MiB requests, then 4096 random 4 KiB reads; 8 requests in flight, polling the used ring,
each phase timed with the TSC. Ticks become seconds with KVM's TSC rate, the one both
VMMs' vCPUs run at, as bench/serial.py and bench/exit_qemu.py do: not with the rate the guest
prints, which it measures against the PIT over 50 ms and which comes out too high whenever
its vCPU is preempted near the end of that window (up to 1.24x here under load, either VMM),
inflating that run's every figure while dd's clock is right. Under `splitvmm up` the
requests go to the virtio-blk device process through its ioeventfd, and data moves between
the image (page cache) and guest RAM with preadv/pwritev in that process; under
`qemu-system-x86_64 -accel kvm` to virtio-blk-pci (cache=writeback: also the page cache).
The floor, in the same run on the same file: `dd` with 1 MiB blocks (page cache, as both
VMMs use it), and 4 KiB preads at the same random offsets from one host thread, PASSES
times each.

Both VMMs run the guest alternately, RUNS times each; each figure is the median over every
pass of every run. A 64 MiB phase lasts ~5 ms, and `dd` alone moves by up to 2x from one
run to the next on this shared host, so a median of single passes was mostly noise. The
guest's driver runs at CPL3 (native on a PVM host) once set up, the same for both VMMs, so
what differs is the device's work per request.

    python bench/blk.py [--runs R] [--cache page|direct] [--json]

--cache direct runs the same with O_DIRECT on every side: splitvmm's `direct = true`, QEMU's
cache=none (O_DIRECT, its default aio=threads pool), and the floor's reads and writes on an
O_DIRECT fd with DEPTH of them in flight, as the guest keeps them and both VMMs pass them on
(QEMU's thread pool, splitvmm's AIO): a disk's figure depends on its queue depth, and a dd
(one 1 MiB request at a time) gave a floor that both VMMs beat by 1.2-1.4x. Then the figures
are the disk's under the file system, not the copy out of the page cache.

Where a 1 MiB read's time goes, and what was tried (2026-12-01; bench/blk_request.py gives
the device's cost per request in one process, 10th percentile; figures in us per request):

- Before: 1 MiB IN 69.4-70.8 (preadv alone 53.5), 4 KiB IN 13.7-13.9 (preadv 1.3): ~20
  GuestRam calls a request (a bisect and a bytes copy each) for the avail idx, head,
  descriptors, header, used entry, used idx and status byte.
- Kept: each ring part a RamWindow checked once at queue set-up and read in place
  (struct.unpack_from), written by slice assignment; one walk loop for the ring and an
  indirect table, every check inline; GuestRam.offset() tries the range it hit last; the
  blk header read in place, the status byte stored alone; a one-page dirty mark sets one
  bit; kicks off while a queue is drained (VIRTQ_USED_F_NO_NOTIFY, or avail_event held
  with EVENT_IDX), as QEMU does: the guest made 5 notifies in a quiet bench run, against
  4205 (one per request) before. After: 1 MiB IN 62.8-65.4, 4 KiB IN 8.6 (pop 2.3, handle 3.9 of which preadv 1.3,
  push 1.2). Inside a bench run (the device timing its own drain loop) a 1 MiB read costs
  pop 3.4 + handle 58-60 + push 1.8 us, and the ring never ran dry during seq-read.
- Found on the way: struct.pack_into zeroes a field before it stores it, so a used idx
  written with it reads 0 to a polling driver now and then; the bench guest failed on
  every run (status 255, "a chain that is not in flight"). Guest memory is written by
  slice assignment (RamWindow.write), and a unit test keeps pack_into out of devprocs.
- Dropped, coalescing contiguous requests into one preadv: 8 preadv of 1 MiB against one
  preadv of 8 iovecs cost the same (52.1-53.3 against 52.1-52.9 us per MiB), and every
  completion would wait for the batch.
- Dropped, publishing used idx once per batch: saves 0.37 us a request (1.10 -> 0.73 for
  the push), and holds each completion back until the batch ends.
- Dropped, a thread pool for preadv: a prototype (pop and parse on the main thread,
  preadv in ThreadPoolExecutor workers, completions pushed in order) with a spinning
  process standing in for the polling vCPU: serial 15153 MiB/s, 1 worker 11835, 2 workers
  13002, 4 workers 9823. The sandbox also starts no thread after set-up.
- Not done, the ring walk in C through cffi: pop and push are ~5 us of a ~64 us request
  in a run, and parsing hostile rings in C would put memory-unsafe code where the guest
  attacks (STYLE 0.2: security before speed).
- Whole bench, same session, 7 runs each, 1-minute load 0.6-0.9 (medians, MiB/s or IOPS;
  splitvmm / QEMU / dd): before (77188ad) seq-read 9862 / 13876 / 15745 (0.63 of dd, 0.71
  of QEMU), rand-read-4k 68513 / 106177; after, three runs: seq-read 12354 / 12711 /
  14213 (0.87, 0.97), 10362 / 12128 / 15354 (0.67, 0.85) and 13295 / 11982 / 15492 (0.86,
  1.11); rand-read-4k 120789 / 95153, 116623 / 112337 and 109797 / 86352 (1.04-1.27 of
  QEMU); seq-write 6818, 6229 and 7750 against QEMU's 8653, 8387 and 8256. Single runs
  reached 13900-14600 for seq-read (~0.9 of dd). The goal (seq-read >= 0.9 of dd and >=
  QEMU) is met in quiet runs and against QEMU in one median of three, not yet as a median
  against dd on this host.
- What is left: the copy (~52 us a MiB into guest RAM, the same in QEMU and dd) and
  ~10-12 us of Python per request; the rest of the spread between runs is the host's
  other work: a 64 MiB phase lasts ~4.5 ms, so one preemption of a few ms halves a run.

Second round (2026-12-01, later session):

- Seven passes a run, each phase's median over every pass of every run: single passes of
  dd alone gave 7.7-15.8 GB/s back to back.
- Inside a run (the device timing its own loop), a 1 MiB read in the seq-read phase cost
  80-131 us, of which the preadv 61-105 and Python ~19 (pop 5, handle 11, push 3): more
  than the ~11 us in one process (bench/blk_request.py), and everything, the copy
  included, slower together in the slow runs. The device is never idle inside a phase;
  the guest's clock runs ~0.1-0.2 ms longer than the device's span per phase (its first
  kick), the same with a 100 us poll (five runs each).
- Found: a slow mode. The device slept whenever its ring ran dry, the guest's next
  request kicked, the device woke on the kicking vCPU's CPU, and guest and device shared
  a CPU from then on: 8269 kicks in a run (5 normally), passes of 14.5k random IOPS, the
  vCPU thread preempted ~5000 times a second. Fixed by polling 32 us before sleeping
  (VirtioPciDevice.POLL_NS, QEMU's poll-max-ns default for iothreads): 29-65 kicks a run.
- Fewer Python calls per request (comprehensions are calls in 3.11; one dirty mark per
  push; the range check inline): 4 KiB IN 8.2 -> 7.4-7.6 us in one process.
- A minimal loop doing the same checks for this guest's chains only (no Chain, no call
  per layer) costs 3.2 us a 4 KiB request and 57 us a 1 MiB one (preadv 52): the floor for
  a device written in Python on this host, which leaves the 1 MiB reads at ~0.9 of the
  copy before any other cost. Not built: it would be a second walker.
- Tried and dropped: taking every available chain
  before serving any, and a prepare/execute split of blk requests so that the Python of
  the next request does not run right after a 1 MiB copy has emptied the caches (no gain
  in one process, none visible in the bench); MADV_HUGEPAGE (this host's shmem THP is
  "never"; anonymous THP against a 4 KiB memfd: 3.8% in a copy loop, within the noise).
- bench/blk.py --runs 7, same session, polling in: seq-read 12538 MiB/s against dd 15077
  (0.83) and QEMU 12763 (0.98); rand-read-4k 102615 IOPS (1.14 of QEMU); seq-write 8334
  (0.94 of QEMU).

Third round (2026-12-02): .venv is made from Debian's python3 (scripts/bootstrap.sh), whose
build runs the device's Python faster: bench/blk_request.py 4 KiB IN 8.0-8.2 -> 6.9-7.0 us.
--runs 5, alternating with the session's first tree (1aa1705, .venv from pyenv's 3.11.7),
load 1.5-1.8 (splitvmm / QEMU / dd): now seq-read 9155 / 14050 / 13175 and 10103 / 12588 /
13315 MiB/s, rand-read-4k 113876 and 115053 IOPS (1.31x, 1.30x QEMU); before seq-read 10974 /
13778 / 14350 and 9252 / 12885 / 13956, rand-read-4k 95427 and 90127 (1.06x, 1.01x). In a
quieter hour earlier, the new tree's seq-read was 0.84-0.87 of dd and 0.88-0.91 of QEMU.
Sequential reads are the copy's; the goal is not met.

Fourth round (2026-12-02, later): the device timed its own drain loop in a run (per 1 MiB
read of a seq-read pass: pop 2.7-3.5 us, handle 57-63 of which preadv 53-57, push 1.5-1.9)
and the gaps between requests: 0.4-0.6 us, but five or six of ~55 us per pass, 4-6% of it.
Those were the budget's: every BUDGET_NS (1 ms) process() handed the event loop back through
its own notify eventfd, and one pass around the loop (a new poller, the poll, the notify's
read, process() again) cost ~55 us. It now asks the loop first (DeviceContext.waiting, one
poll without a wait, ~3 us) and goes on when nothing else waits. 40 alternating pairs of
the bench guest against the tree before (each run's median of 7 passes, paired ratio,
bootstrap 95%): seq-read 1.052 [0.991, 1.098], rand-read-4k 1.050 [1.010, 1.103], seq-write
0.982 [0.905, 1.064]. Then --runs 5 three times, load 0.2-0.9: seq-read 14213 / 14964 / 15794
MiB/s (0.90 of dd, 0.95 of QEMU), 13649 / 14522 / 15341 (0.89, 0.94) and 13548 / 13412 /
14867 (0.91, 1.01); --runs 7 twice, load 1.1-1.4: 14078 / 14295 / 15013 (0.94, 0.98) and
12282 / 14050 / 15268 (0.80, 0.87). rand-read-4k 1.42-1.59x QEMU throughout.
- Tried again and dropped: popping every available chain before serving any (the ring
  walks with warm caches, the unserved given back with unpop() at the deadline): 40 pairs,
  seq-read 0.988 [0.958, 0.996]. And, as QEMU does, one preadv for each run of contiguous
  reads among them (up to 16), completed together (a prototype): 16 pairs, seq-read 0.926
  [0.864, 1.061], rand-read-4k 0.938 [0.820, 0.999]: the guest refills only once a whole
  run is done.
- Looked at and left: the guest's vCPU and the device on one CPU (the first round's slow
  mode) no longer happens: a sched_switch trace of a run had the vCPU thread on one CPU for
  638 of 708 ms and the device on the other for 305 of 328. THP for the device's mapping of
  guest RAM: a 1 MiB preadv into it costs the same (62-68 us against 62-65, with and without
  a second core spinning). What is left per request is the device's Python, ~8-10 us of a
  ~60-70 us read, and this host's noise, which moves a run's figure by 10-15%.
- Why the first requests of every pass are slow (75-240 us in the device's own trace, 60
  later): the image's page cache. A 1 MiB preadv of each MiB of the bench's image, 20 times
  over: MiBs held in 4 KiB folios copy in 125-220 us, those in 2 MiB folios (FileHugePages)
  in 52-60; after the file was dropped from the cache and read again in order, all but its
  first ~14 MiB (readahead's ramp) were fast. QEMU pays the same: `perf trace` of its
  preadvs (it merges a pass into ~8 MiB calls) gave 0.62-1.0 ms for the first of a pass and
  0.44-0.5 for the later ones. Both VMMs and dd read the same file in a run, so the layout
  moves all three.
- Measured in a scratch copy, not built: mypyc (it ships with mypy, which already checks the
  tree strictly) compiling devprocs/virtio/queue.py, guestram.py and pci.py (Chain as a plain
  class, as mypyc cannot compile a msgspec Struct subclass; VirtioPciDevice open to
  interpreted subclasses): bench/blk_request.py 4 KiB IN 7.0 -> 5.5-5.7 us, 1 MiB IN 59.5-61
  -> 57.2-61.4 us (preadv 50-54 in both). A quarter of the Python per request, ~2% of a
  1 MiB read in one process. The same copy, bootstrapped into a venv of its own (the
  compiled modules load in the zygote and run in the sandboxed device unchanged), against
  this tree, 20 alternating pairs of the bench guest: seq-read 1.038 [0.984, 1.155],
  rand-read-4k 1.108 [1.016, 1.276]. Adopting it is a build and design change (a compile
  step, Chain not a msgspec Struct, native classes that tests cannot monkeypatch): left for
  a decision of its own.
- Clean runs at the end of the round (--runs 5, load 0.9-1.6): seq-read 10825 / 12365 /
  14359 (0.75 of dd, 0.88 of QEMU), 10573 / 12608 / 14159 (0.75, 0.84), 12785 / 14964 / 15421
  (0.83, 0.85). Between 0.84 and 1.01 of QEMU over this round's eight runs: not yet the goal.

2026-12-02, fourth session, another host (dd 6701 MiB/s here), --runs 3, splitvmm / QEMU /
floor: seq-write 4438 / 4782 / 5564 MiB/s (0.80 of the floor, 0.93 of QEMU), seq-read 5314 /
5628 / 6701 (0.79, 0.94), rand-read-4k 177293 / 40023 / 1336412 IOPS (4.43x QEMU). What the
floor's buffer is worth, in one process (15 rounds of 64 preadv of 1 MiB from the page cache,
medians, us per MiB): into one 1 MiB bytearray (dd's pattern: it stays in the L2) 92.8; into
8 rotating 1 MiB slots of a memfd mapping (the guest's 8 requests in flight) 113.9; of
anonymous memory 112.7; of anonymous memory with MADV_HUGEPAGE 113.1. So 0.82 of dd is the
most any VMM gets with this guest on this host (QEMU: 0.84), and huge pages change nothing
(shmem THP is off here, so a memfd gets none anyway). bench/blk_request.py: 1 MiB IN 115.5
us (its preadv alone 87.6), 4 KiB IN 6.2 (0.7).

2026-12-02, fifth session, same host, three runs (--runs 3, 5, 5): seq-read 6309 / 6533 /
7879, 6318 / 6524 / 7959 and 6237 / 6500 / 7944 MiB/s (0.79-0.80 of the floor, 0.96-0.97 of
QEMU); seq-write 0.87-0.88 and 0.95-0.96; rand-read-4k 4.73-4.90x QEMU. Per 1 MiB read that
is ~5 us more than QEMU (158.5 against 153.1). Where a 1 MiB request's own time goes, in one
process (bench/blk_request.py's driver, the device's _io timed inside it, medians over 300
rounds of 8): 139.8 us a request, 125.8 of them the preadv (a bare loop of preadvs into the
same buffers: ~113), so ~14 us of Python, against ~7 for a 4 KiB request. The difference is the caches the copy empties: the same 4 KiB path
with a 1 MiB preadv elsewhere after each request (a scratch buffer, timed as part of the
I/O) costs 12.8-13.5 us of Python against 7.0-7.1 without (two rounds each). So the Python
left per 1 MiB read is a 4 KiB read's run with cold caches; a smaller working set (compiled
code: mypyc, in the second round above) is what would shrink it. No change to the path.

2026-12-02, sixth session, same host: `direct = true` (O_DIRECT) and --cache direct. With the
page cache out of the way the disk under /tmp is the floor here (dd iflag=direct 1.5-2.6 GB/s
from run to run). First, the device serving one request at a time (preadv/pwritev in place,
as for the page cache), --runs 3, splitvmm / QEMU (cache=none, aio=threads) / floor: seq-write
2254 / 2271 / 1642 MiB/s, seq-read 1708 / 1855 / 1540 (1.11 of the floor, 0.92 of QEMU),
rand-read-4k 10645 / 32139 / 13386 IOPS (0.33 of QEMU): QEMU's thread pool has the guest's 8
requests on the disk at once, the device one. Then aligned requests through Linux AIO
(native/aio.py, QEMU's aio=native; up to AIO_DEPTH in flight, used in order: the transport's
Pending), same command: seq-write 3122 / 2468 / 1958, seq-read 2119 / 1912 / 1688 (1.26 of
the floor, 1.11 of QEMU), rand-read-4k 34364 / 22194 / 13684 (1.55 of QEMU). On the host, AIO
4 KiB reads at depth 1, 8 and 32 from one Python loop: 13.8k, 58.1k and 114.3k IOPS. QEMU
with aio=native instead of its threads, two runs by hand: seq-read 2304 and 1670 against
1948 and 1873, rand-read-4k 23849 and 22422 against 35805 and 21886: the same within this
disk's noise.
- After the review's changes (interrupts before the device waits, among others), eight more
  runs of the same tree (--runs 2 or 3), seq-read splitvmm / QEMU / dd: 1717 / 2245 / 1490,
  1918 / 2609 / 1666, 1575 / 2119 / 1477, 1369 / 2236 / 1532, 2027 / 2055 / 1598, 2278 / 2215
  / 1500, and without the interrupt before the wait 1826 / 1897 / 1437 and 1544 / 2131 / 1515:
  0.61-1.03 of QEMU (median ~0.75), 0.89-1.52 of dd (median ~1.15). rand-read-4k 30.6k-35.4k
  IOPS throughout (1.0-1.5x QEMU, 2.3-2.5x the one-thread floor). This disk moves by 2x from
  one minute to the next (dd iflag=direct 1.3-2.6 GB/s; AIO from one Python loop at depth 1
  to 16 and 1 to 8 MiB requests: 0.8-1.5 GB/s, depth and size making no difference within a
  minute), so single medians swing; more runs than the 6 here would be needed to say more.
- Where QEMU's sequential reads differ (strace of its preadvs): it merges each batch of the
  guest's contiguous 1 MiB requests into one preadv of 2-8 MiB. Tried and dropped: the same
  here (requests plugged while the ring has more, submitted as one AIO request per run of
  contiguous ones, up to IOV_MAX buffers), alternating with the tree without it, two pairs of
  --runs 2: seq-read 1743 and 1572 against 2027 and 2278, seq-write 2274 and 2041 against
  2767 and 3110: each completion waits for its whole run, and the guest refills later.
- Kept: with requests in flight and the ring dry, the device waited for the next completion
  before it looked at the ring again, and the guest refills it (without a kick: kicks are off
  while the device drains) as soon as it sees one done, so each refill waited a completion.
  It now waits REFILL_POLL_NS (20 us, ~70-100 us with the kernel's default 50 us timer
  slack) at a time and looks in between. Four alternating pairs
  of --runs 2, seq-read with / without, QEMU of the same run in brackets: 2142 (1855) / 1721
  (2294), 2050 (2146) / 1884 (2213), 1993 (2291) / 1615 (2192), 2063 (2309) / 1432 (1836) MiB/s:
  median 2057 against 1668, 0.87-1.15 of QEMU against 0.74-0.85, 1.30-1.38 of dd. rand-read-4k
  unchanged (33-34k). Spinning instead (a zero timeout), two pairs against 20 us: 1641 / 1660
  and 2313 / 1928, not clearly better for a whole core's time; not kept.

2026-12-03, another host (copies at a third of the earlier hosts' speed: dd 4.7-5.5 GB/s;
Python ~3x slower: bench/blk_request.py 4 KiB IN 20.1 us, 1 MiB IN 239.6 of which preadv
192.2), --runs 5: seq-read 2936 / 3711 / 5507 MiB/s (0.53 of the floor, 0.79 of QEMU),
seq-write 2806 / 3554 / 4151, rand-read-4k 58888 / 78371 IOPS (0.75 of QEMU). Alternating with
708f918, --runs 3, two rounds: seq-read 2938 and 2994 (before) against 2844 and 2999 (after):
no change. QEMU reaches 0.67 of dd here: the per-request Python weighs more on a slow host.

2026-12-03, a fast host (`python -c pass` 7.9 ms; bench/blk_request.py 1 MiB IN 95.1 us of
which preadv 77.1, 4 KiB IN 8.2 of which 0.8), splitvmm / QEMU / floor: page cache, --runs 3
then 5: seq-read 7202 / 8935 / 11388 and 7620 / 8132 / 10730 MiB/s (0.63 and 0.71 of the
floor, 0.81 and 0.94 of QEMU, which gets 0.78 and 0.76 of it), seq-write 0.84 and 1.01 of
QEMU, rand-read-4k 157860 and 159241 IOPS (3.92x, 3.97x QEMU); --cache direct, --runs 3:
seq-read 2010 / 2327 / 1667 (1.21 of the floor, 0.86 of QEMU), seq-write 2708 / 2481 / 1887
(1.09 of QEMU), rand-read-4k 29441 / 22497 / 13441 IOPS (1.31x QEMU). A 1 MiB preadv from the
page cache into one reused buffer (dd's pattern) costs 52-54 us here, into 8 rotating slots of
a memfd 75, of THP-backed anonymous memory (QEMU's RAM) 72. No change to the path.

2026-12-03, a later session, same kind of host, splitvmm / QEMU / floor, page cache: --runs 3
seq-read 7237 / 7883 / 10388 MiB/s (0.70 of the floor, 0.92 of QEMU, which gets 0.76 of it),
seq-write 0.99 of QEMU, rand-read-4k 140558 IOPS (4.30x QEMU); --runs 5 seq-read 6657 / 7489
/ 9895 (0.67, 0.89). bench/blk_request.py: 1 MiB IN 90.7 us of which preadv 73.7, 4 KiB IN
8.5 of which 0.7. Looked at and dropped, a second floor for the polling guest's CPU: a dd
with another process spinning (the guest's vCPU polls the used ring beside the device). Pinned
(dd on one CPU, the spinner on the other, both ways round, two rounds of nine dd each): 12.2-
14.4 GB/s with the spinner against 13.1-14.4 without, inside the spread; unpinned, 8.3-9.1
against 13.4-14.6, a dd the scheduler now and then put on the spinner's CPU; in this bench,
unpinned and taken with the other floor in each run, --runs 5: 10323 MiB/s against 9895. No
floor that stands still enough to print. No change to the path.

2026-12-04, same kind of host (dd ~9.5 GB/s here). The table now has a fourth row: the same
seq-read next to the copy alone, taken in each pass of the floor (copy_mib_s: preadv of the
image into 8 rotating 1 MiB buffers from one host thread, as the guest's 8 requests land). It
was measured by hand before (above); now every run prints it. --runs 3, page cache, splitvmm /
QEMU / floor: seq-read 6735 / 7298 / 9534 MiB/s (0.71 of dd, 0.92 of QEMU), the copy alone 9100
(0.95 of dd; splitvmm 0.74 of it, QEMU 0.80); seq-write 0.94 of QEMU; rand-read-4k 149086 IOPS
(3.81x QEMU). Inside a run (the device timing its own 1 MiB reads, thread CPU time; not
committed): handle 145 us a request, of which the preadv 141 (CPU 127-131), and 11-19 us
between requests. A second preadv of the same sectors right after, into a buffer of the
device's own, cost 83 us of CPU, and a third into the guest's buffer again 72. So a request
pays for a source that the CPU's caches no longer hold, as the copy-alone floor's does in
part, plus ~15-20 us of Python: the goal (0.9 of dd) would leave the device ~5% over the
copy alone. No change to the path.

2026-12-06, another host, --runs 3, page cache, splitvmm / QEMU / floor: seq-read 5855 / 6747
/ 8379 MiB/s (0.70 of dd, 0.87 of QEMU), the copy alone 7773; rand-read-4k 149762 IOPS (3.35x
QEMU). Inside a run (the device timing its own 1 MiB reads; not committed): 178.7 us from one
request's start to the next, of which the preadv 158.1, the rest of handle() 6.5 and 14.1
between requests. The same preadv into an 8 MiB buffer of the device's own instead of guest
RAM: 159.3, so the destination is not what costs. The copy alone in a process of its own, 8
rotating buffers: 106 us a MiB from a file written long before, 131-138 for the first pass
after a write pass and its fdatasync (the guest's order), 120-123 for the next; with ~30 us
of Python between the preadvs, 128 against 120. What is left between the device's copy and
QEMU's whole request (148 us) is the copy's own cost in the VM, not a wait. No change to the
path.

2026-12-06, a later session, same kind of host, --runs 3, page cache, splitvmm / QEMU /
floor: seq-read 5678 / 6821 / 8760 MiB/s (0.65 of dd, 0.83 of QEMU, which gets 0.78 of dd),
the copy alone 8054; seq-write 0.85 of QEMU; rand-read-4k 144076 IOPS (3.33x QEMU). No
change to the path.

2026-12-07, a host where the copy is fast (dd 15.7 GB/s), --runs 3, page cache, splitvmm /
QEMU / floor: seq-read 12252 / 14899 / 15660 MiB/s (0.78 of dd, 0.82 of QEMU, which gets 0.95
of dd here), the copy alone 16837; seq-write 0.81 of QEMU; rand-read-4k 127809 IOPS (1.95x
QEMU). Per MiB in the VM: splitvmm 81.6 us, QEMU 67.1, the copy alone 59.4: QEMU's request
costs 7.7 us beyond the copy, the device's ~22. bench/blk_request.py: 1 MiB IN 62.0 us of which
preadv 51.0, 4 KiB IN 8.1 of which 1.2. Measured and not built, the image mapped into the
device and each read a copy out of the mapping (memoryview slice assignment) instead of a
preadv: 64 reads of 1 MiB into 8 rotating memfd slots, 15 passes, three rounds: 42.9-46.7 us
a MiB against 52.0-53.4. ~12% of the copy, about half of what parts the device from QEMU; but
a file mapping kills the device with SIGBUS where the image shrinks under it (a preadv reads
short, and the guest gets an I/O error), and RLIMIT_AS (sandbox/device.py) would have to
hold the whole image or the device remap windows of it. Not built. What is left between the
device and QEMU on such a host is the Python of each request (~11 us warm in one process,
more after the copy has emptied the caches), which QEMU's C and its merged preadvs do not pay.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vmrun import host_tsc_khz, run_to_end  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

QEMU = "qemu-system-x86_64"
EXIT_STATUS = 33  # the guest's debug-exit 0x10: (0x10 << 1) | 1
RUN_TIMEOUT_S = 600
DISK_SIZE = 128 << 20
BENCH_MIB = 64  # the guest's default size= in mode=bench
RANDOM_READS = 4096  # the guest's default ios=
PASSES = 7  # the firmware flavour's default passes=: each phase this many times a run
MEMORY = "128M"
RATE = re.compile(r"^virtio-blk: bench (seq-write-1m|seq-read-1m|rand-read-4k) ticks=(\d+)", re.M)
PHASES = ("seq-write-1m", "seq-read-1m", "rand-read-4k")
COPY = "seq-read-1m-copy"  # the host floor's second figure for seq-read (copy_mib_s)
DEPTH = 8  # the guest's requests in flight, each with a 1 MiB buffer of its own


def parse(text: str, who: str) -> dict[str, list[float]]:
    """Every pass's rate of each phase (the firmware guest runs PASSES passes), from its
    ticks at KVM's TSC rate: MiB/s of BENCH_MIB MiB, IOPS of RANDOM_READS reads."""
    if f"virtio-blk: bench size={BENCH_MIB} MiB " not in text:
        raise SystemExit(f"{who}: the guest did not run its bench over {BENCH_MIB} MiB:\n{text}")
    found: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for phase, ticks in RATE.findall(text):
        seconds = int(ticks) / (host_tsc_khz() * 1e3)
        found[phase].append((RANDOM_READS if phase == "rand-read-4k" else BENCH_MIB) / seconds)
    if any(len(rates) != PASSES for rates in found.values()):
        raise SystemExit(f"{who}: the guest did not print {PASSES} rates per phase:\n{text}")
    return found


def make_disk(path: Path) -> Path:
    """The image, written whole and fsynced: a sparse file would make the first VMM to write
    it (ours: splitvmm runs first in each pair) allocate its blocks, and only that one; and
    one left dirty in the page cache (on ext4 not even allocated: delayed allocation) made
    the first O_DIRECT write wait for its writeback, in that VMM's first pass only."""
    block = bytes(1 << 20)
    with path.open("wb") as f:
        for _ in range(DISK_SIZE // len(block)):
            f.write(block)
        f.truncate(DISK_SIZE)
        f.flush()
        os.fsync(f.fileno())
    return path


def run_splitvmm(image: Path, disk: Path, work: Path, i: int, direct: bool) -> dict[str, float]:
    serial = work / f"splitvmm-{i}.log"
    config = work / f"splitvmm-{i}.toml"
    config.write_text(
        f'[vm]\nname = "bench-blk"\nmemory = "{MEMORY}"\n[boot]\nfirmware = "{image}"\n'
        f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{serial}"\n'
        f'[[device]]\nname = "blk0"\nmodel = "virtio-blk"\npath = "{disk}"\n'
        f"direct = {'true' if direct else 'false'}\n"
    )
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    return parse(run_to_end(argv, serial, EXIT_STATUS, RUN_TIMEOUT_S, "splitvmm"), "splitvmm")


def run_qemu(
    qemu: str, image: Path, disk: Path, work: Path, i: int, direct: bool
) -> dict[str, float]:
    serial = work / f"qemu-{i}.log"
    argv = [qemu, "-accel", "kvm", "-bios", str(image), "-m", MEMORY.removesuffix("M")]
    argv += ["-display", "none", "-nodefaults", "-serial", f"file:{serial}", "-no-reboot"]
    argv += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    cache = "none" if direct else "writeback"  # none: O_DIRECT (its default aio=threads)
    argv += ["-drive", f"if=none,id=d0,file={disk},format=raw,cache={cache}"]
    argv += ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    return parse(run_to_end(argv, serial, EXIT_STATUS, RUN_TIMEOUT_S, "QEMU"), "QEMU")


DD_SECONDS = re.compile(r"copied, ([\d.e-]+) s")


def dd_mib_s(argv: list[str]) -> float:
    """MiB/s of a dd of BENCH_MIB MiB, by dd's own clock (its copy loop, not its start-up:
    the guest's figures do not count a VMM's start either)."""
    proc = subprocess.run(argv, check=True, capture_output=True, text=True, env={"LC_ALL": "C"})
    found = DD_SECONDS.search(proc.stderr)
    if found is None:
        raise SystemExit(f"dd printed no timing: {proc.stderr}")
    return BENCH_MIB / float(found.group(1))


def copy_mib_s(disk: Path, direct: bool, buffers: list[memoryview]) -> float:
    """MiB/s of the copy a device makes for the guest's seq-read, alone: BENCH_MIB MiB of the
    image read with preadv in 1 MiB pieces into `buffers` (DEPTH of 1 MiB, touched already)
    in turn, as the guest's requests land in DEPTH buffers of its own, from one host thread.
    dd reads into one 1 MiB buffer, which stays in the CPU's cache; a guest's buffers take
    their turns (and a Linux guest reads into ever new page-cache pages)."""
    fd = os.open(disk, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        start = time.perf_counter()
        for i in range(BENCH_MIB):
            os.preadv(fd, [buffers[i % DEPTH]], i << 20)
        return BENCH_MIB / (time.perf_counter() - start)
    finally:
        os.close(fd)


def in_flight_rate(disk: Path, write: bool, offsets: list[int], buffers: list[mmap.mmap]) -> float:
    """Requests a second: one O_DIRECT pwritev/preadv at each of `offsets`, as many in
    flight as there are `buffers` (one thread each, taking the next offset in turn), as the
    guest's DEPTH requests reach the disk through either VMM."""
    fd = os.open(disk, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    todo = iter(offsets)
    lock = threading.Lock()

    def serve(buffer: mmap.mmap) -> None:
        while True:
            with lock:
                offset = next(todo, None)
            if offset is None:
                return
            (os.pwritev if write else os.preadv)(fd, [buffer], offset)

    try:
        workers = [threading.Thread(target=serve, args=(b,)) for b in buffers]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return len(offsets) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def host_floor(disk: Path, direct: bool) -> dict[str, list[float]]:
    """PASSES of each, as the guest does them; with O_DIRECT too where the VMMs use it."""
    floor: dict[str, list[float]] = {phase: [] for phase in (*PHASES, COPY)}
    rng = random.Random(1)
    offsets = [rng.randrange(BENCH_MIB * 256) * 4096 for _ in range(RANDOM_READS)]
    block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    slots = mmap.mmap(-1, DEPTH << 20)  # copy_mib_s's buffers, their pages faulted in now
    slots.write(b"\1" * len(slots))
    buffers = [memoryview(slots)[i << 20 : (i + 1) << 20] for i in range(DEPTH)]
    if direct:  # DEPTH in flight, as the guest's requests reach the disk
        mib_slots = [mmap.mmap(-1, 1 << 20) for _ in range(DEPTH)]
        page_slots = [mmap.mmap(-1, 4096) for _ in range(DEPTH)]
        sequential = [i << 20 for i in range(BENCH_MIB)]  # 1 MiB requests: a rate in MiB/s
        for _ in range(PASSES):
            floor["seq-write-1m"].append(in_flight_rate(disk, True, sequential, mib_slots))
            floor["seq-read-1m"].append(in_flight_rate(disk, False, sequential, mib_slots))
            floor[COPY].append(copy_mib_s(disk, direct, buffers))
            floor["rand-read-4k"].append(in_flight_rate(disk, False, offsets, page_slots))
        return floor
    for _ in range(PASSES):
        floor["seq-write-1m"].append(
            dd_mib_s(
                ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", f"count={BENCH_MIB}", "conv=notrunc"]
            )
        )
        floor["seq-read-1m"].append(
            dd_mib_s(["dd", f"if={disk}", "of=/dev/null", "bs=1M", f"count={BENCH_MIB}"])
        )
        floor[COPY].append(copy_mib_s(disk, direct, buffers))
        fd = os.open(disk, os.O_RDONLY)
        try:
            start = time.perf_counter()
            for off in offsets:
                os.preadv(fd, [block], off)
            floor["rand-read-4k"].append(RANDOM_READS / (time.perf_counter() - start))
        finally:
            os.close(fd)
    return floor


def medians(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """Each phase's median over every pass of every run: a 64 MiB phase lasts ~5 ms, so one
    preemption on this shared host moves a single pass by tens of percent."""
    return {phase: statistics.median(x for r in runs for x in r[phase]) for phase in runs[0]}


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the guest under each VMM")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--cache",
        choices=("page", "direct"),
        default="page",
        help="page: the host's page cache (both VMMs' default); direct: O_DIRECT everywhere "
        "(splitvmm's direct = true, QEMU's cache=none, dd's iflag/oflag=direct)",
    )
    args = parser.parse_args()
    direct = args.cache == "direct"
    qemu = shutil.which(QEMU)
    load_before = os.getloadavg()[0]  # the host is shared: a loaded one moves every figure
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not a tmpfs
        work = Path(tmp)
        image = build_guests(work / "guests")["firmware-virtio-blk"]
        disk = make_disk(work / "disk.img")
        ours, theirs, floor = [], [], []
        for i in range(args.runs):  # alternate, so drift on the host hits all alike
            ours.append(run_splitvmm(image, disk, work, i, direct))
            if qemu:
                theirs.append(run_qemu(qemu, image, disk, work, i, direct))
            floor.append(host_floor(disk, direct))
    result = {
        "runs": args.runs,
        "cache": args.cache,
        "load": [load_before, os.getloadavg()[0]],  # 1-minute load average, before and after
        "qemu": qemu_version(qemu) if qemu else None,
        "splitvmm": medians(ours),
        "qemu_figures": medians(theirs) if theirs else None,
        "host": medians(floor),
        "samples": {"splitvmm": ours, "qemu": theirs, "host": floor},
    }
    if args.json:
        print(json.dumps(result))
        return
    print_table(result, args.runs)


def print_table(result: dict[str, object], runs: int) -> None:
    ours, host = result["splitvmm"], result["host"]
    theirs, load = result["qemu_figures"], result["load"]
    assert isinstance(ours, dict) and isinstance(host, dict) and isinstance(load, list)
    table = Table(
        title=f"virtio-blk, firmware-virtio-blk guest, {BENCH_MIB} MiB, 8 in flight, "
        f"{'O_DIRECT' if result['cache'] == 'direct' else 'page cache'} "
        f"(median of {runs} runs x {PASSES} passes)",
        caption=f"{result['qemu'] or f'{QEMU} not found'}; 1-minute load {load[0]:.2f} "
        f"before, {load[1]:.2f} after",
    )
    for column in ("", "splitvmm", "QEMU", "host floor", "splitvmm / floor", "splitvmm / QEMU"):
        table.add_column(column, justify="right" if column else "left")
    units = {"seq-write-1m": "MiB/s", "seq-read-1m": "MiB/s", "rand-read-4k": "IOPS"}
    for phase in PHASES:
        q = theirs[phase] if isinstance(theirs, dict) else None
        table.add_row(
            f"{phase} ({units[phase]})",
            f"{ours[phase]:.0f}",
            "-" if q is None else f"{q:.0f}",
            f"{host[phase]:.0f}",
            f"{ours[phase] / host[phase]:.2f}",
            "-" if q is None else f"{ours[phase] / q:.2f}",
        )
    q = theirs["seq-read-1m"] if isinstance(theirs, dict) else None
    table.add_row(  # the same reads, next to the copy alone (copy_mib_s)
        "seq-read-1m vs the copy alone",
        f"{ours['seq-read-1m']:.0f}",
        "-" if q is None else f"{q:.0f}",
        f"{host[COPY]:.0f}",
        f"{ours['seq-read-1m'] / host[COPY]:.2f}",
        "-" if q is None else f"{ours['seq-read-1m'] / q:.2f}",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
