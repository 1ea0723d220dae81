"""The console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, other bytes pass; the
terminal's mode comes back at exit."""

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from splitvmm.monitor import console
from splitvmm.monitor.console import OFFER_MAX, EscapeParser, pump, raw_terminal
from tests.jobshell import SHELL_START, ending, pump_pty


def test_escape_plain_bytes_pass_through():
    assert EscapeParser().feed(b"ls\r") == (b"ls\r", False)


def test_escape_ctrl_a_x_quits_after_delivering_preceding_bytes():
    assert EscapeParser().feed(b"ab\x01x") == (b"ab", True)


def test_escape_double_ctrl_a_sends_one_ctrl_a():
    assert EscapeParser().feed(b"\x01\x01z") == (b"\x01z", False)


def test_escape_split_across_reads_still_quits():
    parser = EscapeParser()
    parser.feed(b"\x01")
    assert parser.feed(b"x") == (b"", True)


def test_raw_terminal_restores_the_saved_mode_on_exit():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with raw_terminal(slave) as is_tty:
            assert termios.tcgetattr(slave) != before
        assert is_tty and termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_that_hung_up_exits_without_error():
    master, slave = pty.openpty()
    try:
        with raw_terminal(slave):
            os.close(master)  # the window closes or ssh drops under the VM: EIO from now on
    finally:
        os.close(slave)


def test_pump_whose_input_fails_stops_reading_it_and_serves_on(caplog):
    """GNU nohup reopens stdin as /dev/null write-only: it polls readable and read() fails
    (EBADF). That ended `up` with a traceback; it is the end of input, as EOF is."""
    stdin = os.open(os.devnull, os.O_WRONLY)
    wake_r, wake_w = os.pipe()
    delivered: list[bytes] = []

    def deliver(data: bytes) -> int:
        delivered.append(data)
        return len(data)

    # The VM ends a moment later: an alarm's handler wakes the pump (on this thread: select
    # is retried after the handler runs, PEP 475), once it has read its failing input.
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: os.write(wake_w, b"x"))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        assert pump(stdin, wake_r, deliver, escape=False) is False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        for fd in (stdin, wake_r, wake_w):
            os.close(fd)
    assert delivered == [] and "the console's input failed (Bad file descriptor)" in caplog.text


def test_raw_terminal_drops_input_left_unread_at_exit():
    """Keys typed at the end, or a terminal's answer to a query the guest wrote, must not
    reach the shell as commands once the VM is gone (TCSAFLUSH)."""
    master, slave = pty.openpty()
    try:
        with raw_terminal(slave):
            os.write(master, b"rm -rf ~\r")  # unread by the time the VM ends
            assert select.select([slave], [], [], 5)[0]  # the pty has passed it on
        assert not select.select([slave], [], [], 0.2)[0]
    finally:
        os.close(master)
        os.close(slave)


class Device:
    """A console device that takes at most `room` bytes an offer, and nothing at every
    other offer (the room it said is used up until the guest reads); it wakes the pump
    once it has `expect` bytes."""

    def __init__(self, room: int, expect: int, wake_w: int) -> None:
        self.room, self.expect, self.wake_w = room, expect, wake_w
        self.got = bytearray()
        self.offers = 0

    def __call__(self, data: bytes) -> int:
        self.offers += 1
        taken = 0 if self.offers % 2 == 0 else min(self.room, len(data))
        self.got += data[:taken]
        if len(self.got) >= self.expect:
            os.write(self.wake_w, b"x")
        return taken


def input_pipe(data: bytes) -> tuple[int, int, int]:
    """A pipe of 1 MiB holding `data`: (its read end, its write end, what was written)."""
    stdin, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 1 << 20)
    return stdin, writer, os.write(writer, data)


def run_pump(data: bytes, device: Device, wake_r: int) -> bool:
    """pump() over a pipe holding `data`, then EOF; True if it quit."""
    stdin, writer, _ = input_pipe(data)
    os.close(writer)
    try:
        return pump(stdin, wake_r, device, escape=False)
    finally:
        os.close(stdin)


