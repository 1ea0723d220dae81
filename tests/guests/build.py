"""Builds the test guests with make, for a pytest session fixture or by hand.

    python tests/guests/build.py          # into tests/guests/build/
    python -m tests.guests.build [DIR]    # the same, or into DIR

From a test::

    @pytest.fixture(scope="session")
    def guests(tmp_path_factory) -> dict[str, Path]:
        try:
            return build_guests(tmp_path_factory.mktemp("guests"))
        except GuestToolsMissing as e:
            pytest.skip(str(e))

The build runs the instruction check (check_insns.py) on every image, so a guest that would
use an instruction a PVM host cannot emulate never reaches a test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = GUESTS_DIR / "build"

# Guest name -> file the Makefile produces in the output directory.
OUTPUTS = {
    "hello": "hello.elf",
    "exit-status": "exit-status.elf",
    "smp": "smp.elf",
    "pio-loop": "pio-loop.elf",
    "counter": "counter.elf",
    "dirty": "dirty.elf",
    "mmio-sweep": "mmio-sweep.elf",
    "rtc": "rtc.elf",
    "pci": "pci.elf",
    "virtio-blk": "virtio-blk.elf",
    "virtio-rng": "virtio-rng.elf",
    "virtio-net": "virtio-net.elf",
    "virtio-console": "virtio-console.elf",
    "firmware-hello": "firmware-hello.bin",
    "firmware-idle": "firmware-idle.bin",
    "firmware-pio": "firmware-pio.bin",
    "firmware-serial": "firmware-serial.bin",
    "firmware-virtio-blk": "firmware-virtio-blk.bin",
    "firmware-virtio-rng": "firmware-virtio-rng.bin",
    "firmware-virtio-net": "firmware-virtio-net.bin",
    "firmware-virtio-console": "firmware-virtio-console.bin",
    "mbr-sum": "mbr-sum.bin",
    "mbr-sum-loop": "mbr-sum-loop.bin",
}
TOOLS = ("make", "gcc", "ld", "objcopy", "objdump", "nm")
BUILD_TIMEOUT_S = 120


class GuestBuildError(RuntimeError):
    """The guests did not build; the message holds the compiler's or the checker's output."""


class GuestToolsMissing(GuestBuildError):
    """A tool the build needs is not installed (a reason to skip, not to fail)."""


def build_guests(out_dir: Path) -> dict[str, Path]:
    """Builds every guest into out_dir (incrementally) and returns name -> built file."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise GuestToolsMissing(f"cannot build the test guests: {', '.join(missing)} not found")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "make",
        "-C",
        str(GUESTS_DIR),
        f"-j{os.cpu_count() or 1}",
        f"O={out_dir}",
        f"PYTHON={sys.executable}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(command)} failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    built = {name: out_dir / filename for name, filename in OUTPUTS.items()}
    absent = [str(path) for path in built.values() if not path.is_file()]
    if absent:
        raise GuestBuildError(f"make succeeded but did not produce {', '.join(absent)}")
    return built


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else DEFAULT_OUT_DIR
    try:
        built = build_guests(out_dir)
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
