"""virtio-console through `splitvmm up`: the monitor side (descriptor, fds, PCI placement,
sandboxed process, console selection). The guest used is the PCI walker
(tests/guests/pci.c), which lists every function by both configuration mechanisms; the
text round trip through the device's queues is the console guest's (issue 10)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import vm_toml
from tests.integration.vmproc import REPO, VmProcess, env_for, splitvmm

GREETING = b"virtio-console: hello from the console guest\n"
pytestmark = pytest.mark.kvm

LISTED = "00:01.0 1af4:1043 class 078000 header 00\n"  # the first free slot after the bridge


def console_table(output: str) -> str:
    return f'[[device]]\nname = "con0"\nmodel = "virtio-console"\noutput = "{output}"\n'


def pci_config(tmp_path: Path, guests, serial: Path | str, devices: str) -> Path:
    path = tmp_path / "vm.toml"
    path.write_text(vm_toml(f'kernel = "{guests["pci"]}"', "64M", 1, serial) + devices)
    return path


def test_virtio_console_listed_by_pci_guest_through_both_walks(guests, tmp_path):
    serial = tmp_path / "serial.log"
    cfg = pci_config(tmp_path, guests, serial, console_table(str(tmp_path / "hvc.log")))

    result = splitvmm(tmp_path, "up", str(cfg))

    text = serial.read_text(errors="replace")
    assert result.returncode == 0, text + result.stderr
    assert f"cf8: {LISTED}" in text and f"ecam: {LISTED}" in text
    assert "pci: 2 functions, both walks agree\n" in text
    assert (tmp_path / "hvc.log").exists()  # the monitor opened its output for it


def test_virtio_console_second_on_stdio_is_told_the_keyboard_is_the_first_ones(guests, tmp_path):
    cfg = pci_config(tmp_path, guests, "stdio", console_table("stdio"))
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "stdout.log", stdio=True)

    status, err = vm.finish()

    assert status == 0, vm.text() + err
    assert "device con0: its output is stdio too, but the keyboard goes to device serial0" in err


# -- the console guest (tests/guests/virtio_console.c, from the virtio spec): text both ways --
ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"


def pattern(n: int) -> bytes:
    """The console guest's pattern (tests/guests/README.md): 64-byte lines, which repeat
    every 64 lines."""
    period = bytes(
        0x0A if i % 64 == 63 else ALPHABET[(i // 64 + i % 64) % 64] for i in range(64 * 64)
    )
    return (period * (n // len(period) + 1))[:n]


def first_difference(x: bytes, y: bytes) -> int:
    """The index of the first byte where `x` and `y` differ (their common length if none)."""
    common, chunk, at = min(len(x), len(y)), 1 << 16, 0
    while at < common and x[at : at + chunk] == y[at : at + chunk]:
        at += chunk
    return next((i for i in range(at, min(at + chunk, common)) if x[i] != y[i]), common)


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def console_guest(tmp_path: Path, guests, cmdline: str, output: str) -> Path:
    path = tmp_path / "vm.toml"
    boot = f'kernel = "{guests["virtio-console"]}"\ncmdline = "{cmdline}"'
    path.write_text(vm_toml(boot, "64M", 1, tmp_path / "serial.log") + console_table(output))
    return path


def test_virtio_console_guest_pattern_reaches_the_output_file_byte_for_byte(guests, tmp_path):
    hvc = tmp_path / "hvc.log"
    cfg = console_guest(tmp_path, guests, "mode=pattern bytes=100000", str(hvc))

    result = splitvmm(tmp_path, "up", str(cfg))

    serial = (tmp_path / "serial.log").read_text(errors="replace")
    assert result.returncode == 33, serial + result.stderr
    out = hvc.read_bytes()
    greeting = b"virtio-console: hello from the console guest\n"
    assert out.startswith(greeting)
    body = out[len(greeting) :]
    want = pattern(100000)
    assert body[: len(want)] == want
    assert body[len(want) :].startswith(f"pattern: 100000 bytes fnv1a={fnv1a(want)}".encode())


def test_virtio_console_guest_echoes_lines_sent_through_a_unix_socket(guests, tmp_path):
    """Host -> guest through the receive queue, guest -> host through the transmit queue,
    over the `unix:` output (whose peer's writes are the console's input)."""
    path = tmp_path / "hvc.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    cfg = console_guest(tmp_path, guests, "mode=echo timeout_s=30", f"unix:{path}")
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "serial.log")
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(30)
        got = b""

        def until(marker: bytes) -> None:
            nonlocal got
            while marker not in got:
                chunk = conn.recv(4096)
                assert chunk, got
                got += chunk

        until(b"hello from the console guest\n")
        lines = [b"first line", b"x" * 200, b"", b"last"]
        for line in lines:
            conn.sendall(line + b"\n")
            until(b"echo: " + line + b"\n")
        conn.sendall(b"quit\n")
        until(b"bye\n")
        status, err = vm.finish()
    finally:
        listener.close()
    assert status == 33, vm.text() + err


def test_virtio_console_guest_sink_checks_200000_bytes_of_host_input(guests, tmp_path):
    path = tmp_path / "hvc.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    cfg = console_guest(tmp_path, guests, "mode=sink bytes=200000 rxbuf=4096", f"unix:{path}")
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "serial.log")
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.sendall(pattern(200000))
        status, err = vm.finish()
    finally:
        listener.close()
    assert status == 33, vm.text() + err
    assert f"sink: 200000 bytes fnv1a={fnv1a(pattern(200000))} bad=0" in vm.text()


def test_virtio_console_paste_through_stdin_larger_than_its_buffer_loses_no_line(guests, tmp_path):
    """The console on stdio, 24 KiB of lines piped into `splitvmm up` at once, six times the
    device's input buffer, and a guest that is slow to read them (it prints each line it
    gets on the 8250): the monitor sends input only as fast as the device has room, so
    every line is echoed, in order. Before, the device dropped what overflowed its buffer."""
    lines = [f"{i:04d} ".encode() + pattern(58)[i % 7 :][:50] for i in range(400)]
    paste = b"".join(line + b"\n" for line in lines) + b"quit\n"
    cfg = console_guest(tmp_path, guests, "mode=echo timeout_s=60", "stdio")
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "hvc.log", stdin=paste, stdio=True)
    status, err = vm.finish(timeout=240)
    echoed = [line for line in vm.text().encode().split(b"\n") if line.startswith(b"echo: ")]
    assert status == 33, (tmp_path / "serial.log").read_text()[-2000:] + err
    assert echoed == [b"echo: " + line for line in lines]


def test_virtio_console_on_stdio_that_is_a_socket_takes_the_keyboard_input(guests, tmp_path):
    """`up`'s stdout a socket (socat, inetd, systemd's StandardOutput=socket), stdin a pipe:
    the input is stdin's, through the monitor. The device took the socket for a `unix:`
    peer's, reported no room for the monitor's input, and the guest got none (status 11)."""
    cfg = console_guest(tmp_path, guests, "mode=echo timeout_s=30", "stdio")
    ours, theirs = socket.socketpair()
    vm = subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(cfg)],
        stdin=subprocess.PIPE,
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env_for(tmp_path),
    )
    theirs.close()
    got = b""
    try:
        assert vm.stdin is not None
        vm.stdin.write(b"hello one\nhello two\nquit\n")
        vm.stdin.flush()
        ours.settimeout(60)
        while b"bye\n" not in got:
            chunk = ours.recv(4096)
            if not chunk:
                break
            got += chunk
        _, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
        ours.close()
    assert vm.returncode == 33, got.decode(errors="replace") + err.decode(errors="replace")
    assert b"echo: hello one\necho: hello two\nbye\n" in got


def test_virtio_console_killed_while_writing_to_a_file_loses_and_repeats_no_byte(guests, tmp_path):
    """on_crash = restart, output to a regular file: each SIGKILL of the console process in
    the middle of a 64 MiB pattern; the file still holds every byte exactly once."""
    hvc = tmp_path / "hvc.log"
    cfg = console_guest(tmp_path, guests, "mode=pattern bytes=64M chunk=256", str(hvc))
    cfg.write_text(cfg.read_text() + 'on_crash = "restart"\nmax_restarts = 20\n')
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "serial.log")
    vm.wait_for("greeting sent")
    for generation in range(2, 7):
        result = vm.ctl("crash-device", "con0")
        assert result.returncode == 0, result.stderr
        vm.wait_running("con0", generation)
    status, err = vm.finish(timeout=120)
    assert status == 33, vm.text()[-2000:] + err
    want = pattern(64 << 20)
    line = f"pattern: {64 << 20} bytes fnv1a=".encode()  # the bytes are compared, not hashed
    greeting = b"virtio-console: hello from the console guest\n"
    out = hvc.read_bytes()
    assert out.startswith(greeting + want + line), (len(out), out.find(line))


def test_virtio_console_suspended_mid_pattern_restores_and_no_byte_is_lost_or_repeated(
    guests, tmp_path
):
    """ctl suspend while the guest writes a 16 MiB pattern, then a restore with its output
    to a second file: the first file and the second together are the whole stream, once."""
    first, second = tmp_path / "hvc1.log", tmp_path / "hvc2.log"
    cfg = console_guest(tmp_path, guests, "mode=pattern bytes=16M chunk=256", str(first))
    vm = VmProcess(tmp_path, ["up", str(cfg)], tmp_path / "serial.log")
    vm.wait_for("greeting sent")
    while first.stat().st_size < 1 << 20:  # well into the pattern
        time.sleep(0.01)
    result = vm.ctl("suspend", str(tmp_path / "snap"))
    assert result.returncode == 0, result.stderr
    vm.finish()
    restored = splitvmm(
        tmp_path, "restore", str(tmp_path / "snap"), "--set", f"con0.output={second}",
        "--set", f"serial0.output={tmp_path / 'serial2.log'}", timeout=120,
    )  # fmt: skip
    assert restored.returncode == 33, restored.stderr
    want = pattern(16 << 20)
    stream = first.read_bytes() + second.read_bytes()
    greeting = b"virtio-console: hello from the console guest\n"
    line = f"pattern: {16 << 20} bytes fnv1a=".encode()  # the bytes are compared, not hashed
    assert stream.startswith(greeting + want + line), len(stream)


def test_virtio_console_restart_with_the_monitors_log_in_its_stdout_file_loses_no_byte(
    guests, tmp_path
):
    """`splitvmm up vm.toml > vm.log 2>&1`, the console on stdio, one crash of it well into
    a 32 MiB pattern: the monitor logs the crash in the same file, its growth counted that
    line as the console's, and the restarted console dropped as many bytes of its own. A
    file someone else writes too is counted as a pipe is: a repeat may come, a gap may not.
    (An 8250 on stdio beside it is the same case: tests/unit/test_slot.py.)"""
    out = tmp_path / "vm.log"
    cfg = console_guest(tmp_path, guests, "mode=pattern bytes=32M chunk=256", "stdio")
    cfg.write_text(cfg.read_text() + 'on_crash = "restart"\n')
    with open(out, "ab") as log:
        vm = subprocess.Popen(
            [sys.executable, "-m", "splitvmm", "up", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO, env=env_for(tmp_path),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while out.stat().st_size < 1 << 20:
            assert time.monotonic() < deadline and vm.poll() is None, out.read_bytes()[-2000:]
            time.sleep(0.01)
        result = splitvmm(tmp_path, "ctl", "--vm", "test", "crash-device", "con0")
        assert result.returncode == 0, result.stderr
        status = vm.wait(timeout=240)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    data = out.read_bytes()
    assert status == 33, data[-2000:]
    logged = re.findall(rb"splitvmm: [^\n]*\n", data)  # one write each, wherever they fell
    assert any(b"device con0" in line for line in logged), data[-2000:]
    body = re.sub(rb"splitvmm: [^\n]*\n", b"", data)
    body = body[body.index(GREETING) + len(GREETING) :]
    body = body[: body.index(b"pattern: ")]
    want = pattern(32 << 20)
    # the first byte that differs from the pattern, and what follows it: want[b:] with b <= a
    a = first_difference(body, want)
    b = len(want) - (len(body) - a)
    assert b <= a and body[a:] == want[b:], f"diverges at {a}: goes on at {b} ({len(body)} bytes)"
