"""`splitvmm up` as a process the operator runs: stop signals that arrive while it is stopped
(SIGSTOP/SIGTSTP, then SIGCONT), the console's raw mode after `fg`, a second stop signal
inside the first one's handler, and resources it cannot get (no room in the runtime dir, guest
RAM that cannot be mapped) named in one line."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm.sandbox.launcher_start import STOP_SIGNALS
from tests.integration.conftest import vm_toml
from tests.integration.vmproc import REPO, env_for
from tests.jobshell import SHELL_START, ending, pump_pty

pytestmark = pytest.mark.kvm


def _up(
    tmp_path: Path,
    kernel: Path,
    cmdline: str,
    serial: str | Path,
    memory: str = "64M",
    **popen: object,
) -> subprocess.Popen[bytes]:
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{kernel}"\ncmdline = "{cmdline}"', memory, 1, serial))
    return subprocess.Popen(
        [sys.executable, "-m", "splitvmm", "up", str(config)],
        cwd=REPO,
        env=popen.pop("env", None) or env_for(tmp_path),
        **popen,  # type: ignore[call-overload]
    )


def _default_stop_signals() -> None:
    """In the child before `up` execs: the stop signals at their defaults, as a shell leaves
    them (pytest's may be ignored or handled), so that `up` installs its own handlers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _raw(fd: int) -> bool:
    return not termios.tcgetattr(fd)[3] & termios.ICANON


# -- 1. SIGCONT: the console's raw mode is put back ---------------------------------------------
def _counter_on_a_pty(
    tmp_path: Path, guests
) -> tuple[subprocess.Popen[bytes], int, int, list[object]]:
    """The counter guest under `up`, its console on a new pty (master, terminal) that is its
    session's controlling terminal, its stop signals at their defaults as a shell leaves them;
    and the terminal's modes before `up` (cooked)."""
    master, terminal = os.openpty()
    cooked = termios.tcgetattr(terminal)

    def session() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        _default_stop_signals()

    proc = _up(
        tmp_path, guests["counter"], "", "stdio",
        stdin=terminal, stdout=terminal, stderr=terminal, preexec_fn=session,
    )  # fmt: skip
    return proc, master, terminal, cooked


def _read_for(master: int, out: bytearray, seconds: float) -> None:
    """What the pty's master has for `seconds`, into `out` (so that `up` never waits on a full
    pty)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):
                out.extend(os.read(master, 65536))


def _until_counting(proc: subprocess.Popen[bytes], master: int, out: bytearray) -> None:
    deadline = time.monotonic() + 30
    while b"count=" not in out:
        assert proc.poll() is None and time.monotonic() < deadline, bytes(out[-300:])
        _read_for(master, out, 0.1)


def test_console_terminal_is_raw_again_after_the_monitor_is_stopped_and_continued(tmp_path, guests):
    """A shell restores its own (cooked) terminal modes when its foreground job stops
    (`kill -STOP`, `kill -TSTP`), and does not put the job's back on `fg`: a program that
    keeps the terminal raw sets it again on SIGCONT (QEMU's char-stdio does). Without that,
    the console after `fg` is line-buffered and echoed, Ctrl-A x needs Enter, and Ctrl-C,
    meant for the guest, stops the VM."""
    proc, master, terminal, cooked = _counter_on_a_pty(tmp_path, guests)
    out = bytearray()
    try:
        _until_counting(proc, master, out)
        assert _raw(terminal)
        proc.send_signal(signal.SIGSTOP)
        _read_for(master, out, 0.3)
        termios.tcsetattr(terminal, termios.TCSANOW, cooked)  # what the shell does
        proc.send_signal(signal.SIGCONT)  # `fg`
        _read_for(master, out, 1.0)
        raw_after = _raw(terminal)
    finally:
        proc.send_signal(signal.SIGTERM)
        _read_for(master, out, 1.0)
        proc.wait(60)
        os.close(master)
        os.close(terminal)
    assert proc.returncode == 128 + signal.SIGTERM
    assert raw_after, "the console's terminal stayed cooked after SIGCONT"


def test_sigquit_stops_the_vm_and_gives_the_terminal_back_cooked(tmp_path, guests):
    """`kill -QUIT`: the VM stops as on SIGTERM (131), and the console's terminal gets its
    modes back. SIGQUIT's default ended the monitor where it was, the terminal left raw (no
    echo, no line editing) until the operator typed `reset` blind, as QEMU leaves it."""
    proc, master, terminal, cooked = _counter_on_a_pty(tmp_path, guests)
    out = bytearray()
    try:
        _until_counting(proc, master, out)
        assert _raw(terminal)
        proc.send_signal(signal.SIGQUIT)
        while proc.poll() is None:  # its last lines
            _read_for(master, out, 0.1)
        proc.wait(60)
        modes = termios.tcgetattr(terminal)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(terminal)
    assert proc.returncode == 128 + signal.SIGQUIT, bytes(out[-500:])
    assert modes == cooked
    assert b"stopped by SIGQUIT" in out


# -- 2. a runtime dir that is full: one line naming the socket, no traceback -------------------
@contextlib.contextmanager
def _tmpfs(where: Path, inodes: int) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size=1m,nr_inodes={inodes},mode=700", "tmpfs", str(where)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# The tmpfs's inodes: its root, splitvmm/, splitvmm/test/, lock, then control.sock (the
# monitor's, made before any device starts), then serial0.sock and rtc.sock (the launcher
# binds each device's channel).
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
@pytest.mark.parametrize(
    ("inodes", "socket"), [(5, "serial0.sock"), (4, "control.sock")], ids=["channel", "control"]
)
def test_up_whose_runtime_dir_has_no_room_for_a_socket_names_it_in_one_line(
    tmp_path, guests, inodes, socket
):
    with _tmpfs(tmp_path / "xdg", inodes) as xdg:
        env = {**env_for(tmp_path), "XDG_RUNTIME_DIR": str(xdg)}
        proc = _up(
            tmp_path,
            guests["hello"],
            "greeting=hi",
            tmp_path / "serial.log",
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = proc.communicate(timeout=60)
        text = err.decode()
        left = sorted(p.name for p in xdg.rglob("*"))
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    assert text.startswith("splitvmm: error: ") and text.count("\n") == 1, text
    assert f"{xdg}/splitvmm/test/{socket}" in text and "No space left on device" in text, text
    assert left == ["splitvmm"]  # the runtime dir went with the VM


# -- 3. guest RAM that cannot be mapped (ulimit -v): one line, no traceback --------------------
def test_up_whose_guest_ram_cannot_be_mapped_says_so_in_one_line(tmp_path, guests):
    def small_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # `ulimit -v 1048576`

    proc = _up(
        tmp_path,
        guests["hello"],
        "greeting=hi",
        tmp_path / "serial.log",
        memory="2G",
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=small_address_space,
    )
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    assert text.startswith("splitvmm: error: ") and text.count("\n") == 1, text
    assert "guest RAM" in text and "Cannot allocate memory" in text, text


# -- 4. a stop signal whose handler runs inside stop() on the main thread ----------------------
RACE = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    from splitvmm.config import load_config
    from splitvmm.monitor.machine import Machine

    machine = Machine(load_config(Path(sys.argv[1])))
    machine._install_stop_handlers()


    class SecondSignalInside:
        '''The lock of stop(): a second stop signal lands while the first one's handler
        holds it (`timeout`'s signal to its process group after its own to `up`; a shell
        and the kernel both sending SIGHUP as the terminal goes).'''

        def __init__(self, lock):
            self.lock, self.fired = lock, False

        def __enter__(self):
            self.lock.acquire()
            if not self.fired:
                self.fired = True
                signal.raise_signal(signal.SIGTERM)

        def __exit__(self, *exc):
            self.lock.release()


    machine._outcome_lock = SecondSignalInside(machine._outcome_lock)
    signal.raise_signal(signal.SIGTERM)
    print(machine._outcome.status, machine._outcome.message, machine._stop_signals)
    """
)


