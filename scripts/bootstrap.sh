#!/usr/bin/env bash
# Installs what splitvmm needs on a fresh Debian 12 machine (as root, or with sudo):
# the Debian packages (compiler for the cffi bindings and the test guests, kernel
# headers for <linux/kvm.h>, libseccomp; qemu-utils for qemu-io, which the tests of the disk
# lock against QEMU's run; seabios, the firmware a test boots from a virtio-blk disk; mount's
# losetup and e2fsprogs' mkfs.ext4 for the tests' failing file system, tests/failing_disk.py),
# then a virtualenv in .venv with splitvmm.
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc make binutils libc6-dev linux-libc-dev libseccomp2 python3-venv python3-dev acpica-tools iproute2 qemu-utils seabios mount e2fsprogs)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The interpreter: Debian's own, /usr/bin/python3, unless PYTHON names another. Its build is
# the faster one for a program that starts several interpreters: the interpreter linked
# statically, not against a shared libpython, and built with the distribution's
# optimisations. Against a default source build (./configure --enable-shared, as pyenv makes
# one) it imports splitvmm's monitor and device models ~25% faster and starts `up` ~15% faster
# (the figures: bench/startup.py's docstring). Whatever PATH finds first as python3 may be
# such a build.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=/usr/bin/python3
    [ -x "$PYTHON" ] && "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        PYTHON=python3
fi
found="$(command -v "$PYTHON")" || { echo "bootstrap: no interpreter ${PYTHON@Q}" >&2; exit 1; }
PYTHON="$found"
which='import sys; print(sys.base_prefix, sys.version)'
base="$("$PYTHON" -c "$which")"
# A .venv made from another interpreter, another version of it, or one that is gone, is made
# again.
venv_base="$(.venv/bin/python -c "$which" 2>/dev/null || true)"
if [ -e .venv ] && [ "$venv_base" != "$base" ]; then
    echo "bootstrap: .venv was made from another Python; making it again from $PYTHON" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.splitvmm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ] || [ -n "$(find splitvmm/native -name "_build_*.py" -newer "$stamp")" ] || [ splitvmm/native/warden.c -nt "$stamp" ]; then
    echo "bootstrap: installing splitvmm into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    # "compat" puts the checkout on sys.path with a plain .pth line; the default editable
    # finder costs every interpreter ~11 ms at start-up (site imports it), and splitvmm starts
    # several (monitor, zygote; tests exec devices). setuptools calls the mode transitional:
    # where it is gone, the default mode works the same, only slower to start.
    .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null ||
        .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# Byte-code for the checkout, as pip writes it for an installed package: an editable install
# leaves it to the first import, and where PYTHONDONTWRITEBYTECODE is set (CI images, this
# project's sandboxes) there is none, so every `splitvmm` process compiled every module from
# source (~60-80 ms of the monitor's start-up). compileall only rewrites what changed.
.venv/bin/python -m compileall -q splitvmm
