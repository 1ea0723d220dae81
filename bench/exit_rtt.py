"""Cost of a guest port access served by a device process, next to this machine's floors.

Runs the pio-loop test guest through `splitvmm up`: at CPL3 (native speed here)
it times N `in`s and N `out`s to the 8250 scratch register, served by the
serial device process, with rdtsc around each; it prints medians and p99s in
TSC ticks, which we turn into microseconds with the vCPU's TSC frequency. The
floors are measured in the same run: a bare Python KVM_RUN loop answering the
exit inline, and a raw pyzmq PAIR round trip between two processes.

    python bench/exit_rtt.py [--count N] [--json]

Why CPL0 (~10 µs, bench/exit_qemu.py) and CPL3 (140+ µs) differ -- findings so
far (issue 12, goal 3; 2-core host shared with other work, one run each):

- This bench, --count 3000: in via device 163.6 µs, out posted 81.7 µs, inline
  in 31.3 µs, inline out 31.5 µs, KVM_RUN floor (CPL0) 8.2 µs, raw zmq round
  trip 56.3 µs: in / (inline in + zmq) = 1.87.
- Inside the monitor (scratch copy: perf_counter_ns around VcpuFd.run and
  DeviceChannel.read), pio-loop at CPL3: KVM_RUN median 36.9 µs (PVM's CPL3
  exit and re-entry), DeviceChannel.read median 94.7 µs -- 38 µs over the raw
  zmq floor (the slot's lock, the channel's event drain and RCVTIMEO setsockopt,
  the device's decode/serve/encode, and two more thread wake-ups on a host with
  2 cores for monitor, device and both ZeroMQ I/O threads). A posted out costs
  50 µs over an inline one: back to back, the device's work competes with the
  vCPU thread for the same cores.
- CPL0, firmware-pio (2000 `in`s of 0x3ff): KVM_RUN median 8.5 µs, but in one
  run DeviceChannel.read was called 101 times (the LSR polls of the guest's
  prints) for 4210 KVM_RUN returns, and that run's guest reported 10 µs per
  `in`; another run reported 48.7 µs per `in`, which its wall clock (155 ms of
  guest run for 99 ms of `in` loop by the TSC) confirms. So the ~10 µs figure
  is not one forwarded read per `in`: an artefact, cause not found yet (next:
  count PioIn exits by port and count in that run, and KVM's binary stats fd
  `exits`/`io_exits` around the loop).

Not tried yet: spinning on the reply before blocking (must not hold the GIL
against other vCPUs), a socketpair instead of ZeroMQ for reads (22 µs floor).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floors import kvm_run_floor, summary_us, zmq_pair_floor  # noqa: E402
from bench.vmrun import run_guest, write_config  # noqa: E402
from splitvmm.native.kvm import Kvm  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

SCRATCH_PORT = 0x3FF  # 8250 SCR: served by the serial device process, no side effects
UNCLAIMED_PORT = 0x2F8  # COM2: nobody is there, the monitor's bus answers all-ones itself
LINE = re.compile(r"pio-loop: (\w+) median=(\d+) p99=(\d+)")


def splitvmm_pio(count: int, port: int, work: Path) -> dict[str, tuple[float, float]]:
    guest = build_guests(work / "guests")["pio-loop"]
    serial = work / f"serial-{port:x}.log"
    boot = f'kernel = "{guest}"\ncmdline = "count={count} port={port:#x}"'
    config = write_config(work / "pio.toml", "bench-pio", boot, "64M", serial)
    text = run_guest(config, serial, status=1)
    if "pio-loop: done" not in text:
        raise SystemExit(f"pio-loop guest did not finish: {text}")
    with Kvm() as kvm:
        us_per_tick = 1e3 / kvm.default_tsc_khz()
    return {
        kind: (int(median) * us_per_tick, int(p99) * us_per_tick)
        for kind, median, p99 in LINE.findall(text)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="accesses of each kind")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = splitvmm_pio(args.count, SCRATCH_PORT, Path(tmp))
        inline = splitvmm_pio(args.count, UNCLAIMED_PORT, Path(tmp))
    rows = {
        "guest in  (CPL3) -> serial device process, reply": ours["in"],
        "guest out (CPL3) -> serial device process, posted": ours["out"],
        "guest in  (CPL3) -> unclaimed port, monitor answers inline": inline["in"],
        "guest out (CPL3) -> unclaimed port, monitor drops inline": inline["out"],
        "guest rdtsc pair (measurement floor)": ours["rdtsc"],
        "floor: bare Python KVM_RUN loop exit (CPL0, inline)": summary_us(kvm_run_floor(20000)),
        "floor: raw pyzmq PAIR round trip (ipc://)": summary_us(zmq_pair_floor(5000)),
    }
    if args.json:
        print(json.dumps({k: {"median_us": m, "p99_us": p} for k, (m, p) in rows.items()}))
        return
    table = Table(title=f"exit round trip ({args.count} accesses each)")
    table.add_column("what")
    table.add_column("median µs", justify="right")
    table.add_column("p99 µs", justify="right")
    for what, (median, p99) in rows.items():
        table.add_row(what, f"{median:.1f}", f"{p99:.1f}")
    Console().print(table)
    floor = rows["floor: bare Python KVM_RUN loop exit (CPL0, inline)"][0]
    zmq = rows["floor: raw pyzmq PAIR round trip (ipc://)"][0]
    print(
        f"in via device / (inline in + zmq floor) = {ours['in'][0] / (inline['in'][0] + zmq):.2f}"
    )
    print(
        f"KVM_RUN floor at CPL0 = {floor:.1f} µs (a CPL3 exit costs more on PVM: see KVM-HERE.md)"
    )


if __name__ == "__main__":
    main()
