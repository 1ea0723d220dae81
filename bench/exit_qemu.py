"""Cost of a port read served by the UART: splitvmm next to QEMU, on the same guest.

Runs the firmware-pio test guest (a 64 KiB real-mode firmware image) under
`splitvmm up` and under `qemu-system-x86_64 -accel kvm -bios`, alternately,
RUNS times each. At CPL0 the guest times, with one rdtsc before and one after
each whole loop, N `in`s from the 8250 scratch register (0x3ff), N `out`s to
it, N `in`s from IIR (0x3fa) and the same loop with no I/O. In splitvmm an SCR
read is answered by the monitor from the serial device's register mirror
(monitor/mirror.py), an SCR write is posted to the device process, and an IIR
read (not mirrored) is a round trip to it; in QEMU its own serial model answers
every access in QEMU's userspace.
On a PVM host every CPL0 instruction goes through KVM's emulator, the same for
both VMMs, so (in - loop) / N is the whole cost of one `in` (its emulation,
the exit, the VMM's work, the re-entry). Ticks become microseconds with the
vCPU's TSC rate; each figure is the median over the runs.

    python bench/exit_qemu.py [--runs R] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vmrun import qemu_firmware_argv, run_guest, run_to_end, write_config  # noqa: E402
from splitvmm.native.kvm import Kvm  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

QEMU = "qemu-system-x86_64"
EXIT_STATUS = 99  # the guest writes 0x31 to the debug-exit port: (0x31 << 1) | 1
RUN_TIMEOUT_S = 120
LINE = re.compile(r"^fw-pio: (in|out|iir|loop) ticks=(\d+) n=(\d+)$", re.MULTILINE)
KINDS = ("in", "out", "iir", "loop")


def parse(text: str, who: str) -> dict[str, float]:
    """Ticks per pass of each loop, from the guest's four lines."""
    found = {kind: (int(ticks), int(n)) for kind, ticks, n in LINE.findall(text)}
    if set(found) != set(KINDS):
        raise SystemExit(f"{who}: the guest did not print its four lines:\n{text}")
    return {kind: ticks / n for kind, (ticks, n) in found.items()}


def run_splitvmm(image: Path, work: Path, i: int) -> dict[str, float]:
    serial = work / f"splitvmm-{i}.log"
    config = write_config(
        work / f"splitvmm-{i}.toml", "bench-fw-pio", f'firmware = "{image}"', "64M", serial
    )
    return parse(run_guest(config, serial, EXIT_STATUS, RUN_TIMEOUT_S), "splitvmm")


def run_qemu(qemu: str, image: Path, work: Path, i: int) -> dict[str, float]:
    serial = work / f"qemu-{i}.log"
    argv = qemu_firmware_argv(qemu, image, serial)
    text = run_to_end(argv, serial, EXIT_STATUS, RUN_TIMEOUT_S, "QEMU")
    return parse(text, "QEMU")


def per_access_us(runs: list[dict[str, float]], us_per_tick: float) -> dict[str, object]:
    """Medians over the runs: in and out net of the loop, and the loop pass itself, in µs."""
    samples = {
        "in": [(r["in"] - r["loop"]) * us_per_tick for r in runs],
        "out": [(r["out"] - r["loop"]) * us_per_tick for r in runs],
        "iir": [(r["iir"] - r["loop"]) * us_per_tick for r in runs],
        "loop": [r["loop"] * us_per_tick for r in runs],
    }
    return {
        **{f"{k}_us": statistics.median(v) for k, v in samples.items()},
        "samples_us": samples,
    }


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of the guest under each VMM")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    qemu = shutil.which(QEMU)
    with Kvm() as kvm:
        tsc_khz = kvm.default_tsc_khz()
    us_per_tick = 1e3 / tsc_khz
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = build_guests(work / "guests")["firmware-pio"]
        ours_runs, qemu_runs = [], []
        for i in range(args.runs):  # alternate, so drift on the host hits both alike
            ours_runs.append(run_splitvmm(image, work, i))
            if qemu:
                qemu_runs.append(run_qemu(qemu, image, work, i))
        passes = int(LINE.search((work / "splitvmm-0.log").read_text()).group(3))
    ours = per_access_us(ours_runs, us_per_tick)
    theirs = per_access_us(qemu_runs, us_per_tick) if qemu else None
    ratio = (
        {k: ours[f"{k}_us"] / theirs[f"{k}_us"] for k in ("in", "out", "iir")} if theirs else None
    )

    if args.json:
        print(
            json.dumps(
                {
                    "tsc_khz": tsc_khz,
                    "runs": args.runs,
                    "accesses_per_run": passes,
                    "qemu": qemu_version(qemu) if qemu else None,
                    "splitvmm": ours,
                    "qemu_figures": theirs,
                    "ratio_splitvmm_over_qemu": ratio,
                }
            )
        )
        return

    table = Table(
        title=f"port I/O at CPL0 to the 8250, firmware-pio guest "
        f"({passes} accesses/run, median of {args.runs} runs)",
        caption=f"TSC {tsc_khz / 1e6:.3f} GHz; "
        + (qemu_version(qemu) if qemu else f"{QEMU} not found"),
    )
    table.add_column("per access")
    table.add_column("splitvmm µs", justify="right")
    table.add_column("QEMU µs", justify="right")
    table.add_column("splitvmm / QEMU", justify="right")
    for kind, what in (
        ("in", "inb 0x3ff (SCR read, the VMM's UART answers), net of loop"),
        ("out", "outb 0x3ff (SCR write), net of loop"),
        ("iir", "inb 0x3fa (IIR read, never mirrored: a round trip in splitvmm), net of loop"),
    ):
        table.add_row(
            what,
            f"{ours[f'{kind}_us']:.2f}",
            f"{theirs[f'{kind}_us']:.2f}" if theirs else "—",
            f"{ratio[kind]:.2f}" if ratio else "—",
        )
    table.add_row(
        "loop pass with no I/O (the floor, subtracted above)",
        f"{ours['loop_us']:.2f}",
        f"{theirs['loop_us']:.2f}" if theirs else "—",
        f"{ours['loop_us'] / theirs['loop_us']:.2f}" if theirs else "—",
    )
    if not qemu:
        table.add_row(f"QEMU: {QEMU} not found (apt-get install qemu-system-x86)", "", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
