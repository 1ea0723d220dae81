"""A crashed serial device's restart: kill -> serving again, and the longest guest stall.

A counting guest prints through the serial device (on_crash = "restart", output to a
file) under `splitvmm up`; the device's process is SIGKILLed --kills times, each at a
random moment, each once the previous restart is done. Per kill: the monitor's own
figure (crash seen -> the new process READY, `recover_ms`), and ours, kill() -> the
control socket showing the new process serving (which adds up to a poll interval,
POLL_S). The longest stall is the longest a guest access waited on the slot for its
device to be back (`longest_stall_ms`). At the end the serial log is checked: every
count= line once, in order.

    python bench/restart.py [--kills N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
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

from splitvmm.monitor.control import request  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402
from tests.integration.conftest import vm_toml  # noqa: E402

POLL_S = 0.002


def device(sock: Path) -> dict[str, object]:
    devices = request(sock, "devices")["devices"]
    assert isinstance(devices, list)
    return next(d for d in devices if d["name"] == "serial0")


def wait_serving(sock: Path, generation: int, timeout_s: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dev = device(sock)
        if dev["generation"] == generation and dev["state"] == "running":
            return dev
        time.sleep(POLL_S)
    raise SystemExit(f"serial0 did not come back as process {generation}")


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.99 * len(values)) - 1)]


def run(kills: int, tmp: Path) -> dict[str, object]:
    guests = build_guests(tmp / "guests")
    serial, config = tmp / "serial.log", tmp / "vm.toml"
    boot = f'kernel = "{guests["counter"]}"\ncmdline = ""'
    budget = f'on_crash = "restart"\nmax_restarts = {kills + 1}\n'
    config.write_text(vm_toml(boot, "64M", 1, serial) + budget)
    env = {"XDG_RUNTIME_DIR": str(tmp / "run"), "PATH": os.environ.get("PATH", "/usr/bin")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=REPO, env=env,
    )  # fmt: skip
    sock = tmp / "run" / "splitvmm" / "test" / "control.sock"
    rng = random.Random(6)
    ours, monitors, warm = [], [], []
    try:
        while not sock.exists() or "count=" not in serial.read_text(errors="replace"):
            time.sleep(0.05)
        for kill in range(kills):
            time.sleep(rng.uniform(0.01, 0.1))
            before = device(sock)
            t0 = time.monotonic()
            os.kill(int(before["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            dev = wait_serving(sock, kill + 2)
            ours.append((time.monotonic() - t0) * 1e3)
            monitors.append(float(dev["recover_ms"]))  # type: ignore[arg-type]
            warm.append(dev["warm_restarts"] != before["warm_restarts"])
        stall = float(device(sock)["longest_stall_ms"])  # type: ignore[arg-type]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    if os.environ.get("BENCH_STDERR"):
        sys.stderr.write(err.decode(errors="replace"))
    values = [int(m) for m in re.findall(r"^count=(\d+)$", serial.read_text(), re.M)]
    intact = values == [values[0] * (k + 1) for k in range(len(values))]
    by_kind = {
        kind: [m for m, w in zip(monitors, warm, strict=True) if w == (kind == "spare")]
        for kind in ("spare", "cold")
    }
    return {
        "kills": kills,
        "monitor_median_ms": statistics.median(monitors),
        "monitor_p99_ms": p99(monitors),
        **{f"{kind}_restarts": len(ms) for kind, ms in by_kind.items()},
        **{f"{kind}_median_ms": statistics.median(ms) for kind, ms in by_kind.items() if ms},
        **{f"{kind}_p99_ms": p99(ms) for kind, ms in by_kind.items() if ms},
        "monitor_ms": monitors,
        "kill_to_serving_ms": [round(t, 1) for t in ours],
        "warm": warm,
        "kill_to_serving_median_ms": statistics.median(ours),
        "kill_to_serving_p99_ms": p99(ours),
        "longest_stall_ms": stall,
        "lines": len(values),
        "lines_intact": intact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        r = run(args.kills, Path(tmp))
    if args.json:
        print(json.dumps(r))
        return
    table = Table(title=f"serial device restart, {r['kills']} SIGKILLs of a printing guest's")
    table.add_column("measure")
    table.add_column("median ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_row(
        "crash seen -> new process READY (monitor)",
        f"{r['monitor_median_ms']:.1f}",
        f"{r['monitor_p99_ms']:.1f}",
    )
    for kind, what in (("spare", "a warm spare took over"), ("cold", "a process started cold")):
        if r.get(f"{kind}_median_ms") is not None:
            table.add_row(
                f"  of which {r[f'{kind}_restarts']}: {what}",
                f"{r[f'{kind}_median_ms']:.1f}",
                f"{r[f'{kind}_p99_ms']:.1f}",
            )
    table.add_row(
        "kill() -> serving again (control socket)",
        f"{r['kill_to_serving_median_ms']:.1f}",
        f"{r['kill_to_serving_p99_ms']:.1f}",
    )
    table.add_row("longest stall of a guest access", f"{r['longest_stall_ms']:.1f}", "")
    Console().print(table)
    print(f"{r['lines']} count= lines, every one once and in order: {r['lines_intact']}")


if __name__ == "__main__":
    main()
