"""Start-up: a whole `splitvmm up` next to QEMU, on the firmware hello guest.

Runs the firmware-hello test guest (a 64 KiB real-mode image that prints one
line on COM1 and writes to the debug-exit port) under `splitvmm up --timings`
and under `qemu-system-x86_64 -accel kvm -bios`, alternately, RUNS times each,
and times each whole process from its start to its exit (wall clock, the host's
CLOCK_MONOTONIC). The floors are measured in the same run: `python -c pass`
(an interpreter's start and end) and `python -c 'import splitvmm.cli'`.

Each figure comes with the CPU it took (user + system seconds of the whole process tree:
every parent reaps its children, so the kernel counts theirs in the process this reaps).
On this shared 2-core host the wall clock moves with the load from run to run and CPU
far less, and a start-up that keeps both cores busy (splitvmm's does) gets faster only by
spending less CPU or by leaving neither core idle. (A device's own process, killed at the
end, is reaped by nobody when the launcher ends first: its few ms of CPU are left out.)

splitvmm's own marks (splitvmm/timings.py, the same clock) split its time into
phases; "interpreter start" is from our clock reading before the spawn to its
first mark, "exit" from its last mark to the process's end. The device spans
overlap the phases: each runs from the request to the launcher to READY.

    python bench/startup.py [--runs R] [--json] [--no-timings]

--no-timings runs `up` without --timings (a checkout from before it existed:
check it out, run this file from a copy), and prints no breakdown.

Where the time went, and what changed (issue 12, goal 1; this 2-core host, --runs 5):

- Before: 486 ms (QEMU 82). The devices were exec'd once the monitor had imported
  everything: interpreter + imports ~110 ms each, "devices ready (wait)" 147 ms; the
  interpreter's teardown ("exit") 39 ms; the launcher and config imports 75 ms before
  anything ran in parallel.
- Now: the launcher is forked first (sandbox/launcher.py) and execs the zygote at once
  (sandbox/zygote.py), which imports every device model on the other core while the
  monitor imports its own; devices are forked from it (~5 ms each to the fork, READY
  ~20-30 ms after). `splitvmm` exits by os._exit once everything is closed (exit 39 ->
  3 ms); the editable install's import finder is gone from site (~11 ms per interpreter).
  334-364 ms on a host shared with other work (QEMU 64-83 in the same runs).
- What is left, in order: the monitor's imports (~95 ms quiet, ~150 loaded: ~100
  dataclasses whose methods are generated and compiled at import, zmq, pyseccomp and
  its ctypes.util chain, click), the zygote's imports on the other core (~100 ms; the
  first launch request waits for them: "device launch requests" 45-80 ms), interpreter
  start ~15 ms, click ~30 ms, teardown ~25 ms (mostly closing the VM fd: the kernel
  frees the VM). Deferring what only a snapshot needs (~12 ms: snapshot.writer, vmstate,
  pci.state, signing) to confinement time was measured and not done: the monitor already
  waits for the zygote, so it would move the wait, not shorten it (and a confined monitor
  may read Python modules but map no C extension: monitor/confinement.py PRELOAD).
- Byte-code (2026-12-01, later): with PYTHONDONTWRITEBYTECODE set, as in this project's
  sandboxes, nothing wrote the monitor's .pyc files (the zygote and devices run under -I,
  which ignores the variable, and wrote theirs), so every `up` compiled the monitor's
  modules. scripts/bootstrap.sh now compiles the package, and this bench compiles it
  before it times anything. From two fresh clones, both bootstrapped, 15 alternating
  pairs of whole processes: 265 ms against 315 (paired ratio 0.80). This bench, quiet: 228 ms
  against QEMU's 69.9 (3.27x).
- Measured since, and left: the dataclass decorator is 86 ms of the monitor's ~200 ms of
  imports in a bare interpreter (100 classes; frozen=True doubles a class's cost, two
  more generated methods) and 31 of the device side's ~56 (44 classes). The zygote
  starts 44-102 ms after the first mark and was ready 146-272 ms after it (13 runs, its
  own marks on stderr); the first launch request waited for it in 5 of them, 5-72 ms,
  and in the other 8 the monitor's own imports were the longer path. So forking the
  launcher before `splitvmm.cli` imports typing (13.5 ms) and sandbox/launcher.py's
  imports (~23 ms), which would start the zygote up to ~35 ms sooner, was not done: it
  would shorten a third of the starts. Of the teardown, closing the VM fd is 15.6-18.4 ms
  (the kernel frees the VM), the launcher 3.3-4.8.
- msgspec records (2026-12-01, second round): the ~100 dataclasses on `up`'s path became
  msgspec Structs, built in C (0.018 ms a class against 0.83 for a frozen slotted
  dataclass): "import monitor" 154-167 -> 51-72 ms. That made the zygote the longest path,
  and msgspec (~20 ms cold) now came before its exec, so the launcher is forked by
  sandbox/launcher_start.py, which imports only the standard library's basics ("launcher
  fork" 36-45 -> 11-23 ms); the launcher imports its server code (~30 ms) when the first
  request comes, so that it does not share the two cores with the monitor's and the
  zygote's imports; and configure, that first request, no longer waits for its reply.
  25 alternating pairs of whole processes, firmware hello guest, quiet: 210 ms against 268 for
  f7e5af6 (paired ratio 0.80; CPU 0.31 s against 0.41). This bench, back to back, --runs
  15: 213.6 ms (QEMU 68.9, 3.10x) against 316.1 for f7e5af6 (QEMU 72.8, 4.34x).
- Where it goes now: the monitor is done importing ~120 ms after its start and then waits
  ~45 ms ("device launch requests") for the zygote, which execs ~35 ms after the start and
  imports for ~110-120 ms: zmq ~20, msgspec ~18 (of which typing_extensions and inspect ~10:
  msgspec imports typing_extensions where it is installed, and blake3 requires it), pyseccomp ~11
  (ctypes.util runs `ldconfig -p` twice), logging ~9, re ~5. The run is CPU-bound: ~0.31 s of CPU on
  2 cores.
- Tried and dropped: forking before anything imports typing (the TYPE_CHECKING = False
  idiom in errors.py and cli/): the exec came ~5 ms sooner, whole-process A/B 0.999 (tried
  again 2026-12-03 with json and subprocess kept off that path too, the zygote spawned by
  os.posix_spawn: "launcher fork" 23.5 -> 11.0 ms, device launch requests 28-32 ms both,
  whole `up` 251/247 against 270/239 ms, --runs 7 twice: reverted, cebd2b7; and once more
  2026-12-05, with the zygote now the one long path: the imports before the fork 22.9 ->
  11.9 ms, 30 alternating pairs of whole processes: wall 1.005, CPU 1.025: the zygote only shares
  the cores sooner); gc.disable() during the zygote's imports (41 collections): no difference (since
  taken, with the monitor's: bench/snapshot.py, 2026-12-06);
  importing hashlib lazily in protocol/models.py (~4 ms of the zygote's): a sandboxed virtio-net
  device calls default_mac(), and a device cannot import once it is confined.
- msgspec without typing_extensions (2026-12-01, third round): hiding it for the whole
  process (sys.modules["typing_extensions"] = None) was measured at 0.94 and left, as it
  poisons the import. splitvmm/record.py now hides it for msgspec's own import only and
  removes the entry right after, so a later import of typing_extensions works; every
  module takes Struct and its helpers from there (ruff's banned-api keeps it so). msgspec
  alone: 24 -> 12 ms (inspect, ast, dis, tokenize no longer imported), in the monitor, the
  launcher and the zygote. 25 alternating pairs of whole processes with c8fd15e, load ~1: wall 236
  ms against 251 (paired ratio 0.905), CPU 0.351 s against 0.384 (0.91). click still
  imports inspect in the monitor (~6 ms).
- pyseccomp without ldconfig (same round): its import ran `ldconfig -p` twice
  (ctypes.util.find_library), in the monitor and the zygote; splitvmm/native/seccomp.py
  has find_library try each library's soname with dlopen first during that import: 3.8 ->
  1.3 ms a process (median of 30 fresh interpreters), and four fork+execs fewer per `up`.
  50 alternating pairs of whole processes: wall 0.99, CPU 0.99 (inside this host's noise).
- Where the CPU goes (same round; BSD process accounting over 30 runs, 10 ms ticks, so
  rough): the monitor ~175 ms a run, the zygote (and its short-lived intermediate children)
  ~108, the launcher ~22, the two wardens ~8 together (their Python before the exec: the
  warden's filter, Landlock), the devices ~5 after their fork; QEMU ~52 in all. Of the
  monitor's, imports are most: sampled on-CPU, 98% of its Python stacks were inside an
  import (click ~16 ms with inspect, zmq ~13, the monitor's own modules ~15, pyseccomp and
  ctypes ~5, hashlib's OpenSSL ~3, tomllib, msgspec and what it brings ~10).
- Tried and dropped (same round), each timed in 50 alternating pairs of whole processes against the
  tree without it, twice: importing the launcher's server code right after the zygote's exec
  instead of at the first request, 0.974 and 0.996 for waiting (kept); sending every
  device's spawn request before taking any answer, so that the monitor builds and confines
  the VM while the launcher and the zygote fork (Launcher.ask_spawn, the slot taking its
  process at attach): 1.03 and 0.97. Neither core is idle during a start-up, so reordering
  work moves it without shortening it; only less CPU shortens it.
- The interpreter (2026-12-02): .venv was made from whatever PATH found first as python3,
  here pyenv's CPython 3.11.7, a default source build (--enable-shared: the interpreter
  calls into libpython.so, position-independent code). Debian's /usr/bin/python3 (3.11.2)
  is linked statically and built with the distribution's optimisations. Importing the
  monitor's and two device models' modules: 84 ms against 115 (medians of 10 fresh
  interpreters each, alternating); a whole `up`, 40 alternating pairs of whole processes: wall 174
  ms against 211 (paired ratio 0.855), CPU 0.261 s against 0.309 (0.83); this bench, --runs 15,
  alternating, two rounds: 174.0 and 190.0 ms (2.33x and 2.43x QEMU) against 212.1 and
  247.0 (2.78x, 3.03x). scripts/bootstrap.sh now makes .venv from /usr/bin/python3. The
  same switch showed that snapshot/ram.py's zero-page scan (mmap.find per page) was 20x
  slower on 3.11.2, and it no longer uses it.
- Same day, with a timeline of device-side marks (not committed): the monitor now finishes
  its imports after the zygote is ready (~80-100 ms), so the launcher's import of its server
  code (~11 ms of CPU, msgspec included), which waited for the monitor's first request, lay
  between that request and the first spawn. It now starts once the zygote says ready (its
  socket polls readable), on the core the zygote leaves: "device launch requests" 24.8 ms
  against 27.5 (--timings, 20 alternating runs each). The monitor no longer loads OpenSSL
  (snapshot/signing.py signs with keyed BLAKE3; sha256 is imported by readers only):
  60 alternating pairs of whole processes: 0.963 wall, 0.970 CPU. This bench, quiet (load 0.6):
  160.6 ms against QEMU's 75.9 (2.12x); on a busier hour 174-190 ms (2.33-2.43x).
- Measured and dropped (same day): every memslot before KVM_CREATE_IRQCHIP (the first
  memslot made after it waited ~7 ms here, one made before it 0.1 ms, Firecracker's order):
  the VM's close then waited as much longer (teardown 25.0 against 11.0 ms, 20 runs), the
  kernel's grace periods moved, not saved. Closing the VM's fds on a helper thread while the
  devices and the launcher end: the close took 1-16 ms from run to run (the in-kernel PIT's
  teardown waits out SRCU grace periods) and the medians moved 11.1 -> 11.8 ms. Importing
  the snapshot code (PRELOAD, ~12 ms) on a helper thread while the monitor waits for the
  launcher's replies: 60 alternating pairs of whole processes: 1.006.
- End of 2026-12-02's session, alternating the session's first tree (1aa1705, its .venv from
  pyenv's 3.11.7, as CI made it) and ce01c1b (.venv from Debian's python3), --runs 15, two
  rounds: 173.5 and 211.4 ms (2.68x and 3.12x QEMU; CPU 264 and 321 ms) against 147.9 and
  143.9 (2.13x and 2.22x; CPU 213 and 206 ms); 40 alternating pairs of the whole process:
  wall 0.831, CPU 0.836 (155 ms against 184). Phases of the quiet run above (160.6 ms):
  interpreter 11.7, launcher fork 12.3, import cli 22.0 (click ~14), command line 9.2,
  import monitor 39.6, device launch requests 22.5 (two spawns of ~8 ms, the zygote's double
  fork ~3.5 of each, and the ~7 ms first-memslot wait), confinement and channels 5.5,
  devices ready 4.0, guest run 4.5, teardown 18.2 (the VM's close: 1-16 ms from run to run).
- Kernel waits (2026-12-02, second session). A kernel stack sampled while each slow ioctl ran
  (/proc/PID/task/TID/stack, one VM at a time): the VM's close spent its ~16 ms in
  kvm_free_pit, turning the PIT's lost-tick re-injection off (kvm_pit_set_reinject:
  synchronize_srcu on the irq SRCU) and unregistering its bus devices; the first memslot's
  ~7 ms was a grace period that KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2 leave under way (0.1-0.2
  ms before them, or 30 ms after). Bare create/close loops: irqchip, PIT, memslot, close = 7
  + 16 ms; re-injection off right after the PIT = 15 ms for the switch, then 0.1 and 0.4-0.8.
  Now: guest RAM's memslots before the irqchip; re-injection off (what KVM's API document
  recommends, QEMU's lost_tick_policy=discard) on a thread of its own, started as the
  devices are asked for and joined before confinement; and the machine's close hands the VM's
  fds to a thread of their own, syncs every device at once, kills them all, then waits.
  `up --timings`, paired runs (the order alternating; median of the differences, bootstrap
  95%): close on a thread, 20 runs, teardown 23.0 -> 12.4 ms; re-injection off, 50 runs,
  whole process -4.8 ms [-8.5, -0.9], teardown -3.3 [-4.8, -1.6]. Two earlier tries of the
  same day, moving the first memslot after the devices' launch and closing only the VM on a
  helper thread, had moved the waits instead (teardown 18.2 -> 20.6 ms for the first).
- Imports (same session): pyseccomp without ctypes.util (shutil, bz2, lzma: ~4 ms in the
  zygote; native/seccomp.py), and sandbox/policy.py on str paths, so that the zygote imports
  no pathlib (with urllib.parse and ipaddress, ~4 ms): 50 paired runs, -3.5 ms [-7.0, -0.2].
  What the zygote imports now, by cumulative -X importtime: zmq ~20 of ~70 ms (its
  constants' enum classes 4.5, pickle 3.1 for send_pyobj, platform 1.8; ~18 ms of wall
  clock in a warm interpreter), msgspec and the protocol ~12, logging ~8 (traceback,
  linecache), re ~6. The monitor imports zmq too.
- Tried and dropped again (same session): forking the launcher before `splitvmm` imports
  typing, json, socket and subprocess (a module importing only os and C modules, the
  launcher importing the rest itself): its zygote was ready ~10 ms sooner (85 -> 75 ms, 12
  runs), but the whole process did not move, 40 alternating pairs of whole processes: wall 0.99, CPU
  1.03, and after the changes above 50 paired runs +3.2 ms [-4.5, 10.2]: the launcher's own imports
  cost the CPU the early start saved.
- End of that session (7eca8b4; the VM's fds now close once every device's sync is done,
  as a device's event during its sync may still use the VM), against its first tree
  (037f155), busy hour, alternating: this bench --runs 15, two rounds, 194.4 and 190.2 ms
  (2.50x and 2.53x QEMU) -> 176.4 and 155.6 (2.26x, 2.07x); 60 paired `up` runs, whole
  process -12.8 ms [-18.4, -8.8] (179.8 -> 168.9); 40 alternating pairs of whole processes: wall
  0.928, CPU 0.939; 25 alternating runs: teardown (guest end -> last mark) 23.6 -> 15.0 ms, last
  mark -> exit 4.2 -> 4.1, start -> guest end 173.1 -> 163.9.
- This bench in a third session of 2026-12-02, no change to the path: 123.3 ms against QEMU's
  65.4 (1.88x, load 0.35), then 141.0 against 69.7 (2.02x) and 151.3 against 67.3 (2.25x, with
  `python -c pass` itself 25% slower): the ratio moves with the host. Tried and dropped: the
  launcher importing its server code on a thread of nice 19 from its zygote's exec on,
  instead of once the zygote is ready (in some runs that import came between the monitor's
  first request and its answer, ~6 ms): 50 paired `up` runs, +2.1 ms [-0.7, 5.4]. And
  gc.disable() in the monitor from the launcher's fork to the end of its imports (as tried
  in the zygote before): 40 paired runs, +1.6 ms [-7.8, 7.1] (since taken, through the
  config and snapshot checks: bench/snapshot.py, 2026-12-06).

2026-12-02, fourth session, another host (`python -c pass` 9.4 ms): --runs 10, quiet, 116.0
ms against QEMU's 61.0 (1.90x), CPU 174.6 ms. Tried again and dropped: every spawn request
sent before any answer is taken, the slot taking its process at attach (Launcher.ask_spawn
above): 20 alternating pairs of whole processes against the tree without it, wall 1.033 (two
devices) and 1.021 (five), CPU 1.065 and 1.042. A timeline across the processes (marks written to
stderr by the launcher, the zygote, the devices and the monitor; not committed) shows why. From the
monitor's configure request to its devices' READY, ~27 ms either way, the path runs through
the launcher importing its server code once the zygote is ready (~14 ms, so the configure's
answer waits for it), each spawn's double fork in the zygote (2.5-4 ms, one after the other),
and the device's own set-up to its connect (~9 ms: its two policies read ~1-3, unshare ~0.6,
warden fork, pivot and Landlock ~1.8). On the monitor's side the PIT's re-injection switch
(an SRCU grace period, 15-19 ms from the launch requests on) is what a monitor that no
longer waits for its spawns waits for instead. A restore of an idle 512 MiB guest (~110 ms to
the vCPUs): the monitor's imports end at ~86 ms; then the snapshot's decode, RAM, the two
spawns (~10 ms), the PIT's grace period, confinement (~3 ms) and the devices' READY.

2026-12-03, a fast host (`python -c pass` 7.9 ms), quiet: --runs 11, 105.7 ms against QEMU's
52.2 (2.02x; CPU 163 against 27 ms); --runs 15 with the change below, 114.6 against 55.0
(2.08x) while other work ran beside it. Tried and dropped: the snapshot writer (with digest,
format, ram, state and signing) imported by the confined monitor at its first snapshot instead
of before confinement (blake3, their one C extension, left in PRELOAD): ~2-4 ms of the
monitor's imports and ~0.2 MiB of its private memory, but 40 alternating pairs of whole processes:
wall 0.992, CPU 0.993: nothing that shows. And a review saw the cost: a monitor that imports code
days after its start imports whatever an upgrade put there meanwhile, next to its old modules. The
phases say why the wall clock did not move: "device launch requests" went from 13 to 18 ms,
the monitor waiting for its devices where it had waited for its imports. A timeline across
the processes (stderr marks, not committed) has the zygote's main() start 22-24 ms after the
launcher's fork (its interpreter, while the monitor imports on the other core) and its imports
end at 67-74 ms, when the monitor's end at 60-85; its devices then reach their connect ~7-9 ms
after their fork and wait there for the monitor's channels (attach, after confinement). So the
monitor's imports and the zygote's are two paths of one length now, and only what shortens
both (an interpreter's start, zmq, msgspec, logging) shortens a start-up. Measured and left:
loading only the models a VM names into the zygote (every model but the UART and the clock is
~1 ms of its ~45 ms of imports: theirs are the runtime's), and `-c` for the zygote's command
instead of `-m` (runpy ~2 ms by -X importtime, most of it modules the zygote imports anyway).

2026-12-03, a later session, same kind of host: --runs 11, 125.0 ms against QEMU's 58.0
(2.15x; CPU 195 against 28). A timeline (stderr marks in the launcher, the zygote and the
devices, six runs, not committed), ms from the monitor's first mark: launcher fork 11, the
zygote's exec 13-16 and its main() 30-34 (an interpreter, runpy, and typing through
splitvmm.errors: `python -I -c "import typing"` is ~7 ms over a bare interpreter here), the
zygote ready 69-72, the monitor's imports done 71-73. Then the launcher imports its server
(msgspec and the protocol: ~9-11 ms, msgspec ~8 by -X importtime, most of it datetime, uuid
and platform that msgspec's C module imports), from the zygote's ready to 79-81: the first
spawn, sent at ~74, waits for it. Each spawn then takes the launcher 2-6 ms (the zygote's
double fork ~2), the devices 10-14 ms from their fork to READY, and the guest runs at 101-111.
Tried and dropped: the launcher importing its server at once, while the zygote starts: the
zygote's exec and imports then shared a core with it and were ready at 81-88 instead of 69-72,
and the guest ran at 104-113: no gain. Both cores are busy from the launcher's fork to the
devices' READY (CPU 195 ms in a 110-125 ms run); what is left is less work, not another order.

2026-12-04, a slow hour (`python -c pass` 15-17 ms): the monitor no longer imports pyzmq (its
end of each channel is a plain socket: monitor/zmtp.py). --runs 9, alternating with the tree
before it (b498c6a), two pairs: 217.3 and 186.8 ms (QEMU 83.1, 81.4: 2.61x, 2.30x) against
210.0 and 201.0 (QEMU 73.5, 80.0: 2.86x, 2.51x); CPU 333 and 298 against 337 and 330. "import
monitor" 46.1 and 43.6 ms against 63.4 and 54.1, but "device launch requests" 44.8 and 30.1
against 20.0 and 30.6: the monitor now waits that much longer for the zygote, whose imports
(~83 ms by -X importtime: pyzmq 27, the models' protocol and msgspec 21, logging 11, re 9)
are the one long path left. Goal (2x) not met.

2026-12-04, the next session: the devices no longer import pyzmq either (each device's end of
its channel is a plain socket too: devprocs/channel.py), so neither does the zygote, and no
device starts libzmq's two threads. 30 alternating pairs of `splitvmm up` on this
guest against the tree before it (7ffbb48): wall 191 ms against 204 (paired ratio 0.938), CPU
0.300 s against 0.325 (0.922). This bench, --runs 7, alternating, two pairs: 207.9 and 213.9
ms (QEMU 83.0, 92.2: 2.50x, 2.32x) against 211.6 and 208.9 (QEMU 86.2, 87.4: 2.46x, 2.39x),
"device launch requests" 27.0 and 24.4 ms against 38.5 and 29.6, the serial device's span
(request to READY) 34.1 and 27.8 against 42.2 and 35.3; this hour's noise (QEMU itself moved
83-92 ms) hides the rest of the gain from a median of 7. Goal (2x) not met.

2026-12-06: the zygote imports the models the VM has, not every one (the launcher's configure
names them; sandbox/zygote.py). 30 alternating pairs of `up --timings` on this guest (serial
+ rtc) against the tree before, to the vCPUs: paired median -2.6 ms, and -1.3 ms in a second
round, in a noisy hour. This bench, --runs 9, quiet, same session: 115.1 ms against QEMU's
60.6 (1.90x; CPU 177.5 ms), and 120.8 / 63.0 (1.92x) in an earlier run. Within 2x in quiet
runs; the host's load moves it by more than this change did.

2026-12-06, a later session: the cyclic collector held off while the monitor and the zygote
import (cli/early.py, devprocs/zygote.py; figures in bench/snapshot.py): 30 alternating
pairs of whole `up` runs against the tree before, 101.2 -> 97.1 ms (paired median -3.7).
This bench, --runs 9: 105.4 ms against QEMU's 57.9 (1.82x; CPU 158.9 ms against 27.6).

2026-12-07: this bench, --runs 9 and 15 in one hour: 110.1 / 54.8 ms (2.01x) and 115.7 /
61.0 (1.90x); `python -c pass` 9.8-10.0 ms (9.3 the last session). Tried and dropped: `up`
without click (a click-free parser for up's usual lines, click's for the rest, held to the
same values by a differential test; click's import is ~15 ms of the monitor's path, inspect
among it). The monitor's phases shrank as expected ("import cli" + "command line" 25.9 ->
17.4 ms), but "device launch requests" grew 15.3 -> 24.0: the first launch request then
waits for the zygote, and the whole run did not move (113.7 ms, --runs 9, QEMU 66.9 in that
noisy run). Restores likewise (bench/snapshot.py's fixture, 10 alternating pairs to the
vCPUs: +0.5 ms). The devices' start (the launcher's fork at ~21 ms, the zygote's exec and
imports, then the device's fork, sandbox and READY, ready at ~105 ms from the start) is the
path a faster monitor waits on; it has to get shorter before the monitor's imports matter.

2026-12-07, the next session: a timeline of `up` on this guest (marks in the launcher, the
zygote and the devices, 15 runs, not committed), ms from the spawn of `up`: the launcher's fork
at 22, the zygote's main() at 45 and its imports done at 70; the launcher's server imported at
80 (the monitor's configure came at 75); the VM's two models loaded by 85 (4.6 ms alone);
the zygote's two double forks at 87 and 90; then each device waits in its channel's
handshake for the monitor to serve it, which it does at the end of its confinement (101), and
the last is READY at 102. Both cores are busy throughout (CPU ~165 ms in a ~105 ms run), so
work moved earlier only takes a core from another path. Tried, each as 16-30 alternating pairs
against the tree without it (whole `up` runs and bench/snapshot.py's idle restore to the
vCPUs), and dropped:
- a boot's devices asked for ahead, as a restore's are (Machine._launch_devices(ahead=True),
  the replies taken before the confinement): -0.4 ms.
- the launcher exec'd as a new interpreter that imports the device runtime with its server,
  then forks the first zygote from itself before it reads any request (no separate zygote
  exec, no server import after the zygote's ready): -1.9 ms for `up`, -0.7 for the restore,
  and bench/memory.py 0.9 MiB more resident (the launcher and the devices each write the
  pages they share: their refcounts).
- the zygote loading the clock's and the UART's models while it waits for the configure:
  +3.0 ms for the restore (its imports take the core the monitor's imports need).
- the zygote started with -I -S and a -c entry (no site, no runpy; the module search path
  handed over): ready 36.6 against 37.4 ms alone (40 alternating starts), -1.0 / -1.3 ms
  paired: the modules site and runpy import are ones the zygote imports anyway.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vmrun import compile_package, write_config  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

QEMU = "qemu-system-x86_64"
EXIT_STATUS = 99  # the guest writes 0x31 to the debug-exit port: (0x31 << 1) | 1
GREETING = "Hello from splitvmm firmware!"
RUN_TIMEOUT_S = 60
FIRST = re.compile(r"timings: first mark at monotonic ([\d.]+) s")
PHASE = re.compile(r"timings: phase (.+?)\s+([\d.]+) ms$", re.MULTILINE)
SPAN = re.compile(r"timings: span  (.+?)\s+([\d.]+) ms", re.MULTILINE)


class Run(NamedTuple):
    start: float  # the clock before the spawn
    wall: float  # seconds from there to the exit
    cpu: float  # user + system seconds of the process and every descendant it reaped
    stderr: str


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """One run of `argv`; SystemExit if the process failed. Its CPU is that of every process
    of the tree: each parent reaps its children (splitvmm: the monitor its launcher, the
    launcher its zygote and devices), so the kernel adds theirs to the process we reap."""
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
    )
    took = time.perf_counter() - start
    if proc.returncode not in (0, EXIT_STATUS):
        raise SystemExit(f"{argv[0]}: status {proc.returncode}:\n{proc.stderr}")
    return Run(start, took, _children_cpu() - cpu, proc.stderr)


def check_output(serial: Path, who: str) -> None:
    text = serial.read_text() if serial.exists() else ""
    if GREETING not in text:
        raise SystemExit(f"{who}: the guest did not print its line: {text!r}")
    serial.unlink()


def run_splitvmm(config: Path, serial: Path, marks: bool) -> tuple[Run, dict[str, float]]:
    argv = [sys.executable, "-m", "splitvmm", "up", *(["--timings"] if marks else []), str(config)]
    run = timed(argv)
    start, took, err = run.start, run.wall, run.stderr
    check_output(serial, "splitvmm")
    if not marks:
        return run, {}
    first = FIRST.search(err)
    if first is None:
        raise SystemExit(f"splitvmm printed no timings:\n{err}")
    phases = {"interpreter start": (float(first.group(1)) - start) * 1e3}
    phases |= {name: float(ms) for name, ms in PHASE.findall(err)}
    phases["exit"] = took * 1e3 - phases["interpreter start"] - phases.pop("total")
    phases |= {f"span: {name}": float(ms) for name, ms in SPAN.findall(err)}
    return run, phases


def run_qemu(qemu: str, image: Path, serial: Path) -> Run:
    argv = [qemu, "-accel", "kvm", "-bios", str(image), "-m", "64", "-display", "none"]
    argv += ["-nodefaults", "-serial", f"file:{serial}", "-no-reboot"]
    argv += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]
    run = timed(argv)
    check_output(serial, "QEMU")
    return run


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def medians(runs: list[Run]) -> tuple[float, float] | None:
    """Median wall and CPU ms of `runs` (None where there were none)."""
    if not runs:
        return None
    return median_ms([r.wall for r in runs]), median_ms([r.cpu for r in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11, help="runs of each")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--no-timings", action="store_true", help="run up without --timings")
    args = parser.parse_args()
    compile_package()
    qemu = shutil.which(QEMU)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = build_guests(work / "guests")["firmware-hello"]
        serial = work / "serial.log"
        config = write_config(
            work / "hello.toml", "bench-startup", f'firmware = "{image}"', "64M", serial
        )
        ours: list[Run] = []
        theirs: list[Run] = []
        phases = []
        floors: dict[str, list[Run]] = {"python -c pass": [], "import splitvmm.cli": []}
        for _ in range(args.runs):  # alternate, so drift on the host hits all alike
            run, marks = run_splitvmm(config, serial, not args.no_timings)
            ours.append(run)
            phases.append(marks)
            if qemu:
                theirs.append(run_qemu(qemu, image, serial))
            floors["python -c pass"].append(timed([sys.executable, "-c", "pass"]))
            floors["import splitvmm.cli"].append(
                timed([sys.executable, "-c", "import splitvmm.cli"])
            )
    breakdown = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
    ours_ms, theirs_ms = medians(ours), medians(theirs)
    assert ours_ms is not None
    result = {
        "runs": args.runs,
        "splitvmm_ms": ours_ms[0],
        "qemu_ms": theirs_ms[0] if theirs_ms else None,
        "ratio": ours_ms[0] / theirs_ms[0] if theirs_ms else None,
        # CPU moves far less than wall on a shared host, and this start-up is CPU-bound
        "splitvmm_cpu_ms": ours_ms[1],
        "qemu_cpu_ms": theirs_ms[1] if theirs_ms else None,
        "cpu_ratio": ours_ms[1] / theirs_ms[1] if theirs_ms else None,
        "floors_ms": {k: medians(v)[0] for k, v in floors.items()},  # type: ignore[index]
        "floors_cpu_ms": {k: medians(v)[1] for k, v in floors.items()},  # type: ignore[index]
        "phases_ms": breakdown,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result, qemu)


def print_tables(result: dict[str, object], qemu: str | None) -> None:
    console = Console()
    table = Table(title=f"start -> exit, firmware hello guest (median of {result['runs']})")
    table.add_column("what")
    table.add_column("wall ms", justify="right")
    table.add_column("/ QEMU", justify="right")
    table.add_column("CPU ms", justify="right")
    table.add_column("/ QEMU", justify="right")
    qemu_ms, qemu_cpu = result["qemu_ms"], result["qemu_cpu_ms"]
    rows = {
        "splitvmm up": (result["splitvmm_ms"], result["splitvmm_cpu_ms"]),
        "QEMU": (qemu_ms, qemu_cpu),
    }
    for k, v in result["floors_ms"].items():  # type: ignore[attr-defined]
        rows[f"floor: {k}"] = (v, result["floors_cpu_ms"][k])  # type: ignore[index]
    for what, (ms, cpu) in rows.items():
        if ms is None:
            table.add_row(f"{what}: {QEMU} not found", "—", "—", "—", "—")
            continue
        ratio = f"{ms / qemu_ms:.2f}" if qemu_ms else "—"  # type: ignore[operator]
        cpu_ratio = f"{cpu / qemu_cpu:.2f}" if qemu_cpu else "—"  # type: ignore[operator]
        table.add_row(what, f"{ms:.1f}", ratio, f"{cpu:.1f}", cpu_ratio)
    console.print(table)
    phases = Table(title="where splitvmm's time goes (medians; spans overlap the phases)")
    phases.add_column("phase")
    phases.add_column("ms", justify="right")
    for name, ms in result["phases_ms"].items():  # type: ignore[attr-defined]
        phases.add_row(name, f"{ms:.1f}")
    console.print(phases)


if __name__ == "__main__":
    main()