def test_a_second_stop_signal_during_the_first_ones_handler_does_not_hang_the_monitor(
    tmp_path, guests
):
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{guests["hello"]}"', serial_out=tmp_path / "s.log"))
    try:
        run = subprocess.run(
            [sys.executable, "-c", RACE, str(config)],
            cwd=REPO,
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the monitor's main thread deadlocked on its own outcome lock")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["143", "stopped", "by", "SIGTERM", "2"], run.stdout


# -- 4b. SIGINT once the launcher is forked, before `up` runs: its zygote imports meanwhile -----
INTERRUPTED_IN_CLICK = textwrap.dedent(
    """
    import signal, sys
    from splitvmm.cli import main, root

    get_command = root.LazyGroup.get_command


    def interrupted(self, ctx, name):
        # Ctrl-C as click loads the subcommand: main() forked the launcher (cli/early.py),
        # whose zygote imports the device runtime meanwhile (~100 ms)
        signal.raise_signal(signal.SIGINT)
        return get_command(self, ctx, name)


    root.LazyGroup.get_command = interrupted
    sys.argv = ["splitvmm", "up", sys.argv[1]]
    main()
    """
)


def test_up_interrupted_after_its_launcher_forked_is_a_stop_by_sigint_not_click_abort(tmp_path):
    """Between the early launcher's fork and run_and_exit (click's imports and parsing, ~40 ms
    of the zygote's ~100 ms of imports), SIGINT was click's "Aborted!" (status 1: could not
    start) or, in the imports, a KeyboardInterrupt traceback; anywhere else before the VM's
    own handlers it is a stop by SIGINT (130: tests/unit/test_stop_signals.py)."""
    run = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IN_CLICK, str(tmp_path / "vm.toml")],
        cwd=REPO,
        env=env_for(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode, run.stderr) == (130, "splitvmm: stopped by SIGINT\n")


