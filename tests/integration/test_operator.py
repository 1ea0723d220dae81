"""How `splitvmm up` meets its operator's process: signals it was started with ignored,
stdio closed at start, a stderr nobody reads at the end."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitvmm.sandbox.launcher_start import STOP_SIGNALS
from tests.integration.conftest import vm_toml
from tests.integration.vmproc import REPO, env_for

pytestmark = pytest.mark.kvm


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_vm_left_behind() -> Iterator[None]:
    """A test that fails before its VM ends leaves none running for the tests after it (a
    VM spinning its vCPU slowed the rest of a CI run into failing)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(tmp_path: Path, kernel: Path, cmdline: str, **popen: Any) -> subprocess.Popen[bytes]:
    """`splitvmm up` of `kernel`, its stop signals at their defaults whatever this test run
    inherited (`up` keeps a signal ignored where it started ignored, as nohup asks, and a
    shell's `cmd &` starts its job with SIGINT ignored), then `popen`'s preexec_fn."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{kernel}"\ncmdline = "{cmdline}"', serial_out=serial))
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    then = popen.pop("preexec_fn", None)

    def preexec() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if then is not None:
            then()

    proc = subprocess.Popen(argv, cwd=REPO, env=env_for(tmp_path), preexec_fn=preexec, **popen)
    _started.append(proc)
    return proc


def counting(tmp_path: Path, guests: dict[str, Path], **popen: Any) -> subprocess.Popen[bytes]:
    """The counter guest, once it prints; stdin /dev/null unless `popen` says otherwise."""
    proc = start(tmp_path, guests["counter"], "", **{"stdin": subprocess.DEVNULL, **popen})
    serial = tmp_path / "serial.log"
    deadline = time.monotonic() + 30
    while not (serial.exists() and b"count=" in serial.read_bytes()):
        assert proc.poll() is None and time.monotonic() < deadline, "the guest printed nothing"
        time.sleep(0.05)
    return proc


def ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_up_started_with_sighup_ignored_runs_on_after_one(tmp_path, guests):
    """nohup: the operator asked for SIGHUP to be ignored; the VM ended with 129."""
    proc = counting(tmp_path, guests, stderr=subprocess.PIPE, preexec_fn=ignore_sighup)
    try:
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert alive, err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_signalled_twice_still_ends_with_the_first_signals_status(tmp_path, guests, sig):
    """`timeout` signals `up`, then its whole process group: the second signal came during
    the teardown, where the previous handlers were back, and cut it short (SIGINT: click's
    'Aborted!' and status 1; SIGTERM: killed by it, nothing said)."""
    proc = counting(tmp_path, guests, stderr=subprocess.PIPE)
    proc.send_signal(sig)
    time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 128 + sig, err.decode()
    assert f"stopped by {sig.name}" in err.decode() and "Aborted" not in err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_signalled_while_it_builds_the_vm_stops_cleanly_before_any_vcpu_runs(
    tmp_path, guests, sig
):
    """A signal once the runtime directory exists, while devices start and the VM is
    built: SIGTERM killed the process there (its runtime directory, lock and sockets left),
    SIGINT raised a KeyboardInterrupt in the middle of a spawn (click's 'Aborted!', status 1,
    false 'started pid N for nobody' errors). The VM now stops at the build's next step,
    runs no vCPU, tears down as after a run, and exits 128 + the signal."""
    proc = start(tmp_path, guests["counter"], "", stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runtime = tmp_path / "run" / "splitvmm"
    deadline = time.monotonic() + 30
    while not list(runtime.glob("*/lock")):
        assert proc.poll() is None and time.monotonic() < deadline, "no runtime directory"
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    serial = tmp_path / "serial.log"

    assert proc.returncode == 128 + sig, text
    assert f"stopped by {sig.name}" in text and "Aborted" not in text and "ERROR" not in text
    assert not (serial.exists() and b"count=" in serial.read_bytes())  # no vCPU ran
    assert list(runtime.iterdir()) == []  # the runtime directory went with the VM


@pytest.mark.skipif(os.geteuid() != 0, reason="a monitor that is not dumpable hides its fds")
def test_up_closes_fds_it_inherited_before_it_confines_itself(tmp_path, guests):
    """A shell's `9>>file`: Landlock leaves open fds alone, so the confined monitor (and the
    launcher after it) could still write there, outside its domain."""
    outside = tmp_path / "outside.txt"
    fd = os.open(outside, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        proc = counting(tmp_path, guests, stderr=subprocess.PIPE, pass_fds=(fd,))
    finally:
        os.close(fd)
    try:
        held = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert str(outside) not in held, held


@pytest.mark.skipif(os.geteuid() != 0, reason="a monitor that is not dumpable hides its fds")
def test_up_started_with_stdin_closed_reads_dev_null_there(tmp_path, guests):
    """`up ... <&-`: the launcher's pidfd took fd 0, and the console read it as the
    operator's keyboard."""
    proc = counting(tmp_path, guests, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    try:
        fd0 = os.readlink(f"/proc/{proc.pid}/fd/0")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert fd0 == "/dev/null"


@pytest.mark.parametrize("closed", [1, 2], ids=["stdout", "stderr"])
def test_up_started_with_stdout_or_stderr_closed_exits_with_the_vms_status(
    tmp_path, guests, closed
):
    """`up ... >&-`, `2>&-`: Python had None for that stream, and the final flush of it
    failed, so the exit status was 1 rather than the guest's reset (0)."""
    proc = start(
        tmp_path,
        guests["hello"],
        "greeting=hi",
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(closed),
    )
    assert proc.wait(60) == 0


def test_up_whose_stderr_nobody_reads_exits_with_the_vms_status(tmp_path, guests):
    """The last line goes to a pipe with no reader: EPIPE made the exit status 1 rather
    than the guest's reset (0)."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = start(tmp_path, guests["hello"], "greeting=hi", stdin=subprocess.DEVNULL, stderr=w)
    finally:
        os.close(w)
    assert proc.wait(60) == 0


# setpriv(1) runs `up` as root without the capabilities that let root open any file: an
# operator after `su` in another user's terminal, which the devices cannot open anew.
NOT_THE_TERMINALS_OWNER = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs `up` as root without CAP_DAC_OVERRIDE (setpriv)",
)
def test_up_on_a_terminal_it_cannot_reopen_leaves_it_blocking_at_the_end(tmp_path, guests):
    """`su other` in a terminal, then `up` with the serial on stdio: the device cannot open
    the first user's terminal for a description of its own, and makes the one it shares with
    the operator's shell non-blocking instead (fdline.py). It stayed so once the VM had
    ended: the shell's next commands got EAGAIN writing to their terminal (`seq: write error:
    Resource temporarily unavailable`)."""
    master, terminal = os.openpty()
    os.fchown(terminal, 65534, 65534)
    os.fchmod(terminal, 0o600)
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{guests["hello"]}"', serial_out="stdio"))
    proc = subprocess.Popen(
        [*NOT_THE_TERMINALS_OWNER, sys.executable, "-m", "splitvmm", "up", str(config)],
        cwd=REPO,
        env=env_for(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    _started.append(proc)
    shown = bytearray()
    try:
        while proc.poll() is None or select.select([master], [], [], 0.5)[0]:
            if select.select([master], [], [], 0.1)[0]:
                shown += os.read(master, 65536)
        flags = fcntl.fcntl(terminal, fcntl.F_GETFL)
    finally:
        os.close(master)
        os.close(terminal)

    assert proc.returncode == 0, shown.decode(errors="replace")
    assert b"making it non-blocking as shared" in shown  # the fallback this is about
    assert not flags & os.O_NONBLOCK


@pytest.mark.parametrize("before", [None, b"", b"kept"], ids=["new", "empty", "written"])
def test_up_refused_after_opening_its_outputs_removes_only_the_file_it_created(tmp_path, before):
    """The serial output is opened (created) before the kernel is read: a refused kernel left
    an empty log behind, as if the VM had run and printed nothing. Now a file `up` created is
    removed again when no vCPU ran; one that was there before stays as it was."""
    kernel = tmp_path / "notes.txt"
    kernel.write_bytes(b"not a kernel" * 100)
    serial = tmp_path / "serial.log"
    if before is not None:
        serial.write_bytes(before)
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{kernel}"', serial_out=serial))
    argv = [sys.executable, "-m", "splitvmm", "up", str(config)]
    done = subprocess.run(argv, cwd=REPO, env=env_for(tmp_path), capture_output=True, timeout=60)

    assert done.returncode == 1 and b"not an ELF or bzImage" in done.stderr, done.stderr
    assert (serial.read_bytes() if serial.exists() else None) == before