def delivered(paste: bytes, room: int) -> bytes:
    """What a device with `room` bytes at every other offer got of `paste`, piped to pump()."""
    wake_r, wake_w = os.pipe()
    device = Device(room=room, expect=len(paste), wake_w=wake_w)
    try:
        assert run_pump(paste, device, wake_r) is False
    finally:
        os.close(wake_r)
        os.close(wake_w)
    return bytes(device.got)


def test_pump_offers_what_the_device_did_not_take_again_until_it_took_it_all():
    """A paste many times the device's room: nothing dropped, nothing twice, in order."""
    paste = bytes(i % 253 for i in range(300_000))
    assert delivered(paste, room=8000) == paste


@pytest.fixture
def small_pending(monkeypatch) -> int:
    """PENDING_MAX at 64 KiB, so that a pipe holds more than it."""
    monkeypatch.setattr(console, "PENDING_MAX", 64 * 1024)
    return console.PENDING_MAX


def test_pump_reads_no_further_than_pending_max_while_the_device_takes_nothing(small_pending):
    """Input from a pipe waits in the pipe: back-pressure, not a growing buffer."""
    PENDING_MAX = small_pending
    stdin, writer, written = input_pipe(b"z" * (4 * PENDING_MAX))
    wake_r, wake_w = os.pipe()
    offers: list[int] = []

    def deliver(data: bytes) -> int:
        offers.append(len(data))
        if sum(n >= PENDING_MAX for n in offers) == 5:  # retried while full: end the VM
            os.write(wake_w, b"x")
        return 0

    try:
        assert pump(stdin, wake_r, deliver, escape=False) is False
        left = int.from_bytes(fcntl.ioctl(stdin, termios.FIONREAD, bytes(4)), "little")
    finally:
        for fd in (stdin, writer, wake_r, wake_w):
            os.close(fd)
    assert written - left == PENDING_MAX  # read up to it and no further: none dropped
    assert max(offers) == min(PENDING_MAX, OFFER_MAX)