# -- 5. a stop signal the kernel hands to another thread than the main one ---------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stopped_vm_sent_a_stop_signal_then_sigcont_ends_with_its_status(tmp_path, guests, sig):
    """What a shell does to a stopped job: `kill %1` sends SIGTERM, then SIGCONT; the shell's
    exit (a closed terminal) and the kernel (an orphaned process group) send SIGHUP, then
    SIGCONT. The signal waits while every thread is stopped, and the first thread to run
    again takes it: a vCPU's, as often as not. Its handler runs on the main thread only, which
    waited in select() for the VM's end: the signal was lost and the VM ran on. Three rounds:
    one passed by luck about one time in five."""
    for round_ in range(3):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        serial = work / "serial.log"

        proc = _up(
            work,
            guests["counter"],
            "",
            serial,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_default_stop_signals,
        )
        try:
            deadline = time.monotonic() + 30
            while not (serial.exists() and b"count=" in serial.read_bytes()):
                assert proc.poll() is None and time.monotonic() < deadline, "no count= line"
                time.sleep(0.05)
            proc.send_signal(signal.SIGSTOP)  # Ctrl-Z (a console on a file: the keys are ours)
            time.sleep(0.2)
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
            try:
                _, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"round {round_}: the VM ran on 15 s after {sig.name} and SIGCONT")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 128 + sig, err.decode()
        assert f"stopped by {sig.name}" in err.decode()


# A job-control shell in a few lines, as bash does it: session leader of the terminal, runs
# `up` (its arguments after REPORT) as a job in its own process group in the foreground,
# reports the job's pid, and when the job stops takes the terminal back. job_ends() reports
# how the job ends, once the test has let it go on.
UP_STOPPED_IN_A_SHELL = SHELL_START + textwrap.dedent(
    """
    def job_ends(seconds, stops):
        # "exited N", "still running" past `seconds` (killed), or with `stops` "stopped again
        # by SIG" (killed)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG | (os.WUNTRACED if stops else 0))
            if done and os.WIFSTOPPED(status):
                os.write(report, f"stopped again by {signal.Signals(os.WSTOPSIG(status)).name}\\n".encode())
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
                os.waitpid(pid, 0)
                return
            if done:
                os.write(report, f"exited {os.waitstatus_to_exitcode(status)}\\n".encode())
                return
            time.sleep(0.05)
        os.write(report, b"still running\\n")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    argv = sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        for s in (*JOB_SIGNALS, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, *argv])
    os.setpgid(pid, pid)
    os.tcsetpgrp(0, pid)
    os.write(report, f"pid {pid}\\n".encode())
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    os.tcsetpgrp(0, os.getpgrp())
    """
)
# The same shell then puts its own (cooked) modes back; then `kill %1` (SIGTERM, SIGCONT to
# the job's process group) and it reports what became of the job on fd REPORT.
JOB_SHELL = UP_STOPPED_IN_A_SHELL + textwrap.dedent(
    """
    termios.tcsetattr(0, termios.TCSADRAIN, cooked)
    os.write(report, b"stopped\\n")
    os.killpg(pid, signal.SIGTERM)  # kill %1
    os.killpg(pid, signal.SIGCONT)
    job_ends(20, stops=True)
    os.write(report, f"raw {not termios.tcgetattr(0)[3] & termios.ICANON}\\n".encode())
    """
)


