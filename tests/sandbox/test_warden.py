"""The device warden (splitvmm/native/warden.c) under its own filter (warden.policy): it dies
the way its device died, and does nothing else. Each test runs the real program, exec'd by
a small Python parent that first forks the 'device' (a child that ends as asked), as
sandbox/device.py does, without the other layers."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitvmm.protocol.spec import CRASH_SIGNALS
from splitvmm.sandbox.device import WARDEN
from tests.sandbox.harness import REPO

pytestmark = pytest.mark.sandbox

# argv[1]: what the device does (Python, in the forked child); argv[2]: the warden's argv
# after CHILD, or "" for the filter exported as sandbox/device.py exports it; argv[3]: what
# the warden's starter does first, before the fork (what the warden inherits besides).
UNDER_WARDEN = """
import os, signal, sys
from splitvmm.native import confine
from splitvmm.sandbox import device, policy
exec(sys.argv[3])
warden_pid = os.getpid()
child = os.fork()
if child == 0:
    exec(sys.argv[1])
    os._exit(0)
rules = policy.load_warden_policy(warden_pid)
fd = os.memfd_create("filter", 0)
with open(fd, "wb", closefd=False) as f:
    policy.compile_filter(rules, tsync=False).export_bpf(f)
os.lseek(fd, 0, os.SEEK_SET)
confine.set_no_new_privs()
args = sys.argv[2].split() if sys.argv[2] else [str(fd)]
os.execv(device.WARDEN, [device.WARDEN, str(child), *args])
"""


def _run(
    device_does: str, warden_args: str = "", first: str = ""
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-c", UNDER_WARDEN, device_does, warden_args, first]
    return subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGABRT, signal.SIGSYS, signal.SIGPIPE], ids=str
)
def test_warden_when_device_died_of_a_signal_dies_alike(sig: int) -> None:
    """SIGSYS: a device killed by its filter; SIGPIPE comes ignored from Python: reset."""
    device = f"import signal; signal.signal({int(sig)}, signal.SIG_DFL); os.kill(os.getpid(), {int(sig)})"
    assert _run(device).returncode == -sig


def test_warden_when_device_exited_passes_its_status() -> None:
    assert _run("os._exit(3)").returncode == 3


def test_warden_when_device_was_killed_dies_of_sigkill() -> None:
    assert _run("os.kill(os.getpid(), 9)").returncode == -signal.SIGKILL


def test_warden_started_with_sigchld_ignored_still_reports_the_device_status() -> None:
    """An ignored SIGCHLD survives exec, and the kernel would reap the device unseen."""
    ignored = "signal.signal(signal.SIGCHLD, signal.SIG_IGN)"
    assert _run("import time; time.sleep(0.2); os._exit(7)", first=ignored).returncode == 7


def test_warden_started_with_the_death_signal_blocked_still_dies_alike() -> None:
    """A blocked mask survives exec: the replayed death would stay pending in the warden."""
    blocked = "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})"
    device = (
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}); "
        "os.kill(os.getpid(), signal.SIGTERM)"
    )
    assert _run(device, first=blocked).returncode == -signal.SIGTERM


@pytest.mark.parametrize("name", [n for n in CRASH_SIGNALS if n != "KILL"])
def test_warden_started_with_a_crash_signal_ignored_still_dies_of_it(name: str) -> None:
    """`ctl crash-device` signals the warden; an ignored disposition survives exec (`trap ''
    ABRT` in the script that started the VM), and the warden outlived its crash, while the
    monitor refuses to send a second one to a process it sent its crash."""
    sig = int(signal.Signals[f"SIG{name}"])
    ignored = f"signal.signal({sig}, signal.SIG_IGN)"
    device = (  # once the warden runs (and has had time to set its signals), signals it
        "import time\n"
        "while os.readlink(f'/proc/{os.getppid()}/exe') != device.WARDEN: time.sleep(0.01)\n"
        f"time.sleep(0.2); os.kill(os.getppid(), {sig})\n"
        "os.close(1); os.close(2); time.sleep(10); os._exit(0)"  # the test waits for EOF
    )
    assert _run(device, first=ignored).returncode == -sig


# The Python side of a warden whose exec fails (sandbox/device.py _warden), its stderr a
# regular file (argv[1] a path) or a pipe nobody reads (argv[1] "dead-pipe"): it must say
# why where it can, and end (status 1), never return into the device's code (status 7).
WARDEN_EXEC_FAILS = """
import os, signal, sys, time
from splitvmm.native import confine
from splitvmm.sandbox import device, policy
if sys.argv[1] == "dead-pipe":
    err, unread = os.pipe()[::-1]
    os.close(unread)
