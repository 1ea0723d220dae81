"""The device warden (splitvmm/native/warden.c) under its own filter (warden.policy): it dies
the way its device died, and does nothing else. Each test runs the real program, exec'd by
a small Python parent that first forks the 'device' (a child that ends as asked), as
sandbox/device.py does, without the other layers."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from splitvmm.sandbox.device import WARDEN
from tests.sandbox.harness import REPO

pytestmark = pytest.mark.sandbox

# argv[1]: what the device does (Python, in the forked child); argv[2]: the warden's argv
# after CHILD, or "" for the filter exported as sandbox/device.py exports it.
UNDER_WARDEN = """
import os, sys
from splitvmm.native import confine
from splitvmm.sandbox import device, policy
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


def _run(device_does: str, warden_args: str = "") -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-c", UNDER_WARDEN, device_does, warden_args]
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