def _shell_running_up(
    tmp_path: Path, guests: dict[str, Path], shell: str, terminal: int
) -> tuple[subprocess.Popen[bytes], int]:
    """`shell` on `terminal`, running `up` with a counter guest whose console is stdio, the
    terminal: the shell's process, and the read end of the pipe it reports on."""
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{guests["counter"]}"', "64M", 1, "stdio"))
    report_r, report_w = os.pipe()
    shell = subprocess.Popen(
        [sys.executable, "-c", shell, str(report_w), "-m", "splitvmm", "up", str(config)],
        cwd=REPO,
        env=env_for(tmp_path),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        pass_fds=(report_w,),
    )
    os.close(report_w)
    return shell, report_r


def _job_pid(report: bytearray) -> int:
    """The job's pid, as the shell reported it ("pid N")."""
    return int(report.split(b"pid ")[1].split(b"\n")[0])


def test_stopped_up_on_a_terminal_killed_by_its_shell_ends_with_sigterms_status(tmp_path, guests):
    """`up` with its console on the operator's terminal, run as a job of a job-control shell: stopped (`kill -STOP`, `kill -TSTP`), then `kill %1`, which sends SIGTERM and SIGCONT to the stopped job while the shell holds the terminal. The VM must end with 143, as it does with its console on a file (test_up_lifecycle.py: test_a_stopped_vm_sent_a_stop_signal_then_sigcont_...). It stayed stopped: its SIGCONT handler (and its terminal restore at the end) set the terminal's modes from the background, and SIGTTOU stopped it again."""
    master, terminal = os.openpty()
    shell, report_r = _shell_running_up(tmp_path, guests, JOB_SHELL, terminal)
    out, report = bytearray(), bytearray()
    with ending(shell, master, terminal, report_r):
        pump_pty(master, report_r, out, report, b"count=", 30)
        assert b"count=" in out, bytes(out[-300:])
        pid = _job_pid(report)
        os.kill(pid, signal.SIGSTOP)
        pump_pty(master, report_r, out, report, b"raw ", 40)
    lines = report.decode().splitlines()
    assert "stopped" in lines, lines
    assert "exited 143" in lines, lines  # not "stopped again by SIGTTOU"
    assert "raw False" in lines, lines  # the shell's modes stay


# The same shell, for `bg` and then `fg`: the stopped job is continued in the background; a key
# typed at the shell's prompt (its own non-canonical mode, as readline's) stops it again
# (SIGTTIN: the VM reads its terminal), and the shell reads the key, as it would; then `fg`
# (the terminal to the job, SIGCONT), and a `kill` from elsewhere ends the VM.
BG_FG_SHELL = UP_STOPPED_IN_A_SHELL + textwrap.dedent(
    """
    prompt = termios.tcgetattr(0)
    prompt[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(0, termios.TCSADRAIN, prompt)
    os.killpg(pid, signal.SIGCONT)  # bg
    os.write(report, b"bg\\n")
    _, status = os.waitpid(pid, os.WUNTRACED)
    os.write(report, f"stopped by {signal.Signals(os.WSTOPSIG(status)).name}\\n".encode())
    os.write(report, f"shell read {os.read(0, 1)!r}\\n".encode())
    termios.tcsetattr(0, termios.TCSADRAIN, cooked)
    os.tcsetpgrp(0, pid)  # fg
    os.killpg(pid, signal.SIGCONT)
    os.write(report, b"fg\\n")
    job_ends(30, stops=False)
    os.tcsetpgrp(0, os.getpgrp())
    os.write(report, f"modes back {termios.tcgetattr(0) == cooked}\\n".encode())
    """
)