def test_pump_loses_nothing_of_a_pipe_past_pending_max_to_a_device_that_takes_a_little(
    small_pending,
):
    """A pipe holding more than PENDING_MAX, a guest that reads a little at a time: every
    byte reaches the device once, in order. Reads of READ_SIZE past PENDING_MAX dropped the
    excess, and each later offer that freed less than READ_SIZE dropped more."""
    paste = bytes((i * 7 + i // 251) % 256 for i in range(4 * small_pending))
    assert delivered(paste, room=1000) == paste


def test_pump_for_a_terminal_always_reads_so_the_escape_quits_a_guest_that_reads_none(
    small_pending, caplog
):
    """A terminal's input is read past PENDING_MAX (and the excess dropped, said so), so
    Ctrl-A x quits even behind a paste the guest never reads."""
    PENDING_MAX = small_pending
    stdin, writer, _ = input_pipe(b"p" * (3 * PENDING_MAX) + b"\x01x")
    wake_r, wake_w = os.pipe()
    offers: list[int] = []

    def deliver(data: bytes) -> int:
        offers.append(len(data))
        return 0

    try:
        quit_ = pump(stdin, wake_r, deliver, escape=True)
    finally:
        for fd in (stdin, writer, wake_r, wake_w):
            os.close(fd)
    assert quit_ is True and max(offers) == min(PENDING_MAX, OFFER_MAX)
    assert "the guest is not reading its console: input dropped" in caplog.text


def test_pump_for_a_device_that_takes_no_more_input_still_sees_the_escape(small_pending):
    """A device failed for good (deliver says None): the input is read and dropped, and
    Ctrl-A x behind more than PENDING_MAX bytes of it still quits."""
    PENDING_MAX = small_pending
    stdin, writer, _ = input_pipe(b"q" * (2 * PENDING_MAX) + b"\x01x")
    wake_r, wake_w = os.pipe()
    offers: list[bytes] = []
    try:
        quit_ = pump(stdin, wake_r, lambda data: offers.append(data), escape=True)
    finally:
        for fd in (stdin, writer, wake_r, wake_w):
            os.close(fd)
    assert quit_ is True and len(offers) == 1


def test_raw_terminal_keeps_input_typed_before_it_for_the_guest():
    """raw_terminal at the start of a VM: what the operator typed while `up` started (the terminal still cooked) is the guest's, as QEMU's stdio keeps it (TCSANOW); only what is left unread at the end is dropped (test_console.py)."""
    master, slave = pty.openpty()
    try:
        os.write(master, b"root\n")  # typed ahead while the VM starts: a whole line, cooked
        assert select.select([slave], [], [], 5)[0]  # the line discipline holds it
        with raw_terminal(slave):
            assert select.select([slave], [], [], 1)[0], "typed-ahead input was flushed"
            assert os.read(slave, 100) == b"root\n"
    finally:
        os.close(master)
        os.close(slave)


# A job-control shell in miniature (as test_up_lifecycle.py's JOB_SHELL): the job holds the
# console in raw_terminal() with the VM not stopping; it is stopped, the shell takes the
# terminal back and puts its modes on it, then the job gets SIGCONT while the shell keeps the
# terminal: `bg`, or `kill %1` whose SIGCONT's Python handler ran before its SIGTERM's had
# (the kernel hands the two to different threads of a stopped process, and the SIGTERM's C
# handler may not have run when the main thread runs the SIGCONT's).
REPO = Path(__file__).resolve().parents[2]

CONTINUED_SHELL = SHELL_START + textwrap.dedent(
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        for s in JOB_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        os.close(ready_r)
        os.close(go_w)
        from splitvmm.monitor.console import raw_terminal
        with raw_terminal(0, lambda: False):  # the VM is not stopping
            os.write(ready_w, b"x")
            select_ = __import__("select").select
            select_([go_r], [], [])  # pump()'s wait: the SIGCONT handler runs in it
        os._exit(0)
    os.setpgid(pid, pid)
    os.tcsetpgrp(0, pid)
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    os.kill(pid, signal.SIGSTOP)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    os.tcsetpgrp(0, os.getpgrp())  # the shell takes its terminal back
    termios.tcsetattr(0, termios.TCSADRAIN, cooked)  # and puts its own modes on it
    os.killpg(pid, signal.SIGCONT)
    deadline = time.monotonic() + 2
    state = "running"
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done and os.WIFSTOPPED(status):
            state = f"stopped again by {signal.Signals(os.WSTOPSIG(status)).name}"
            break
        time.sleep(0.02)
    os.write(report, f"{state}\\n".encode())
    os.write(report, f"raw {not termios.tcgetattr(0)[3] & termios.ICANON}\\n".encode())
    os.kill(pid, signal.SIGKILL)
    os.kill(pid, signal.SIGCONT)
    os.waitpid(pid, 0)
    """
)


def test_raw_terminal_continued_in_the_background_leaves_the_shells_terminal_alone():
    """SIGCONT while the shell holds the terminal and the VM is not stopping: raw mode must
    not be set from the background. tcsetattr() there stops the job again (SIGTTOU): the
    `kill %1` of test_up_lifecycle.py's test_stopped_up_on_a_terminal_killed_by_its_shell_...
    leaves the VM stopped whenever its SIGCONT is handled first (seen 2 times in 140 runs)."""
    master, terminal = pty.openpty()
    report_r, report_w = os.pipe()
    shell = subprocess.Popen(
        [sys.executable, "-c", CONTINUED_SHELL, str(report_w)],
        cwd=REPO,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        pass_fds=(report_w,),
    )
    os.close(report_w)
    report = bytearray()
    with ending(shell, master, terminal, report_r):
        pump_pty(master, report_r, bytearray(), report, b"raw ", 30)
        shell.wait(10)
    lines = report.decode().splitlines()
    assert "running" in lines, lines  # not "stopped again by SIGTTOU"
    assert "raw False" in lines, lines  # the shell's modes stay
