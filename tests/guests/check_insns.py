"""Fails the build if a guest holds an instruction that a PVM host cannot run.

On a PVM host (see /work/shared/KVM-HERE.md) CPL0 code goes through KVM's instruction
emulator, which fails on int3, cmpxchg16b, popcnt, xrstor and SSE arithmetic, and shuts the
VM down on ud2; and no interrupt or exception reaches a guest, so a guest must never enable
interrupts or trap on purpose.  This script disassembles every executable section of an ELF
with objdump (and every range between symbols `X_codeN_start` and `X_codeN_end`, N = 16,
32 or 64, in that mode: real-mode code kept in data sections, a firmware stub's 32- and 64-bit
code) and lists each forbidden
instruction it finds.

usage: check_insns.py [--mode i8086] [--allow int] ELF...

--allow int lets real-mode code call its BIOS (a boot sector's `int 13h`): in real mode KVM's
emulator delivers `int n` through the interrupt vector table itself (emulate_int_real), which a
PVM host runs; what never reaches a guest is an IDT's, in protected or long mode.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# Mnemonics as objdump (AT&T syntax) prints them.
FORBIDDEN = {
    "int3": "emulation fails (KVM_EXIT_INTERNAL_ERROR)",
    "int": "software interrupts never reach the guest IDT here",
    "int1": "debug trap",
    "icebp": "debug trap",
    "into": "software interrupt",
    "ud0": "undefined instruction: shuts the VM down",
    "ud1": "undefined instruction: shuts the VM down",
    "ud2": "undefined instruction: shuts the VM down",
    "sti": "the guests never enable interrupts",
    "popcnt": "emulation fails",
    "lzcnt": "may not be emulated (and is bsr on older CPUs)",
    "tzcnt": "may not be emulated (and is bsf on older CPUs)",
    "cmpxchg16b": "emulation fails",
    "endbr64": "CET marker: may not be emulated; build with -fcf-protection=none",
    "endbr32": "CET marker: may not be emulated",
    "syscall": "no way back to CPL0 here",
    "sysenter": "no way back to CPL0 here",
    "ldmxcsr": "SSE state",
    "stmxcsr": "SSE state",
    "emms": "MMX",
    "(bad)": "undecodable bytes in a code section",
}
FORBIDDEN_PREFIXES = ("xsave", "xrstor", "fxsave", "fxrstor")
# SSE/AVX/MMX/AVX-512 registers as operands: any vector instruction at all.
VECTOR_REGISTER = re.compile(r"%(?:[xyz]mm\d+|mm\d|k[0-7])\b")
INSTRUCTION_PREFIXES = set(
    "lock rep repz repe repnz repne data16 data32 addr16 addr32 rex rex.w"
    " cs ds es ss fs gs notrack bnd xacquire xrelease".split()
)
LINE = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")


def objdump(args: list[str]) -> str:
    result = subprocess.run(
        ["objdump", "--no-show-raw-insn", "-w", *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"check_insns: objdump {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def mnemonic(instruction: str) -> str:
    """The instruction's mnemonic, past any prefixes."""
    for token in instruction.split():
        if token not in INSTRUCTION_PREFIXES:
            return token
    return ""


def why_forbidden(instruction: str, allowed: frozenset[str] = frozenset()) -> str | None:
    name = mnemonic(instruction)
    if name in allowed:
        return None
    if name in FORBIDDEN:
        return FORBIDDEN[name]
    if name.startswith(FORBIDDEN_PREFIXES):
        return "extended-state save/restore: emulation fails"
    if VECTOR_REGISTER.search(instruction):
        return "SSE/AVX/MMX: emulation fails, and the guests are general-register only"
    return None


def problems(listing: str, what: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    found, seen = [], 0
    for line in listing.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        seen += 1
        instruction = m.group(2).split("#")[0].strip()
        why = why_forbidden(instruction, allowed)
        if why:
            found.append(f"  {m.group(1)}: {instruction}    <- {why}")
    if seen == 0:
        found.append(f"  no instructions found in {what}: nothing was checked")
    return found


MODES = {"16": "i8086", "32": "i386", "64": "x86-64"}
CODE_RANGE = re.compile(r"^(.+)_code(16|32|64)_start$")


def code_ranges(elf: Path) -> list[tuple[str, str, int, int]]:
    """(name, bits, start, end) for each X_codeN_start / X_codeN_end symbol pair."""
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    ranges = []
    for name, start in symbols.items():
        m = CODE_RANGE.match(name)
        if m:
            stem, bits = m.groups()
            end = symbols.get(f"{stem}_code{bits}_end")
            if end is None:
                sys.exit(f"check_insns: {elf}: {name} has no {stem}_code{bits}_end")
            ranges.append((stem, bits, start, end))
    return ranges


def check(elf: Path, mode: str | None, allowed: frozenset[str] = frozenset()) -> list[str]:
    listing = objdump(["-d", *(["-M", mode] if mode else []), str(elf)])
    found = problems(listing, "code sections", allowed)
    for stem, bits, start, end in code_ranges(elf):
        listing = objdump(
            [
                "-D",
                "-M",
                MODES[bits],
                f"--start-address={start:#x}",
                f"--stop-address={end:#x}",
                str(elf),
            ]
        )
        what = f"{stem}_code{bits}"
        found += [f"{p} ({bits}-bit code {stem})" for p in problems(listing, what)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["i8086"], help="disassemble as 16-bit code")
    parser.add_argument(
        "--allow", choices=["int"], action="append", default=[],
        help="real-mode BIOS calls (with --mode i8086 only: see the module docstring)",
    )  # fmt: skip
    parser.add_argument("elf", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.allow and args.mode != "i8086":
        parser.error("--allow int is for real-mode code (--mode i8086)")
    failed = False
    for elf in args.elf:
        found = check(elf, args.mode, frozenset(args.allow))
        if found:
            failed = True
            print(f"{elf}: instructions a PVM guest must not use:", file=sys.stderr)
            print("\n".join(found), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
