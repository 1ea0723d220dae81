"""Snapshot save, pause, size and restore for 128 MiB, 512 MiB and 2 GiB guests.

Each guest runs the `dirty` test guest, which writes a non-zero pattern over
N MiB at CPL3 (native speed here), then spins. We snapshot it with `splitvmm
ctl snapshot` (save time = the ctl round trip; pause = how long the vCPUs were
stopped, from the monitor's reply), then restore it with `splitvmm up
--restore` and time until the control socket answers, which it does right
before the vCPU threads start. The floor, measured in the same run: writing
the same number of bytes to a file in the same directory and fsyncing it.

    python bench/snapshot.py [--sizes 128,512,2048] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.vmrun import write_config  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitvmm", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"VM ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {needle!r}")


def disk_floor(work: Path, size: int) -> float:
    """Seconds to write `size` bytes and fsync them, in 1 MiB pieces."""
    piece = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(work / "floor.bin", "wb") as f:
        for _ in range(size >> 20):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    (work / "floor.bin").unlink()
    return elapsed


def one(work: Path, guest: Path, mib: int, dirty_mib: int) -> dict[str, float]:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run")}
    serial, config, snap = work / f"serial-{mib}-{dirty_mib}.log", work / "vm.toml", work / "snap"
    boot = f'kernel = "{guest}"\ncmdline = "mib={dirty_mib}"'
    write_config(config, "bench-snap", boot, f"{mib}M", serial)
    vm = subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(config)],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(serial, f"dirty: {dirty_mib} MiB written", vm)
    t0 = time.perf_counter()
    reply = run(env, "ctl", "--vm", "bench-snap", "suspend", str(snap), "--json")
    save_s = time.perf_counter() - t0
    if reply.returncode != 0:
        vm.kill()
        raise SystemExit(f"suspend failed: {reply.stderr} (VM: {vm.communicate()[1]})")
    vm.wait(60)
    size = sum(p.stat().st_size for p in snap.iterdir())
    t0 = time.perf_counter()
    restored = subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(config), "--restore", str(snap)],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while run(env, "ctl", "--vm", "bench-snap", "status").returncode != 0:
        if restored.poll() is not None:
            raise SystemExit(f"restore failed: {restored.stderr.read() if restored.stderr else ''}")
        time.sleep(0.01)
    restore_s = time.perf_counter() - t0
    run(env, "ctl", "--vm", "bench-snap", "suspend", str(work / "again"))
    restored.wait(60)
    floor_s = disk_floor(work, size)
    shutil.rmtree(snap)
    shutil.rmtree(work / "again", ignore_errors=True)
    return {
        "save_s": save_s,
        "pause_ms": json.loads(reply.stdout)["pause_ms"],
        "size_mib": size / (1 << 20),
        "restore_s": restore_s,
        "floor_write_fsync_s": floor_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,512,2048", help="guest RAM sizes in MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        guest = build_guests(work / "guests")["dirty"]
        for mib in (int(s) for s in args.sizes.split(",")):
            for dirty in (0, mib // 2):
                rows.append({"memory_mib": mib, "dirty_mib": dirty, **one(work, guest, mib, dirty)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="snapshot (suspend) and restore; floor = write+fsync of the same bytes")
    for col in ("RAM MiB", "dirty MiB", "save s", "pause ms", "size MiB", "restore s", "floor s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["memory_mib"]),
            str(r["dirty_mib"]),
            f"{r['save_s']:.2f}",
            f"{r['pause_ms']:.0f}",
            f"{r['size_mib']:.1f}",
            f"{r['restore_s']:.2f}",
            f"{r['floor_write_fsync_s']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
