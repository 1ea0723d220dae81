"""Host memory of a running VM beyond its guest RAM: splitvmm next to QEMU, same guest.

Boots the firmware-idle test guest (prints one line on COM1, then halts for good) under
`splitvmm up` and under `qemu-system-x86_64 -accel kvm -bios`, with the same devices:

- "serial":    the 8250 on COM1 (and the CMOS clock, which both have by default);
- "5 devices": the same plus virtio-blk (a 64 MiB raw file), virtio-rng and virtio-console.

Once the guest's line is out (and, for splitvmm, every device is running), it reads every
process of the VM from /proc: splitvmm's monitor and all its descendants (launcher, zygote,
and per device its warden and its sandboxed process), QEMU's one process. For each it sums
PSS (a page shared by N processes counts 1/N in each: the honest sum over a process tree)
and RSS from smaps, leaving out guest RAM: the mapping of the RAM memfd (splitvmm's
`<vm>-ram`; QEMU gets `-object memory-backend-memfd` so its RAM is a named memfd too, which
QEMU names after the backend's type: `memory-backend-memfd`, whatever its id).
A VM is measured after SETTLE_S, RUNS times; medians.

What the goal compares is "resident": the distinct physical pages the VM's processes keep
resident (from /proc/PID/pagemap, which shows frame numbers to root only), guest RAM left
out, each page once however many of the VM's processes map it. For QEMU's one process that
is its RSS. A sum of PSS is not that: a page shared with a process outside the VM (this
bench's own interpreter, which maps the same python binary and imports the same modules,
or any other Python on the host) counts only in part, so the figure falls as unrelated
processes start (one VM: 40.5 MiB, 38.5 with six idle interpreters beside it, against 45.1
resident either way) and PSS against QEMU's RSS counts shared libraries two ways. Without
root the ratio is PSS against QEMU's PSS, the same measure on both sides.

The zygote (sandbox/zygote.py) ends once the VM's devices and their spares have started and
no restart came for ZYGOTE_IDLE_S (the monitor's rest request to the launcher), so a settled
VM has none: its row reads 0 unless a spawn is under way. Measured
(2026-12-01, --runs 3, SETTLE_S 3 s for every tree, same host and hour): before (96fec8b's
parent) serial 58.0 MiB, 5 devices 73.5 (1.78x, 2.16x QEMU's RSS); with the rest 50.9 and
66.3 (1.55x, 1.94x). From the session's first tree (c8fd15e: 60.6 and 76.0), the other
2.5 MiB came from msgspec imported without typing_extensions, inspect, ast and dis
(splitvmm/record.py) in the monitor, the launcher and the zygote. Then hashlib (OpenSSL)
no longer imported by the zygote and the launcher (protocol/models.py default_mac), back to
back: serial 51.0 -> 49.5, 5 devices 66.5 -> 65.9 (launcher 9.6 -> 8.0). Then (2026-12-02)
OpenSSL out of the monitor too (snapshot/signing.py signs with keyed BLAKE3, digest.py
imports hashlib for a v1 reader only), same hour: serial 48.9 -> 46.8 (1.49x -> 1.42x),
5 devices 65.1 -> 62.8 (1.91x -> 1.84x); the monitor 20.1 -> 18.1 MiB PSS, 30.0 -> 26.5
RSS. A VM with a virtio-net device whose MAC is not given still loads it (the monitor
derives the MAC with sha256: protocol/models.py default_mac). What is left,
serial: the monitor ~18 MiB (its Python with click, zmq, msgspec, pyseccomp and the
snapshot code it preloads before it confines itself: ~15 MiB of anonymous memory after
its imports alone; click alone adds 3.4 MiB to a bare interpreter, zmq 2.5, pyseccomp and
ctypes 2.4, msgspec 1.8), the launcher ~8, each device ~10 (its Python, ~5 of it pages
copied from the zygote's on write: CPython 3.11 writes a reference count on every object it
touches) and its warden ~0.3.

End of 2026-12-02's session, alternating with its first tree (1aa1705, .venv from pyenv's
3.11.7): serial 49.5 -> 46.7 MiB (1.51x -> 1.42x QEMU's RSS), 5 devices 65.7 -> 62.9 (1.93x
-> 1.83x); the monitor 20.8 -> 18.1 MiB PSS.

The next session (its start-up work left the zygote without pathlib, ctypes.util, shutil, bz2
and lzma: bench/startup.py), one run each against its first tree (037f155), --runs 3: serial
46.7 -> 45.4 MiB (1.43x -> 1.39x QEMU's RSS), 5 devices 63.1 -> 60.5 (1.84x -> 1.78x); the
devices' PSS 20.7 -> 19.3 and 37.8 -> 35.1, the monitor and the launcher unchanged.

    python bench/memory.py [--runs R] [--json]

2026-12-02, fourth session (another host), --runs 1: serial 45.4 MiB PSS (monitor 18.1,
launcher 8.0, devices 19.3; 1.40x QEMU's RSS of 32.6), 5 devices 60.6 (1.78x). Tried and
dropped: malloc_trim(0), glibc's free heap back to the kernel (QEMU's RCU thread does it), in
the monitor once its devices were ready, in the launcher when its zygote rests and in each
device after READY. The monitor's Private_Dirty went 15.95 -> 14.72 MiB in smaps_rollup a few
seconds in, but this bench, --runs 3, read serial 45.3 (monitor 17.9, launcher 8.2, devices
19.2) and 5 devices 60.4: the heap grows back before the VM has settled.

2026-12-03, a fast host, --runs 3, twice: serial 46.2 and 45.9 MiB PSS (monitor 18.5/18.4,
launcher 8.0, devices 19.6/19.5; 1.40x and 1.41x QEMU's RSS of 31.2/31.0), 5 devices 61.6 and
61.4 (1.79x). Where a device's ~9 MiB of PSS is (smaps of a settled serial device): ~5 MiB
private dirty, of which ~4.3 in the pymalloc arenas and the heap (pages copied from the zygote
on write: CPython 3.11 writes a reference count on every object it touches) and ~0.5 the
interpreter's own data; ~6 MiB more of dirty anonymous memory still shared with its sibling,
half of it counted in each; ~1 MiB of files. The launcher: 6.3 MiB private dirty, ~3.4 of it
pymalloc arenas. No change to the path.

2026-12-04, the monitor without pyzmq (its end of each channel a plain socket:
monitor/zmtp.py), this bench's defaults, back to back with the tree before (b498c6a): serial
45.3 MiB PSS against 46.6 (1.38x against 1.42x QEMU's RSS of 31.2), the monitor 16.8 against
18.7 (RSS 23.5 against 27.0: libzmq's context, its I/O thread and pyzmq's modules); 5 devices
61.2 against 62.6 (1.79x against 1.84x). Goal (QEMU's RSS or less) not met: the devices, two
processes each, are most of what is left.

2026-12-04, the next session, devices without pyzmq (their end of the channel a plain socket
too, read by the device's one thread: devprocs/channel.py), back to back with the tree before
(7ffbb48): serial 42.1 MiB PSS against 45.4 (1.28x against 1.39x QEMU's RSS of 31.2), the
devices 17.3 against 20.6 (RSS 32.6 against 38.4); 5 devices 56.7 against 61.2 (1.66x against
1.78x), the devices 32.6 against 37.0. Per device 0.9-1.7 MiB of PSS: pyzmq's modules,
libzmq's context and its I/O and reaper threads (their stacks and malloc arenas). Goal not met: each
device is still an interpreter of its own (~8 MiB, most of it pages copied from the zygote as
CPython writes reference counts), the launcher ~8.

2026-12-05: the ratios above set splitvmm's summed PSS against QEMU's RSS; the goal's ratio is
now resident against resident (see the top). --runs 1, quiet: serial 42.1 MiB PSS, 45.0
resident against QEMU's 32.5 (1.39x; the old measure read 1.30x); 5 devices 56.8 PSS, 59.4
resident against 34.1 (1.74x; old 1.67x).

2026-12-06: the zygote imports the models the VM has (the launcher's configure names them),
before its first fork. --runs 1, same session: serial 45.8 -> 44.9 MiB resident (1.40x ->
1.37x QEMU's RSS), 5 devices 60.9 -> 60.8 (1.79x). A first version imported each model at
its first fork instead: 5 devices then read 62.5 (1.83x), the devices' PSS 35.3 against 34.0,
as a later model's import wrote the zygote's heap between forks and the devices forked
before and after it shared fewer pages.

2026-12-06, a later session (the cyclic collector held off while a VM's processes import:
cli/early.py, devprocs/zygote.py), --runs 3: serial 45.0 MiB resident against QEMU's 32.8
(1.37x), the monitor 17.5 PSS, the launcher 8.3, the devices 16.4; 5 devices 59.4 against
34.1 (1.74x); the last session read 44.9 and 60.8: no change that shows.

2026-12-07, where a device's own pages come from (a settled rtc device of the serial VM, its
Private_Dirty from /proc sampled every 50 ms while it paused 0.6 s at each step of its start;
not committed): 1.8-2.3 MiB once forked and its spec read, +0.4 its model's setup(), +0.1 its
sandbox (namespaces, empty root, Landlock, connect, rlimits), +0.01 its seccomp filter, +0.5
its state and device built, +0.4 once READY and serving; the zygote's rest then turns the
pages it alone shared with the device into the device's (~4.3-4.6 MiB in all, as above). A
child forked from an interpreter holding the same imports, gc frozen, that only sleeps keeps
0.75-0.9 MiB of its own; one that also decodes a device spec, 1.2. Every step writes pages
the zygote made (CPython 3.11 writes the reference count of every object it touches), and
none holds a large part. Tried and dropped: a device loading its filter from the BPF program
the zygote exported (seccomp(2) on bytes) instead of libseccomp's seccomp_load, which
generates the program again from the rule database the zygote built: in a process forked
from a zygote-like parent, 0.4 MiB less of private pages (+8 KiB against +436) and 0.1-0.2
ms against 0.4-0.6 to load; in this bench, --runs 3 alternating with the tree without it,
the devices' RSS fell 0.7 MiB but resident did not (serial 45.5 against 45.4 MiB, 5 devices
60.6 against 60.4): the pages it spared are written later on the device's way anyway.
What goal 5 would take, from these figures: QEMU with 5 devices is 34.2 MiB here; the five
device processes alone are 32.7 MiB of PSS and the monitor 17.4. To meet it each device
would have to keep under ~2.3 MiB of pages of its own with the launcher free, below what the
steps above write on the path every device runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vmrun import compile_package, wait_for_text  # noqa: E402
from splitvmm.monitor.machine import ZYGOTE_IDLE_S  # noqa: E402
from splitvmm.record import Struct, asdict  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

QEMU = "qemu-system-x86_64"
VM = "bench-memory"
GREETING = "firmware-idle: halted"
MEMORY_MIB = 64
# After the greeting: lazy allocations (ZeroMQ's threads, first requests) done, and the
# zygote ended (the monitor lets it rest ZYGOTE_IDLE_S after the devices started)
SETTLE_S = ZYGOTE_IDLE_S + 1.0
START_TIMEOUT_S = 60
KIB = 1024


class Usage(Struct, frozen=True):
    """One process (or a sum): kiB of PSS and RSS, guest RAM left out; `resident`, where
    set, the kiB of distinct pages of a whole VM (resident_kib), 0 where not known."""

    pss: int = 0
    rss: int = 0
    resident: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.pss + other.pss, self.rss + other.rss, self.resident + other.resident)


def usage_beyond(pid: int, ram_name: str) -> Usage:
    """PSS and RSS of `pid` from its smaps, leaving out every mapping of the memfd
    `ram_name` (guest RAM)."""
    pss = rss = 0
    in_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        field = line.split(None, 1)[0]
        if not field.endswith(":"):  # a mapping's header line: its pathname is last
            in_ram = f"/memfd:{ram_name} " in line + " "
        elif not in_ram and field == "Pss:":
            pss += int(line.split()[1])
        elif not in_ram and field == "Rss:":
            rss += int(line.split()[1])
    return Usage(pss, rss)


def resident_kib(pids: list[int], ram_name: str) -> int:
    """kiB of the distinct physical pages mapped and present in `pids`, leaving out every
    mapping of the memfd `ram_name`: a page shared by several of them counts once, one they
    share with processes elsewhere counts whole (as a single process's RSS counts it). 0 when
    the kernel hides frame numbers (pagemap gives them to CAP_SYS_ADMIN only)."""
    frames: set[int] = set()
    for pid in pids:
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(None, 5)
                name = fields[5] if len(fields) > 5 else ""
                if f"/memfd:{ram_name} " in name + " " or name == "[vsyscall]":
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek((start >> 12) * 8)
                entries = pagemap.read(((end - start) >> 12) * 8)
                for (entry,) in struct.iter_unpack("<Q", entries):
                    if entry >> 63:  # present
                        pfn = entry & ((1 << 55) - 1)
                        if pfn == 0:
                            return 0
                        frames.add(pfn)
    return len(frames) * 4


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            found += descendants(int(child))
    return found


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- splitvmm ---------------------------------------------------------------------------------
def splitvmm_config(work: Path, image: Path, disk: Path | None) -> Path:
    text = f'[vm]\nname = "{VM}"\nmemory = "{MEMORY_MIB}M"\n[boot]\nfirmware = "{image}"\n'
    text += f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{work / "serial.log"}"\n'
    if disk is not None:
        text += f'[[device]]\nname = "blk0"\nmodel = "virtio-blk"\npath = "{disk}"\n'
        text += '[[device]]\nname = "rng0"\nmodel = "virtio-rng"\n'
        text += (
            f'[[device]]\nname = "con0"\nmodel = "virtio-console"\noutput = "{work / "con.log"}"\n'
        )
    config = work / "vm.toml"
    config.write_text(text)
    return config


def ctl_devices(work: Path) -> list[dict[str, object]]:
    argv = [sys.executable, "-m", "splitvmm", "ctl", "--socket", str(control_socket(work))]
    out = subprocess.run([*argv, "devices", "--json"], capture_output=True, text=True, check=True)
    devices: list[dict[str, object]] = json.loads(out.stdout)["devices"]
    return devices


def control_socket(work: Path) -> Path:
    return work / "run" / "splitvmm" / VM / "control.sock"


def measure_splitvmm(work: Path, image: Path, disk: Path | None) -> dict[str, Usage]:
    """Usage by role: monitor, launcher, zygote, devices (wardens and sandboxed processes,
    warm spares included); and the sum."""
    for log in ("serial.log", "con.log"):
        (work / log).unlink(missing_ok=True)
    config = splitvmm_config(work, image, disk)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run")}
    (work / "run").mkdir(exist_ok=True, mode=0o700)
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_text(work / "serial.log", GREETING, proc, START_TIMEOUT_S, "splitvmm")
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(d["state"] != "running" for d in ctl_devices(work)):
            if time.monotonic() > deadline:
                raise SystemExit("splitvmm: devices not running")
            time.sleep(0.05)
        time.sleep(SETTLE_S)
        return splitvmm_roles(proc.pid)
    finally:
        stop(proc)


def splitvmm_roles(monitor: int) -> dict[str, Usage]:
    ram = f"{VM}-ram"
    roles = {"monitor": usage_beyond(monitor, ram)}
    (launcher,) = (
        int(c) for c in Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
    )
    roles["launcher"] = usage_beyond(launcher, ram)
    roles["zygote"] = roles["devices"] = Usage()
    children = [
        int(c) for c in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ]
    for child in children:  # the wardens (a device is its warden's child), and the zygote
        # until the monitor lets it rest, once the devices and their spares have started
        try:
            exe = Path(os.readlink(f"/proc/{child}/exe")).name
        except FileNotFoundError:  # ended since the listing
            continue
        role = "devices" if exe == "warden" else "zygote"
        for pid in descendants(child):
            roles[role] += usage_beyond(pid, ram)
    total = sum(roles.values(), Usage())
    tree = descendants(monitor)
    roles["total"] = Usage(total.pss, total.rss, resident_kib(tree, ram))
    roles["processes"] = Usage(len(tree), 0)
    return roles


# -- QEMU -------------------------------------------------------------------------------------
QEMU_RAM = "memory-backend-memfd"  # QEMU's name for the memfd of any memory-backend-memfd


def measure_qemu(qemu: str, work: Path, image: Path, disk: Path | None) -> Usage:
    serial = work / "qemu-serial.log"
    serial.unlink(missing_ok=True)
    argv = [qemu, "-accel", "kvm", "-bios", str(image), "-display", "none", "-nodefaults"]
    argv += ["-m", f"{MEMORY_MIB}M", "-object", f"memory-backend-memfd,id=ram,size={MEMORY_MIB}M"]
    argv += ["-machine", "memory-backend=ram", "-serial", f"file:{serial}"]
    if disk is not None:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw"]
        argv += ["-device", "virtio-blk-pci,drive=d0", "-device", "virtio-rng-pci"]
        argv += ["-device", "virtio-serial-pci", "-chardev", f"file,id=c0,path={work / 'qc'}"]
        argv += ["-device", "virtconsole,chardev=c0"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_text(serial, GREETING, proc, START_TIMEOUT_S, "QEMU")
        time.sleep(SETTLE_S)
        use = usage_beyond(proc.pid, QEMU_RAM)
        return Usage(use.pss, use.rss, resident_kib([proc.pid], QEMU_RAM))
    finally:
        stop(proc)


# -- report -----------------------------------------------------------------------------------
def median(samples: list[Usage]) -> Usage:
    return Usage(
        round(statistics.median(u.pss for u in samples)),
        round(statistics.median(u.rss for u in samples)),
        round(statistics.median(u.resident for u in samples)),
    )


def mib(kib: float) -> str:
    return f"{kib / KIB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="VMs of each kind")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    compile_package()
    qemu = shutil.which(QEMU)
    results: dict[str, dict[str, Usage]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = build_guests(work / "guests")["firmware-idle"]
        disk = work / "disk.img"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        for label, devices in (("serial", None), ("5 devices", disk)):
            ours: list[dict[str, Usage]] = []
            theirs: list[Usage] = []
            for _ in range(args.runs):  # alternate, so drift on the host hits both alike
                ours.append(measure_splitvmm(work, image, devices))
                if qemu:
                    theirs.append(measure_qemu(qemu, work, image, devices))
            results[label] = {role: median([run[role] for run in ours]) for role in ours[0]}
            if theirs:
                results[label]["QEMU"] = median(theirs)
    if args.json:
        print(json.dumps({k: {r: asdict(u) for r, u in v.items()} for k, v in results.items()}))
        return
    show(results)


def show(results: dict[str, dict[str, Usage]]) -> None:
    console = Console()
    for label, roles in results.items():
        qemu = roles.get("QEMU")
        # the same measure on both sides: distinct resident pages (root), else PSS
        by_pages = qemu is not None and qemu.resident > 0 and roles["total"].resident > 0
        measure = "resident" if by_pages else "PSS"
        table = Table(title=f"beyond guest RAM, {label} (MiB, median)")
        for column in ("what", "PSS", "RSS", "resident", f"{measure} / QEMU's"):
            table.add_column(column, justify="left" if column == "what" else "right")
        for role, use in roles.items():
            if role == "processes":
                continue
            ratio = ""
            if qemu is not None and role in ("total", "QEMU"):
                ratio = f"{use.resident / qemu.resident if by_pages else use.pss / qemu.pss:.2f}"
            name = {"total": f"splitvmm ({roles['processes'].pss} processes)"}.get(role, role)
            resident = mib(use.resident) if use.resident else ""
            table.add_row(name, mib(use.pss), mib(use.rss), resident, ratio)
        console.print(table)


if __name__ == "__main__":
    main()
