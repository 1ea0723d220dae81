"""Device spawn to READY: started by the launcher (as the monitor does) against started directly.

A serial device with an eventfd as its irq and a pipe as its output, on an ipc://
channel in a private directory, no VM. For each run: the spawn call alone (the
launcher's round trip, or our own fork and exec), then spawn to READY (interpreter
start, imports, sandbox entry, the channel). The two ways alternate, so that load
on the host hits both alike. A restart of a crashed device will cost the same.

    python bench/spawn.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from splitvmm.monitor.channel import DeviceChannel  # noqa: E402
from splitvmm.protocol.spec import DeviceSpec  # noqa: E402
from splitvmm.sandbox.launcher import Launcher  # noqa: E402
from splitvmm.sandbox.spawn import DeviceProcess, spawn_child  # noqa: E402

Spawner = Callable[[DeviceSpec], tuple[DeviceProcess, int]]


def once(spawner: Spawner, spec: DeviceSpec) -> tuple[float, float]:
    """(ms in the spawn call, ms from spawn to READY) of one device, ended afterwards."""
    start = time.perf_counter()
    process, listener = spawner(spec)
    called = time.perf_counter()
    channel = DeviceChannel(spec.model, spec.channel, listener)
    channel.wait_ready(process)
    ready = time.perf_counter()
    process.kill()
    process.wait(10)
    process.close()
    channel.close()
    return (called - start) * 1e3, (ready - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="devices started each way")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rundir = Path(tempfile.mkdtemp(prefix="splitvmm-bench-"))
    t0 = time.perf_counter()
    launcher = Launcher.start(rundir)
    launcher_ms = (time.perf_counter() - t0) * 1e3
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    spec = DeviceSpec(
        "serial0", "serial", f"ipc://{rundir}/serial0.sock", {"irq": irq, "out": out_w}
    )
    ways: dict[str, Spawner] = {"launcher": launcher.spawn, "direct": spawn_child}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        for _ in range(args.runs):
            for name, spawner in ways.items():
                samples[name].append(once(spawner, spec))
    finally:
        launcher.close()
        for fd in (irq, out_r, out_w):
            os.close(fd)
        os.rmdir(rundir)
    rows = {
        name: {
            "call_ms": statistics.median(c for c, _ in runs),
            "ready_ms": statistics.median(r for _, r in runs),
        }
        for name, runs in samples.items()
    }
    if args.json:
        print(json.dumps({"launcher_start_ms": launcher_ms, "runs": args.runs, **rows}))
        return
    table = Table(
        title=f"serial device, median of {args.runs} (launcher start {launcher_ms:.1f} ms)"
    )
    for column in ("started", "spawn call (ms)", "spawn to READY (ms)"):
        table.add_column(column)
    for name, row in rows.items():
        table.add_row(name, f"{row['call_ms']:.2f}", f"{row['ready_ms']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