def test_up_put_in_the_background_then_foreground_still_ends_on_sigterm(tmp_path, guests):
    """`bg` then `fg` of `up` with its console on the operator's terminal. In the background
    the VM reads its terminal and the first key typed at the shell stops it (SIGTTIN, as any
    program reading its terminal, QEMU included); the shell reads that key. After `fg` the VM
    waited in read(2) for the next key: SIGTERM, a guest's power-off or `ctl suspend` did not
    end it until a key was typed (a line, where the console stayed cooked: the SIGCONT that
    sets raw mode again is handled on the main thread, which waited in that read)."""
    master, terminal = os.openpty()
    shell, report_r = _shell_running_up(tmp_path, guests, BG_FG_SHELL, terminal)
    out, report = bytearray(), bytearray()
    with ending(shell, master, terminal, report_r):
        pump_pty(master, report_r, out, report, b"count=", 30)
        assert b"count=" in out, bytes(out[-300:])
        pid = _job_pid(report)
        os.kill(pid, signal.SIGTSTP)  # `kill -TSTP` (Ctrl-Z is the guest's key in raw mode)
        pump_pty(master, report_r, out, report, b"bg\n", 30)
        os.write(master, b"l")  # typed at the shell's prompt
        pump_pty(master, report_r, out, report, b"fg\n", 30)
        os.kill(pid, signal.SIGTERM)
        pump_pty(master, report_r, out, report, b"modes back", 60)
    lines = report.decode().splitlines()
    assert "stopped by SIGTTIN" in lines and "shell read b'l'" in lines, lines
    assert "exited 143" in lines, lines  # not "still running"
    assert "modes back True" in lines, lines


# `(splitvmm up vm.toml <&0 &)`, or a script that starts `up` in the background with its
# console on the terminal and exits: `up` runs in a background process group whose parent has
# gone (orphaned, POSIX 3.266), where the kernel answers EIO to its tcsetattr() and read() of
# the terminal instead of stopping it with SIGTTOU or SIGTTIN. The shell lives on.
ORPHANED_SHELL = SHELL_START + textwrap.dedent(
    """
    argv = sys.argv[2:]
    gone_r, gone_w = os.pipe()
    sub = os.fork()
    if sub == 0:
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            os.close(gone_w)
            os.read(gone_r, 1)  # EOF once the subshell has exited: the job is orphaned
            for s in (*JOB_SIGNALS, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, *argv])
        os.write(report, f"pid {pid}\\n".encode())
        os._exit(0)
    os.close(gone_r)
    os.close(gone_w)
    os.waitpid(sub, 0)
    time.sleep(120)
    """
)


def test_up_in_an_orphaned_background_job_runs_without_the_terminals_input(tmp_path, guests):
    """An orphaned background job may neither set its terminal's modes nor read it (EIO):
    `up` ended at once with a traceback (termios.error from raw mode), its guest killed. It
    must run as with input at its end: the guest's output on the terminal, the shell's modes
    untouched, until it is stopped."""
    master, terminal = os.openpty()
    modes = termios.tcgetattr(terminal)
    shell, report_r = _shell_running_up(tmp_path, guests, ORPHANED_SHELL, terminal)
    out, report = bytearray(), bytearray()
    with ending(shell, master, terminal, report_r):
        pump_pty(master, report_r, out, report, b"pid ", 30)
        pid = _job_pid(report)
        pump_pty(master, report_r, out, report, b"count=", 30)
        with contextlib.suppress(ProcessLookupError):  # (not our child: init reaps it)
            os.kill(pid, signal.SIGTERM)
        pump_pty(master, report_r, out, report, b"stopped by SIGTERM", 60)
        modes_after = termios.tcgetattr(terminal)
    assert b"Traceback" not in out, bytes(out[-1500:])
    assert b"count=" in out and b"stopped by SIGTERM" in out, bytes(out[-300:])
    assert modes_after == modes