else:
    err = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(err, 2)
parent = os.getpid()
child = os.fork()
if child == 0:
    confine.set_parent_death_signal(signal.SIGKILL)  # as the device: the warden's end is ours
    if os.getppid() == parent:  # else it ended before prctl took effect
        time.sleep(30)
    os._exit(0)
alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
program = os.open(sys.argv[2], os.O_RDONLY | os.O_CLOEXEC)  # execve fails, past the rlimits
try:
    device._warden(child, alive_w, program, policy.load_warden_policy(os.getpid()), 1 << 34)
finally:
    os.kill(child, 9)
    os._exit(7)  # the device's code would go on here
"""


def warden_whose_exec_fails(tmp_path: Path, stderr: str) -> int:
    program = tmp_path / "program"
    program.write_text("not an executable\n")  # mode 0644: no execute permission
    argv = [sys.executable, "-c", WARDEN_EXEC_FAILS, stderr, str(program)]
    proc = subprocess.run(argv, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return proc.returncode


def test_warden_whose_exec_fails_says_why_in_a_stderr_file_and_ends(tmp_path) -> None:
    """Its RLIMIT_FSIZE was 0, so the line was lost (EFBIG) where stderr is a file."""
    log = tmp_path / "stderr.log"
    assert warden_whose_exec_fails(tmp_path, str(log)) == 1, log.read_text()
    assert log.read_text().startswith("splitvmm: device warden failed: ")


def test_warden_whose_exec_fails_with_stderr_unread_still_ends(tmp_path) -> None:
    """The line's EPIPE skipped the warden's exit: it went on into the device's code."""
    assert warden_whose_exec_fails(tmp_path, "dead-pipe") == 1


def test_warden_waits_under_its_seccomp_filter() -> None:
    """The device reads its parent's status: the warden has loaded its filter before it
    waits."""
    device = (
        "import time\n"
        "for _ in range(1000):  # until the warden has exec'd and loaded it (10 s at most)\n"
        "    status = open(f'/proc/{os.getppid()}/status').read()\n"
        "    fields = {k: v.strip() for k, v in (l.split(':', 1) for l in status.splitlines())}\n"
        "    if fields['Seccomp'] == '2':\n"
        "        break\n"
        "    time.sleep(0.01)\n"
        "os._exit(10 * int(fields['Seccomp']) + int(fields['NoNewPrivs']))"
    )
    assert _run(device).returncode == 21  # seccomp mode 2 (filter), no_new_privs 1


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ("", "usage: warden CHILD FILTER_FD"),
        ("1 x", "usage"),
        ("0 3", "usage"),  # pid 0: waitpid would wait for any child of the group
        ("1 99", "read the filter"),
    ],
)
def test_warden_with_bad_arguments_exits_1_saying_why(args: str, why: str) -> None:
    proc = subprocess.run([WARDEN, *args.split()], capture_output=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("splitvmm: device warden failed: ")
    assert why in proc.stderr.decode()


def test_warden_with_a_filter_that_is_no_bpf_program_exits_1() -> None:
    proc = _run("os._exit(0)", "0")  # fd 0: the test's stdin, /dev/null: empty
    assert proc.returncode == 1
    assert b"the filter is not a BPF program" in proc.stderr


# The filter itself (what the program runs under), loaded on a Python process that calls
# libc through ctypes set up beforehand: everything it does afterwards is a handful of
# syscalls, which the control case shows the filter allows.
UNDER_WARDEN_FILTER = """
import ctypes, os, sys
from splitvmm.native import confine
from splitvmm.sandbox import policy
libc = ctypes.CDLL(None, use_errno=True)
ppid = os.getppid()
code = compile(sys.argv[1], "<statement>", "exec")
rules = policy.load_warden_policy(os.getpid())
confine.set_no_new_privs()
policy.compile_filter(rules, tsync=False).load()
exec(code)
"""


def _under_filter(statement: str) -> int:
    argv = [sys.executable, "-c", UNDER_WARDEN_FILTER, statement]
    return subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30).returncode


def test_warden_filter_control_getpid_and_exit_are_allowed() -> None:
    assert _under_filter("libc.getpid(); libc._exit(5)") == 5


def test_warden_filter_when_it_signals_another_process_kills_it() -> None:
    assert _under_filter("libc.kill(ppid, 0); libc._exit(5)") == -signal.SIGSYS


def test_warden_filter_when_it_opens_a_file_kills_it() -> None:
    assert _under_filter("libc.open(b'/etc/passwd', 0); libc._exit(5)") == -signal.SIGSYS
